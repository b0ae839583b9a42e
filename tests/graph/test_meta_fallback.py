"""The channel analysis traces shape-only (meta) first; when it cannot, it says why and traces the
real forward. Only the failures a meta run explains are caught: anything else propagates."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from torchslim.errors import ModelRunError, SpecError
from torchslim.graph import groups
from torchslim.graph.build import analyse
from torchslim.graph.inputs import Inputs, remembered_inputs
from torchslim.graph.optable import ELEMENTWISE, is_pointwise


class _Gate(nn.Module):
    """Reads a value from its input: fine on real tensors, impossible on meta ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.ones((), device=x.device).item()  # a value, not x's channels: they stay free
        return x * scale


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.gate = _Gate()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gate(torch.relu(self.fc1(x))))


class _MetaHostile(nn.Module):
    """Raises a ValueError on meta tensors only: not a failure a shape-only run explains."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:
            raise ValueError("this forward refuses meta tensors")
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_meta_trace_used_when_possible() -> None:
    cg = analyse(_mlp(), torch.randn(2, 4))
    assert cg.meta_ok and cg.meta_fallback is None
    assert [g.size for g in cg] == [8]


def test_fallback_names_op_module_and_error(caplog: pytest.LogCaptureFixture) -> None:
    model = _DataDependent()
    with caplog.at_level(logging.INFO, logger="torchslim.graph.build"):
        cg = analyse(model, torch.randn(2, 4))
    assert not cg.meta_ok
    reason = cg.meta_fallback
    assert reason is not None
    assert "_local_scalar_dense" in reason  # the ATen op behind .item()
    assert "module 'gate'" in reason
    assert "RuntimeError" in reason and "meta" in reason
    assert any(reason in r.getMessage() for r in caplog.records)
    # the real forward was traced: the groups are those of the MLP
    assert [g.size for g in cg] == [8]
    assert cg.groups[0].producers == [("fc1.weight", 0)]


def test_no_meta_kernel_falls_back() -> None:
    class Unique(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            return y + torch.unique(torch.zeros(3, device=x.device)).sum()  # no meta kernel

    cg = analyse(Unique(), torch.randn(2, 4))
    assert cg.meta_fallback is not None and "NotImplementedError" in cg.meta_fallback
    assert "unique" in cg.meta_fallback


def test_unexpected_exception_is_not_swallowed() -> None:
    model = _MetaHostile()
    model(torch.randn(2, 4))  # the real forward runs
    with pytest.raises(ModelRunError, match="refuses meta tensors") as info:
        analyse(model, torch.randn(2, 4))
    assert isinstance(info.value.__cause__, ValueError)


def test_torchslim_bug_in_meta_trace_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchslim.graph.build as build

    def broken(example_inputs: object) -> object:
        raise AttributeError("a bug in the meta path")

    monkeypatch.setattr(build, "to_meta", broken)
    with pytest.raises(AttributeError, match="a bug in the meta path"):
        analyse(_mlp(), torch.randn(2, 4))


def test_groups_reads_remembered_inputs_without_the_record_module() -> None:
    model = _mlp()
    with pytest.raises(SpecError, match="does not remember example inputs"):
        groups(model)
    model.__dict__["_torchslim"] = SimpleNamespace(example=Inputs((torch.randn(1, 4),)))
    assert remembered_inputs(model).args[0].shape == (1, 4)
    assert [g.size for g in groups(model)] == [8]


def test_optable_is_shared_with_profile() -> None:
    from torchslim.profile import _formulas

    assert _formulas.is_pointwise is is_pointwise
    assert is_pointwise(torch.ops.aten.add.Tensor) and is_pointwise(torch.ops.aten.add_.Tensor)
    assert is_pointwise(torch.ops.aten.gelu.default) and "gelu" in ELEMENTWISE
    assert not is_pointwise(torch.ops.aten.mm.default)


def test_skip_is_the_selector_and_ignore_its_old_name() -> None:
    import pytest

    from torchslim.errors import ConfigError
    from torchslim.graph import groups

    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                            torch.nn.Linear(8, 2))
    x = torch.randn(1, 4)
    assert len(groups(m, x)) == 2
    assert len(groups(m, x, skip=["re:^4$"])) == 1  # the last layer reads group 2: it stays whole
    with pytest.raises(ConfigError, match=r"'3x' selects no module.*did you mean '3'"):
        groups(m, x, skip=["3x"])
    with pytest.warns(DeprecationWarning, match="ignore= is deprecated"):
        assert len(groups(m, x, ignore=["4"])) == 1
