"""Wanda and SparseGPT: exact sparsity, N:M patterns, identity at sparsity 0, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.prune.masks import get_mask
from torchslim.prune.sparsegpt import sparsegpt_, sparsegpt_prune
from torchslim.prune.wanda import OneShotConfig, wanda_

METHODS = {"wanda": wanda_, "sparsegpt": sparsegpt_}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))


def _calib(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.1, 3.0, 32)  # uneven input features, as real activations have
    return [torch.randn(64, 32, generator=g) * scale for _ in range(n)]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_exact_unstructured_sparsity(method: str, sparsity: float) -> None:
    model = _mlp()
    plan = METHODS[method](model, sparsity, calibration=_calib())
    for layer in (model[0], model[2]):
        w = layer.weight
        zeros = int((w == 0).sum())
        if method == "wanda":  # per output row
            assert zeros == w.shape[0] * round(sparsity * w.shape[1])
        else:  # per layer
            assert zeros == round(sparsity * w.numel())
        assert torch.equal(get_mask(layer), w != 0)
    assert plan.method == method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_four_pattern(method: str) -> None:
    model = _mlp()
    plan = METHODS[method](model, pattern="2:4", calibration=_calib())
    for layer in (model[0], model[2]):
        groups = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2 and int((groups == 2).sum()) == groups.numel()
    assert plan.overall == pytest.approx(0.5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sparsity_zero_is_identity(method: str) -> None:
    model = _mlp()
    ref = copy.deepcopy(model)
    x = _calib()[0]
    METHODS[method](model, 0.0, calibration=_calib())
    assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_sparsegpt_and_wanda_beat_magnitude_on_output_error() -> None:
    x = torch.cat(_calib(8))
    errs = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        model = _mlp()
        ref = model(x).detach()
        if name == "magnitude":
            ts.sparsify_(model, 0.5)
        else:
            METHODS[name](model, 0.5, calibration=_calib(8))
        errs[name] = float(((model(x) - ref) ** 2).mean())
    assert errs["sparsegpt"] < errs["magnitude"] and errs["wanda"] < errs["magnitude"]


def test_sparsegpt_prune_reconstructs_better_than_masking() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    new, keep = sparsegpt_prune(w, h, 0.5)
    assert int((~keep).sum()) == w.numel() // 2 and torch.all(new[~keep] == 0)
    masked_err = ((x @ (w * keep).T - x @ w.T) ** 2).mean()
    assert ((x @ new.T - x @ w.T) ** 2).mean() < masked_err


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": 0.5, "calibration": []},
        {"sparsity": 0.5, "calibration": None},
        {"sparsity": 1.5, "calibration": "ok"},
        {"sparsity": 0.5, "pattern": "2:3", "calibration": "ok"},  # 32 and 64 not divisible by 3
        {"sparsity": 0.5, "pattern": "block", "calibration": "ok"},
        {"sparsity": 0.5, "modules": ["nope"], "calibration": "ok"},
    ],
)
def test_bad_input_leaves_model_unchanged(method: str, kwargs: dict) -> None:
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    kwargs = dict(kwargs)
    if kwargs.get("calibration") == "ok":
        kwargs["calibration"] = _calib()
    sparsity = kwargs.pop("sparsity")
    with pytest.raises(ConfigError):
        METHODS[method](model, sparsity, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_failing_forward_restores_weights() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 2:  # fails after the first layer was pruned
                raise RuntimeError("boom")
            return self.b(self.a(x))

    model = Boom()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError):
        sparsegpt_(model, 0.5, calibration=[torch.randn(4, 8)])
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert get_mask(model.a) is None


def test_config_round_trip_and_errors() -> None:
    cfg = OneShotConfig(method="sparsegpt", sparsity=None, pattern="2:4", skip=("head",))
    assert OneShotConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError):
        OneShotConfig(method="obs")
    with pytest.raises(ConfigError):
        OneShotConfig(sparsity=0.3, pattern="2:4")


def test_save_load_round_trip_of_a_wanda_model(tmp_path) -> None:
    model = ts.create_model("zoo:lenet300")
    x = ts.example_inputs(model)[0]
    wanda_(model, 0.5, calibration=[torch.randn(8, *x.shape[1:])])
    loaded = ts.load(ts.save(model, tmp_path / "m"))
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
