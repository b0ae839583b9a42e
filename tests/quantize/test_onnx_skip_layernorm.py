"""The integer ONNX files keep ``Add`` + ``LayerNormalization`` apart (ONNX Runtime's fused CPU
``SkipLayerNormalization`` is slower than the pair): the pass rewrites exactly the adds that
feed a LayerNormalization alone, the outputs stay the same, and ORT no longer fuses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from torchslim.export.onnx_int import export_integer_onnx
from torchslim.quantize import QuantConfig, quantize_

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from torchslim.export.onnx_passes import avoid_skip_layernorm_fusion  # noqa: E402
from torchslim.quantize.onnx_lowering import onnx_parity  # noqa: E402


def _fused_ops(path, tmp_path) -> list[str]:
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def _run(path, feed) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def _graph(tmp_path):
    """x + r -> LayerNorm (rewritten); (x + r2 -> LayerNorm and output) (two readers: kept);
    x + r -> Relu (not a LayerNorm: kept)."""
    c = 16
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "t", c]) for n in ("x", "r", "r2", "y1", "y2", "s2", "y3")]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.random(c, dtype=np.float32) + 0.5, n) for n in ("g", "b")]
    nodes = [
        helper.make_node("Add", ["x", "r"], ["s1"]),
        helper.make_node("LayerNormalization", ["s1", "g", "b"], ["y1"], axis=-1, epsilon=1e-5),
        helper.make_node("Add", ["x", "r2"], ["s2"]),
        helper.make_node("LayerNormalization", ["s2", "g", "b"], ["y2"], axis=-1, epsilon=1e-5),
        helper.make_node("Add", ["r", "r2"], ["s3"]),
        helper.make_node("Relu", ["s3"], ["y3"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", io[:3], io[3:], inits), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    feed = {k: rng.standard_normal((2, 5, c), dtype=np.float32) for k in ("x", "r", "r2")}
    return path, feed


def test_pass_rewrites_only_adds_read_by_a_layernorm_alone(tmp_path) -> None:
    path, feed = _graph(tmp_path)
    before = _run(path, feed)
    assert "SkipLayerNormalization" in _fused_ops(path, tmp_path)
    assert avoid_skip_layernorm_fusion(path) == 1
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ["Sum", "LayerNormalization", "Add", "LayerNormalization", "Add", "Relu"]
    after = _run(path, feed)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # the add whose sum is also a graph output is still fused by ORT; the rewritten one is not
    assert _fused_ops(path, tmp_path).count("SkipLayerNormalization") <= 1
    assert avoid_skip_layernorm_fusion(path) == 0  # idempotent, file left alone


class _PostLN(nn.Module):
    """Two post-LN residual blocks (BERT's layout): LayerNorm(x + Linear(x))."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c), nn.Linear(c, c)
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x + self.fc1(x))
        return self.ln2(h + self.fc2(h))


def test_dynamic_int8_export_keeps_residual_layernorms_unfused(tmp_path) -> None:
    torch.manual_seed(0)
    model = _PostLN().eval()
    quantize_(model, QuantConfig(mode="dynamic"))
    x = torch.randn(4, 10, 32)
    files = export_integer_onnx(model, (x[:1],), tmp_path / "m.onnx")
    fp32_ops = [n.op_type for n in onnx.load(files["onnx_fp32"]).graph.node]
    int8_ops = [n.op_type for n in onnx.load(files["onnx"]).graph.node]
    assert "Sum" not in fp32_ops  # the float file keeps the plain graph
    assert int8_ops.count("Sum") == 2
    assert "SkipLayerNormalization" in _fused_ops(files["onnx_fp32"], tmp_path)
    assert "SkipLayerNormalization" not in _fused_ops(files["onnx"], tmp_path)
    parity = onnx_parity(model, files, x)
    assert parity["int8_vs_torch_quantized_db"] > 25


def test_pass_leaves_external_weights_in_place(tmp_path) -> None:
    """Weights stored beside the graph (large models) are not loaded or moved by the pass."""
    c = 256
    rng = np.random.default_rng(0)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "t", c]) for n in ("x", "y")]
    inits = [numpy_helper.from_array(rng.random((c, c), dtype=np.float32), "w"),
             numpy_helper.from_array(np.ones(c, np.float32), "g"), numpy_helper.from_array(np.zeros(c, np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "x"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1)]
    model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], inits), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    data_bytes = (tmp_path / "m.data").read_bytes()
    feed = {"x": rng.standard_normal((2, 3, c), dtype=np.float32)}
    before = _run(path, feed)[0]
    assert avoid_skip_layernorm_fusion(path) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".onnx", ".data")) == ["m.data", "m.onnx"]
    assert (tmp_path / "m.data").read_bytes() == data_bytes
    assert path.stat().st_size < 10_000  # the graph alone: the weights were not inlined
    np.testing.assert_allclose(_run(path, feed)[0], before, rtol=1e-3, atol=1e-3)
