"""ONNX export: round trips through ONNX Runtime, dynamic batch, failures named, nothing left behind."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.export import ExportError, export

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def resnet20(tmp_path_factory):
    model = ts.create_model("zoo:resnet20")
    path = tmp_path_factory.mktemp("onnx") / "resnet20.onnx"
    return model, export(model, path=path)


def test_zoo_model_round_trips_with_dynamo_exporter(resnet20):
    _, result = resnet20
    assert result.format == "onnx"
    assert result.parity is not None and result.parity.ok
    assert result.parity.max_abs <= 1e-4
    assert len(result.parity.cases) == 3  # the example and two random input sets
    assert result.info["exporter"] == "dynamo" and result.info["opset"] == 18
    assert result.info["dynamic_batch"] is True
    # weights in the one file: no external data beside it
    assert list(result.files) == ["model"] and result.info["external_data"] is False
    proto = onnx.load(str(result.path), load_external_data=False)
    assert any(op.domain in ("", "ai.onnx") and op.version == 18 for op in proto.opset_import)
    assert result.sizes["model"] == result.path.stat().st_size > 1_000_000  # 270k float params


def test_dynamic_batch_runs_batch_1_and_3(resnet20):
    model, result = resnet20
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert not isinstance(inp.shape[0], int)  # a symbolic batch dimension
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        (got,) = session.run(None, {inp.name: x.numpy()})
        with torch.no_grad():
            want = model(x)
        assert got.shape == (batch, 10)
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_torchvision_model_round_trips(tmp_path):
    model = ts.create_model("torchvision:resnet18", num_classes=10)
    ts.set_example_inputs(model, torch.randn(1, 3, 64, 64))
    result = export(model, path=tmp_path / "resnet18.onnx", random_inputs=1)
    assert result.parity.ok and result.parity.max_rel < 1e-4
    assert result.info["exporter"] == "dynamo"


def test_onnx_runs_in_a_process_without_torch(resnet20):
    from torchslim.export._isolated import load_onnx_isolated
    from torchslim.export.parity import Tolerance, check_parity
    from torchslim.graph.inputs import as_inputs

    model, result = resnet20
    report = check_parity(model, load_onnx_isolated(result.path), as_inputs(ts.example_inputs(model)),
                          format="onnx-isolated", tolerance=Tolerance(1e-4, 1e-4), random_cases=0)
    assert report.ok and report.max_abs < 1e-4


def test_opset_is_stated_and_static_batch_on_request(tmp_path):
    model = ts.create_model("zoo:lenet300")
    result = export(model, path=tmp_path / "m.onnx", opset=19, dynamic_batch=False, random_inputs=1)
    proto = onnx.load(str(result.path))
    assert {op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")} == {19}
    assert result.info["dynamic_batch"] is False
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1


class _Svd(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.svdvals(x)


def test_unexportable_op_names_format_and_op_and_leaves_no_file(tmp_path):
    with pytest.raises(ExportError) as err:
        export(_Svd(), (torch.randn(4, 4),), tmp_path / "svd.onnx", random_inputs=0)
    msg = str(err.value)
    assert msg.startswith("onnx export of _Svd failed")
    assert "svd" in msg and "failing op" in msg
    assert err.value.format == "onnx"
    assert list(tmp_path.iterdir()) == []  # no partial file, no staging directory
