"""ts.export's contract: validation before any work, model untouched, results serialisable."""

from __future__ import annotations

import json

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.export import ExportError, export, list_formats


@pytest.fixture(scope="module")
def lenet():
    return ts.create_model("zoo:lenet300")


def test_formats_are_listed():
    assert {"onnx", "torchscript", "pt2"} <= set(list_formats())


@pytest.mark.parametrize(
    ("name", "fmt", "match"),
    [
        ("m.tflite", None, "cannot tell the export format"),
        ("m.onnx", "tflite", "not supported; allowed: .*onnx"),
        ("m.pt2", "onnx", "suffix of format 'pt2'"),
        ("missing/m.onnx", None, "does not exist"),
    ],
)
def test_bad_path_or_format_is_config_error_and_writes_nothing(tmp_path, lenet, name, fmt, match):
    with pytest.raises(ConfigError, match=match):
        export(lenet, path=tmp_path / name, format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_directory_path_and_bad_options_are_config_errors(tmp_path, lenet):
    with pytest.raises(ConfigError, match="is a directory"):
        export(lenet, path=tmp_path, format="onnx")
    with pytest.raises(ConfigError, match="random_inputs"):
        export(lenet, path=tmp_path / "m.pt", random_inputs=-1)
    with pytest.raises(ConfigError, match="opset"):
        export(lenet, path=tmp_path / "m.onnx", opset=3)
    with pytest.raises(ConfigError, match="Tolerance.atol"):
        export(lenet, path=tmp_path / "m.pt", tolerance=-1.0)
    with pytest.raises(TypeError):
        export("resnet", path=tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_model_modes_and_weights_are_untouched(tmp_path, lenet):
    lenet.train()
    lenet.fc1.eval()  # a deliberate mix of modes survives
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    result = export(lenet, path=tmp_path / "m.pt")
    assert lenet.training and not lenet.fc1.training and lenet.fc2.training
    assert all(torch.equal(before[k], v) for k, v in lenet.state_dict().items())
    lenet.eval()
    assert result.parity.ok


def test_result_is_json_serialisable(tmp_path, lenet):
    result = export(lenet, path=tmp_path / "m.pt", random_inputs=0)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["format"] == "torchscript" and d["parity"]["ok"] is True and len(d["parity"]["cases"]) == 1
    assert d["sizes"]["model"] == (tmp_path / "m.pt").stat().st_size == result.size_bytes
    assert "torchscript: ok over 1 input sets" in result.summary()


def test_check_false_skips_parity(tmp_path, lenet):
    result = export(lenet, path=tmp_path / "m.pt", check=False)
    assert result.parity is None and result.path.is_file()


def test_model_without_tensor_outputs_is_export_error(tmp_path):
    class Shape(torch.nn.Module):
        def forward(self, x):
            return list(x.shape)

    with pytest.raises(ExportError, match="holds no tensors"):
        export(Shape(), (torch.randn(1, 4),), tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_keyword_inputs_round_trip(tmp_path):
    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)

        def forward(self, ids, scale=None):
            return self.emb(ids).mean(1) * scale

    inputs = {"ids": torch.randint(0, 50, (1, 6)), "scale": torch.full((1, 1), 2.0)}
    for suffix in ("pt", "pt2"):
        result = export(TwoInputs().eval(), inputs, tmp_path / f"k.{suffix}")
        assert result.parity.ok
