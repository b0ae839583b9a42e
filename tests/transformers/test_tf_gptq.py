"""GPTQ: lower layer-output error than round-to-nearest, same packed storage, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import QuantConfig, QuantizedLinear, quantize_
from torchslim.quantize.gptq import dequantize_grouped, gptq_, gptq_quantize, rtn_quantize
from torchslim.quantize.primitives import QScheme

INT4 = QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=16)


def _data(n: int = 512, d: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3  # correlated inputs


@pytest.mark.parametrize("granularity", ["group", "channel"])
def test_gptq_layer_error_below_round_to_nearest(granularity: str) -> None:
    x = _data()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    scheme = QScheme(bits=4, granularity=granularity, group_size=16)
    h = 2 * x.T @ x / x.shape[0]
    qg = dequantize_grouped(*gptq_quantize(w, h, scheme))
    qr = dequantize_grouped(*rtn_quantize(w, scheme))
    err_g = ((x @ (qg - w).T) ** 2).mean()
    err_r = ((x @ (qr - w).T) ** 2).mean()
    assert err_g < 0.8 * err_r
    ints = gptq_quantize(w, h, scheme)[0]
    assert int(ints.min()) >= -8 and int(ints.max()) <= 7


def test_gptq_model_uses_weight_only_storage_and_round_trips(tmp_path) -> None:
    model = ts.create_model("zoo:lenet300")
    x = ts.example_inputs(model)[0]
    calib = [torch.rand(16, *x.shape[1:]) for _ in range(2)]
    cfg = QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=4)
    plan = gptq_(model, cfg, calibration=calib)
    assert plan.layers == ["fc1", "fc2", "fc3"]
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in plan.layers)
    loaded = ts.load(ts.save(model, tmp_path / "m"))
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_gptq_beats_rtn_on_a_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))
    x = _data()
    ref = model(x).detach()
    rtn = copy.deepcopy(model)
    quantize_(rtn, INT4)
    gptq_(model, INT4, calibration=[x[:256], x[256:]])
    assert ((model(x) - ref) ** 2).mean() < ((rtn(x) - ref) ** 2).mean()


@pytest.mark.parametrize(
    "config, calibration",
    [
        (QuantConfig(mode="dynamic"), "ok"),
        (QuantConfig(mode="weight-only", bits=4, granularity="tensor"), "ok"),
        (QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=24), "ok"),
        (INT4, []),
        (INT4, None),
    ],
)
def test_bad_input_leaves_model_unchanged(config: QuantConfig, calibration: object) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError):
        gptq_(model, config, calibration=[_data(32)] if calibration == "ok" else calibration)
    assert all(isinstance(m, (nn.Linear, nn.GELU)) for m in model)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
