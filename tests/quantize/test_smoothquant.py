"""SmoothQuant scale migration (QuantConfig(smoothquant_alpha=...)): float outputs unchanged,
int8 SQNR better on activations with outlier channels, save/load and ONNX round trips, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import QuantConfig, quantize_, sqnr
from torchslim.quantize.smoothquant import smooth_linears_


class _Outliers(nn.Module):
    """Two Linear layers whose inputs have a few channels ~50x larger than the rest (as in LLMs)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 16)
        gain = torch.ones(64)
        gain[[3, 17, 40]] = 50.0
        self.register_buffer("gain", gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x * self.gain)
        return self.fc2(h * self.gain)


def _data() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    return _Outliers().eval(), [torch.randn(32, 8, 64) for _ in range(4)], torch.randn(64, 8, 64)


def test_smoothing_keeps_float_outputs() -> None:
    model, calib, x = _data()
    ref = model(x)
    m = copy.deepcopy(model)
    done = smooth_linears_(m, {"fc1": m.fc1, "fc2": m.fc2}, calib, 4, alpha=0.5)
    assert done == ["fc1", "fc2"]
    assert torch.allclose(m(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothquant_improves_int8_sqnr_on_outliers(alpha: float) -> None:
    model, calib, x = _data()
    with torch.no_grad():
        ref = model(x)
    plain, smooth = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(plain, QuantConfig(mode="static"), calibration=calib)
    plan = quantize_(smooth, QuantConfig(mode="static", smoothquant_alpha=alpha), calibration=calib)
    assert plan.smoothed == ["fc1", "fc2"]
    with torch.no_grad():
        gain = sqnr(ref, smooth(x)) - sqnr(ref, plain(x))
    assert gain > 3.0  # dB


def test_smoothquant_save_load_and_onnx(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.quantize import export_onnx
    from torchslim.quantize._onnx import onnx_parity

    model = ts.create_model("zoo:lenet300", data="mnist")
    calib = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    quantize_(model, QuantConfig(mode="static", smoothquant_alpha=0.5), calibration=calib)
    ts.save(model, tmp_path / "q")
    loaded = ts.load(tmp_path / "q")
    x = calib[0][:4]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    files = export_onnx(model, (x[:1],), tmp_path / "m.onnx", calibration=calib)
    parity = onnx_parity(model, files, x)
    assert parity["fp32_vs_torch_float_db"] > 60
    assert parity["int8_vs_torch_quantized_db"] > 20


def test_smoothquant_bad_input_leaves_model_unchanged() -> None:
    with pytest.raises(ConfigError, match="smoothquant_alpha"):
        QuantConfig(mode="static", smoothquant_alpha=1.5)
    with pytest.raises(ConfigError, match="smoothquant_alpha"):
        QuantConfig(mode="dynamic", smoothquant_alpha=0.5)
    model, _, _ = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="calibration"):
        quantize_(model, QuantConfig(mode="qat", smoothquant_alpha=0.5))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert QuantConfig.from_dict(QuantConfig(smoothquant_alpha=0.5).to_dict()) == QuantConfig(smoothquant_alpha=0.5)
