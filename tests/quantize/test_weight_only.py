"""Weight-only int8 / int4: real file bytes, accuracy of the weights, save/load, dynamic mode + ONNX."""

from __future__ import annotations

import os

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import QuantConfig, QuantizedLinear, quantize_, sqnr
from torchslim.saving import write_weights


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512))


@pytest.mark.parametrize(("bits", "granularity", "ratio"), [(8, "channel", 3.8), (4, "group", 7.0)])
def test_file_is_really_smaller(tmp_path, bits: int, granularity: str, ratio: float) -> None:
    model = _mlp()
    write_weights(model, tmp_path / "fp32.safetensors")
    x = torch.randn(4, 512)
    y = model(x)
    quantize_(model, QuantConfig(mode="weight-only", bits=bits, granularity=granularity, group_size=64))
    write_weights(model, tmp_path / "q.safetensors")
    measured = os.path.getsize(tmp_path / "fp32.safetensors") / os.path.getsize(tmp_path / "q.safetensors")
    assert measured > ratio
    assert sqnr(y, model(x)) > (30 if bits == 8 else 15)


def test_weight_only_save_load_round_trip(tmp_path) -> None:
    model = ts.create_model("zoo:lenet300")
    plan = quantize_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=4, symmetric=False))
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in plan.layers)
    x = torch.randn(3, 1, 28, 28)
    y = model(x)
    ts.save(model, tmp_path / "m")
    assert torch.equal(ts.load(tmp_path / "m")(x), y)


def test_dynamic_mode_and_onnx_integer_kernels(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from torchslim.export.onnx_int import export_integer_onnx
    from torchslim.export.ort import ort_run

    model = ts.create_model("zoo:lenet300").eval()
    x = torch.randn(8, 1, 28, 28)
    y = model(x)
    quantize_(model, QuantConfig(mode="dynamic"))
    assert sqnr(y, model(x)) > 25
    files = export_integer_onnx(model, (x[:1],), tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(files["onnx"]).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    assert sqnr(y, ort_run(files["onnx"], x)) > 25
    assert os.path.getsize(files["onnx"]) * 3.5 < os.path.getsize(files["onnx_fp32"])


def test_bad_weight_only_input_leaves_model_unchanged() -> None:
    model = ts.create_model("zoo:lenet300")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="group_size"):  # 784 is not a multiple of 128
        quantize_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=128))
    with pytest.raises(ConfigError, match="no Linear"):
        quantize_(ts.create_model("zoo:lenet5"), QuantConfig(mode="weight-only", modules=("features.*",)))
    with pytest.raises(ConfigError, match="bits must be 8"):
        QuantConfig(mode="dynamic", bits=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.fc1) is torch.nn.Linear


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_dequantized_weight_within_half_a_step(bits: int, signed: bool) -> None:
    from torchslim.quantize.primitives import QScheme
    from torchslim.quantize.weight_only import QuantizedLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    q = QuantizedLinear.from_float(lin, QScheme(bits=bits, symmetric=True, signed=signed, granularity="group", group_size=32))
    step = q.scale.float().reshape(16, 2, 1).expand(16, 2, 32).reshape(16, 64)
    # half a step, plus the fp16 rounding of the scale (relative 2**-11) times the largest integer
    assert ((q.dequantized_weight() - lin.weight).abs() <= (0.5 + 2 ** (bits - 1) * 2**-11) * step).all()


@pytest.mark.parametrize(
    ("config", "dtype", "tol"),
    [
        (QuantConfig(mode="dynamic"), torch.float32, 1e-4),
        (QuantConfig(mode="dynamic", symmetric=False), torch.float32, 1e-4),
        (QuantConfig(mode="weight-only", bits=8), torch.float32, 1e-5),
        (QuantConfig(mode="weight-only", bits=8), torch.bfloat16, 3e-2),
        (QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=64), torch.float32, 3e-2),
        (QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=64, symmetric=False), torch.bfloat16, 3e-2),
    ],
)
def test_integer_kernels_match_the_reference_path(config: QuantConfig, dtype: torch.dtype, tol: float) -> None:
    """A whole model on its integer kernels (see tests/quantize/test_kernels.py for the bounds)
    against the same model forced onto the dequantize path, 2-D and 3-D inputs."""
    from torchslim.quantize.kernels import choose_kernel, reference_kernels

    model = _mlp()
    quantize_(model, config)
    model.to(dtype)
    for shape in [(4, 512), (2, 3, 512)]:
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            assert all(choose_kernel(m, x) != "reference" for m in model.modules() if isinstance(m, QuantizedLinear))
            y = model(x).float()
            with reference_kernels():
                ref = model(x).float()
        assert float((y - ref).abs().max()) <= tol * float(ref.abs().max())


def test_weight_only_int8_round_trip_runs_int8pack_in_bfloat16(tmp_path) -> None:
    from torchslim.quantize.kernels import choose_kernel

    model = ts.create_model("zoo:lenet300").eval()
    quantize_(model, QuantConfig(mode="weight-only", bits=8))
    ts.save(model, tmp_path / "m")
    back = ts.load(tmp_path / "m").eval()
    assert all(m.qweight.dtype == torch.int8 for m in back.modules() if isinstance(m, QuantizedLinear))
    model.to(torch.bfloat16)
    back.to(torch.bfloat16)
    x = torch.randn(3, 1, 28, 28, dtype=torch.bfloat16)
    with torch.no_grad():
        assert choose_kernel(back.fc1, torch.randn(3, 784, dtype=torch.bfloat16)) == "int8pack"
        assert torch.equal(back(x), model(x))
    assert back.fc1.scale.dtype == torch.float16  # the cast left the stored scales as saved
