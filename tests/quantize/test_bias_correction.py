"""Empirical bias correction (QuantConfig(bias_correction=True)): it removes the mean output shift
of quantization, round-trips through save/load, and is refused outside static mode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import QuantConfig, quantize_


def _biased_model() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    """Inputs with a large mean (1 + small noise): 4-bit weight errors become a systematic output shift."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 10)).eval()
    calib = [1.0 + 0.1 * torch.randn(64, 64) for _ in range(4)]
    test = 1.0 + 0.1 * torch.randn(256, 64)
    return model, calib, test


def _errors(model: nn.Module, calib: list[torch.Tensor], test: torch.Tensor) -> tuple[float, float, QuantConfig]:
    with torch.no_grad():
        ref = model(test)
    out = {}
    for bc in (False, True):
        m = copy.deepcopy(model)
        quantize_(m, QuantConfig(mode="static", bits=4, granularity="tensor", bias_correction=bc), calibration=calib)
        with torch.no_grad():
            out[bc] = (m(test) - ref).pow(2).mean().item()
    return out[False], out[True], m


def test_bias_correction_reduces_biased_error() -> None:
    model, calib, test = _biased_model()
    plain, corrected, _ = _errors(model, calib, test)
    assert corrected < 0.5 * plain


def test_bias_correction_removes_the_mean_shift_on_calibration_data() -> None:
    model, calib, _ = _biased_model()
    m = copy.deepcopy(model)
    plan = quantize_(m, QuantConfig(mode="static", bits=4, bias_correction=True), calibration=calib)
    assert plan.bias_corrected == ["0", "2"] and plan.bias_added == ["0"]
    x = torch.cat(calib)
    with torch.no_grad():
        # the last layer's mean output matches the float model's up to what earlier layers' correction moved
        shift = (m(x) - model(x)).mean(0).abs().max().item()
        m0 = copy.deepcopy(model)
        quantize_(m0, QuantConfig(mode="static", bits=4), calibration=calib)
        shift0 = (m0(x) - model(x)).mean(0).abs().max().item()
    assert shift < 0.5 * shift0


def test_bias_correction_save_load_round_trip(tmp_path) -> None:
    model = ts.create_model("zoo:lenet5", data="mnist")
    calib = [torch.randn(16, 1, 28, 28).abs() for _ in range(2)]
    plan = quantize_(model, QuantConfig(mode="static", bias_correction=True), calibration=calib)
    assert plan.bias_corrected
    ts.save(model, tmp_path / "q")
    loaded = ts.load(tmp_path / "q")
    x = calib[0][:4]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


@pytest.mark.parametrize("mode", ["dynamic", "qat", "weight-only"])
def test_bias_correction_needs_static(mode: str) -> None:
    with pytest.raises(ConfigError, match="bias_correction"):
        QuantConfig(mode=mode, bias_correction=True)
    with pytest.raises(ConfigError, match="True or False"):
        QuantConfig(bias_correction="yes")


def test_config_round_trip_with_bias_correction() -> None:
    cfg = QuantConfig(mode="static", bias_correction=True)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
