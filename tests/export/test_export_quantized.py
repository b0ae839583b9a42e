"""Static-int8 models through ``ts.export``: int8 QDQ ONNX, parity in quantization steps."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.export import ExportError, Tolerance, export
from torchslim.export.onnx import load_onnx
from torchslim.export.parity import check_parity, compare_outputs
from torchslim.graph.inputs import Inputs

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def static_cnn():
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet5")
    calib = [torch.randn(8, 1, 28, 28) for _ in range(4)]
    ts.quantize_(model, ts.QuantConfig(mode="static"), calibration=calib)
    return model.eval(), calib


def test_static_int8_cnn_exports_qdq_onnx_within_quantization_steps(tmp_path, static_cnn):
    model, calib = static_cnn
    x = calib[0][:1]
    result = export(model, x, tmp_path / "m.onnx", calibration=calib)
    assert result.format == "onnx-int8" and result.info["quantized"] == "static"
    assert list(tmp_path.iterdir()) == [tmp_path / "m.onnx"]  # the float twin is not left behind
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # integer kernels in ONNX Runtime
    report = result.parity
    assert report.ok and report.tolerance == Tolerance(0.0, 0.0, steps=16.0)
    assert len(report.cases) == 3 and any(c.batch == 3 for c in report.cases)  # dynamic batch checked
    for case in report.cases:
        assert case.max_steps <= 16 and case.sqnr_db > 25 and case.top1_agreement == 1.0
    assert "quantization steps" in report.summary()

    # smaller than the float export of the same architecture
    fp32 = export(ts.create_model("zoo:lenet5"), x, tmp_path / "fp32.onnx", random_inputs=0)
    assert fp32.format == "onnx"
    assert result.size_bytes * 2 < fp32.size_bytes

    # and the check can fail: a fraction of one step is not met by integer kernels
    strict = check_parity(model, load_onnx(result.path), Inputs((x,)), format="onnx-int8",
                          tolerance=Tolerance(0.0, 0.0, steps=0.01), random_cases=0)
    assert not strict.ok


def test_default_calibration_is_random_batches_like_the_example(tmp_path, static_cnn):
    model, calib = static_cnn
    result = export(model, calib[0][:1], tmp_path / "m.onnx", random_inputs=1)
    assert result.info["calibration"] == "random" and result.parity.ok, result.parity.summary()


def test_steps_tolerance_counts_steps_of_the_output_range():
    ref = [torch.tensor([[0.0, 2.55]])]  # range 2.55: one 8-bit step is 0.01
    tol = Tolerance(0.0, 0.0, steps=2.0)
    ok = compare_outputs(ref, [torch.tensor([[0.015, 2.55]])], tol, "c")
    assert ok.ok and ok.max_steps == pytest.approx(1.5) and ok.top1_agreement == 1.0 and ok.sqnr_db > 40
    assert not compare_outputs(ref, [torch.tensor([[0.025, 2.55]])], tol, "c").ok
    assert Tolerance.from_dict(tol.to_dict()) == tol
    assert Tolerance.coerce((0, 0, 3), (1, 1)) == Tolerance(0, 0, 3)
    with pytest.raises(ConfigError, match="steps"):
        Tolerance(0, 0, steps=-1)


def test_quantized_format_refuses_a_float_model_and_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match="quantized with ts.quantize_"):
        export(ts.create_model("zoo:lenet5"), path=tmp_path / "m.onnx", format="onnx-int8")
    assert list(tmp_path.iterdir()) == []


def test_calibration_is_refused_for_formats_that_do_not_use_it(tmp_path):
    with pytest.raises(ConfigError, match="calibration"):
        export(ts.create_model("zoo:lenet5"), path=tmp_path / "m.pt", calibration=[torch.randn(2, 1, 28, 28)])
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_saved_static_model_as_int8(tmp_path, capsys, static_cnn):
    import json

    from torchslim.cli import main

    model, _ = static_cnn
    ts.save(model, tmp_path / "q")
    out = tmp_path / "q.onnx"
    assert main(["export", str(tmp_path / "q"), "--out", str(out), "--random-inputs", "1", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["exporters"]["onnx"]["quantized"] == "static" and payload["parity"]["onnx"]["ok"] is True
    assert payload["parity"]["onnx"]["tolerance"]["steps"] == 16.0 and out.is_file()


def test_dynamic_and_int4_models_go_through_the_one_writer(tmp_path):
    """``format="onnx-int8"`` of a dynamic / int4 weight-only model: the integer ops the
    quantize family's registered scheme asks for (the export package never imports quantize)."""
    torch.manual_seed(0)
    x = torch.randn(2, 64)
    dyn = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    ts.quantize_(dyn, ts.QuantConfig(mode="dynamic"))
    result = export(dyn, x, tmp_path / "dyn.onnx", format="onnx-int8")
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert result.info["quantized"] == "dynamic" and {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert result.parity.ok

    int4 = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    ts.quantize_(int4, ts.QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=32))
    result = export(int4, x, tmp_path / "int4.onnx", format="onnx-int8")
    ops = [n.op_type for n in onnx.load(str(result.path)).graph.node]
    assert result.info["quantized"] == "weight-only" and ops.count("MatMulNBits") == 2 and "MatMul" not in ops
    assert result.parity.ok
    # a dynamic model's plain ONNX stays the float simulation (only static / QAT are routed)
    assert export(dyn, x, tmp_path / "plain.onnx").format == "onnx"


class _ToyInt4(torch.nn.Module):
    """A module of no torchslim family: a Linear whose weight is symmetric int4 in groups of 32."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        w = torch.randn(rows, cols)
        scale = w.reshape(rows, cols // 32, 32).abs().amax(-1) / 7
        self.register_buffer("ints", (w.reshape(rows, -1, 32) / scale[..., None]).round().clamp(-8, 7).to(torch.int8))
        self.register_buffer("scale", scale)

    def weight(self) -> torch.Tensor:
        return (self.ints.float() * self.scale[..., None]).reshape(self.scale.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight())


def test_a_plugin_registers_its_lowering_and_ts_export_writes_integers(tmp_path, monkeypatch):
    """What a family does to get integer ONNX: register a lowering per module type and a scheme reader."""
    import numpy as np

    from torchslim.export import onnx_int
    from torchslim.export.onnx_nbits import Int4Weight

    monkeypatch.setattr(onnx_int, "_LOWERINGS", dict(onnx_int._LOWERINGS))
    monkeypatch.setattr(onnx_int, "_SCHEMES", list(onnx_int._SCHEMES))

    def as_linear(m: _ToyInt4) -> torch.nn.Module:
        lin = torch.nn.Linear(m.ints.shape[1] * 32, m.ints.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(m.weight())
        return lin

    def as_int4(m: _ToyInt4) -> Int4Weight:
        ints = m.ints.reshape(m.ints.shape[0], -1).numpy().astype(np.uint8) & 0xF
        rows, cols = ints.shape
        packed = (ints.reshape(-1)[0::2] | (ints.reshape(-1)[1::2] << 4)).astype(np.uint8)
        return Int4Weight(rows=rows, cols=cols, block=32, packed=packed, scale=m.scale.numpy(), zero_point=None,
                          weight=m.weight().detach().numpy())

    onnx_int.register_onnx_lowering(_ToyInt4, onnx_int.OnnxLowering(float_module=as_linear, int4_weight=as_int4))
    onnx_int.register_integer_scheme(
        lambda model: onnx_int.IntegerScheme(mode="toy", kind="int4")
        if any(isinstance(m, _ToyInt4) for m in model.modules()) else None
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(_ToyInt4(64, 64), torch.nn.ReLU(), _ToyInt4(16, 64)).eval()
    x = torch.randn(2, 64)
    result = ts.export(model, x, tmp_path / "toy.onnx", format="onnx-int8")
    ops = [n.op_type for n in onnx.load(str(result.path)).graph.node]
    assert result.info["quantized"] == "toy" and ops.count("MatMulNBits") == 2 and "MatMul" not in ops
    assert result.parity.ok, result.parity.summary()


def test_quantize_export_onnx_is_a_deprecated_name_of_the_one_writer(tmp_path, static_cnn):
    from torchslim.quantize import export_onnx

    model, calib = static_cnn
    with pytest.warns(DeprecationWarning, match="export_integer_onnx"):
        files = export_onnx(model, (calib[0][:1],), tmp_path / "m.onnx", calibration=calib)
    ops = {n.op_type for n in onnx.load(files["onnx"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and (tmp_path / "m.fp32.onnx").is_file()
