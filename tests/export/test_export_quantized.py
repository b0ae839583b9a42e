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
