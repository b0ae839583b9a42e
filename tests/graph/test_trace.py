"""The dispatch-level tracer: ops, module attribution, parameter identity, memory, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchslim.errors import InputShapeError, ModelRunError
from torchslim.graph import trace


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # data-dependent control flow: the branch actually taken is recorded
        return self.a(x) if x.sum() > 0 else self.b(x)


def test_records_aten_ops_with_module_and_param_identity() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    t = trace(model, torch.randn(2, 3, 8, 8))
    conv = [op for op in t.ops if op.packet == "convolution"]
    assert len(conv) == 1 and conv[0].module == "0"
    assert conv[0].tensor_args()[1].param == "0.weight"
    assert conv[0].outputs[0].shape == (2, 8, 6, 6)
    addmm = [op for op in t.ops if op.packet == "addmm"]
    assert len(addmm) == 1 and addmm[0].module == "4"
    # every parameter and buffer is found by identity
    assert set(t.params) == set(dict(model.named_parameters())) | set(dict(model.named_buffers()))
    assert t.outputs[0].shape == (2, 5)
    assert [c.name for c in t.module_calls][:3] == ["", "0", "1"]


def test_data_dependent_branch_is_the_one_taken() -> None:
    m = Branchy().eval()
    pos = trace(m, torch.ones(1, 4))
    neg = trace(m, -torch.ones(1, 4))
    assert {op.module for op in pos.ops if op.packet == "addmm"} == {"a"}
    assert {op.module for op in neg.ops if op.packet == "addmm"} == {"b"}


def test_trace_leaves_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4)).train()
    state = copy.deepcopy(model.state_dict())
    trace(model, torch.randn(3, 4), grad=False)
    assert model.training
    # the forward ran in train mode, so BN statistics moved: restore and check hooks are gone
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model.load_state_dict(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_peak_activation_memory_of_a_chain() -> None:
    # x -> linear (4000 B) -> relu (4000 B, linear output dies after) -> linear (4000 B)
    model = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 1000)).eval()
    t = trace(model, torch.randn(1, 1000))
    assert t.peak_activation_bytes == 8000


def test_tied_parameters_share_one_id() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    t = trace(model, torch.tensor([[1, 2, 3]]))
    assert t.params["0.weight"].id == t.params["1.weight"].id


def test_forward_error_names_module() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("kaboom")

    model = nn.Sequential(nn.Linear(4, 4), Boom())
    with pytest.raises(ModelRunError, match=r"in module '1'.*kaboom") as info:
        trace(model, torch.randn(1, 4))
    assert isinstance(info.value, RuntimeError)


def test_wrong_input_shape_is_input_shape_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(InputShapeError, match=r"\[1, 1, 8, 8\].*in module '0'") as info:
        trace(model, torch.randn(1, 1, 8, 8))
    assert isinstance(info.value, ValueError)


def test_keyword_inputs() -> None:
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, *, features: torch.Tensor) -> torch.Tensor:
            return self.lin(features)

    t = trace(KW(), {"features": torch.randn(2, 3)})
    assert t.outputs[0].shape == (2, 2)
