"""Real int4 ONNX (MatMulNBits / GatherBlockQuantized) and QuantizedEmbedding: numbers vs torch, bytes, structure."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from torchslim.errors import ConfigError
from torchslim.export.onnx import export_fp32
from torchslim.export.onnx_int import export_integer_onnx, float_twin, write_int4_onnx
from torchslim.quantize.embedding import QuantizedEmbedding, float_embedding
from torchslim.quantize.primitives import QScheme
from torchslim.quantize.weight_only import QuantizedLinear

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

torch.set_num_threads(1)

G32 = QScheme(bits=4, granularity="group", group_size=32)
ASYM32 = QScheme(bits=4, granularity="group", group_size=32, symmetric=False, signed=False)


class Net(nn.Module):
    """Embedding -> Linear -> GELU -> Linear (the layers may be swapped for quantized ones)."""

    def __init__(self, vocab: int = 300, d: int = 64, hidden: int = 96, out: int = 32, bias: bool = True) -> None:
        super().__init__()
        self.emb: nn.Module = nn.Embedding(vocab, d)
        self.l1: nn.Module = nn.Linear(d, hidden, bias=bias)
        self.act = nn.GELU()
        self.l2: nn.Module = nn.Linear(hidden, out, bias=bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.l2(self.act(self.l1(self.emb(idx))))


def _quantize(net: Net, s1: QScheme = G32, s2: QScheme = G32, se: QScheme | None = G32) -> Net:
    net.l1 = QuantizedLinear.from_float(net.l1, s1)
    net.l2 = QuantizedLinear.from_float(net.l2, s2)
    if se is not None:
        net.emb = QuantizedEmbedding.from_float(net.emb, se)
    return net.eval()


def _twin(model: nn.Module) -> nn.Module:
    twin = float_twin(model)
    for name, m in list(twin.named_children()):
        if isinstance(m, QuantizedEmbedding):
            setattr(twin, name, float_embedding(m))
    return twin


def _export(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path, dynamo: bool) -> Path:
    twin = _twin(model)
    if dynamo:
        export_fp32(twin, example, path)
    else:
        torch.onnx.export(twin, example, str(path), dynamo=False, opset_version=21)
    return path


def _ort(path: Path, *xs: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})[0]


def _rel_err(out: np.ndarray, ref: torch.Tensor) -> float:
    ref_np = ref.detach().numpy()
    return float(np.abs(out - ref_np).max() / np.abs(ref_np).max())


def _float_weight_readers(path: Path) -> list[str]:
    """Op types of the standard-domain nodes that read a 2-D float initializer (a weight left in
    float; the int4 ops' 2-D float inputs are their scales)."""
    graph = onnx.load(str(path)).graph
    floats = {i.name for i in graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(i.dims) == 2}
    return [n.op_type for n in graph.node if n.domain != "com.microsoft" and any(x in floats for x in n.input)]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_int4_onnx_matches_torch_quantized(tmp_path: Path, dynamo: bool, bias: bool) -> None:
    model = _quantize(Net(bias=bias), s2=ASYM32)
    idx = torch.randint(0, 300, (3, 7))
    fp32 = _export(model, (idx,), tmp_path / "m.fp32.onnx", dynamo)
    report = write_int4_onnx(model, fp32, tmp_path / "m.onnx")
    assert report["matmul_nbits"] == ["l1", "l2"]
    assert report["gather_block_quantized"] == ["emb"]
    assert report["left_float"] == []

    proto = onnx.load(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("GatherBlockQuantized") == 1
    assert "MatMul" not in ops and "Gemm" not in ops and "Gather" not in ops
    assert _float_weight_readers(tmp_path / "m.onnx") == []
    assert any(o.domain == "com.microsoft" for o in proto.opset_import)
    nodes = {n.op_type + str(len(n.input)): n for n in proto.graph.node}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes["MatMulNBits3"].attribute}
    assert attrs == {"K": 64, "N": 96, "bits": 4, "block_size": 32, "accuracy_level": 0}  # l1: symmetric, default zero point 8
    assert "MatMulNBits4" in nodes  # l2: asymmetric, zero_points input
    inits = {i.name: i for i in proto.graph.initializer}
    b = inits[nodes["MatMulNBits3"].input[1]]
    assert b.data_type == onnx.TensorProto.UINT8 and list(b.dims) == [96, 2, 16]
    gbq = nodes["GatherBlockQuantized3"]
    assert inits[gbq.input[0]].data_type == onnx.TensorProto.INT4 and list(inits[gbq.input[0]].dims) == [300, 64]
    assert list(inits[gbq.input[2]].dims) == [300, 2]

    with torch.no_grad():
        ref = model(idx)
    assert _rel_err(_ort(tmp_path / "m.onnx", idx), ref) < 1e-4
    # the file holds torchslim's integers: the int4 data equals the QuantizedEmbedding's
    data = numpy_helper.to_array(inits[gbq.input[0]]).astype(np.int32)
    assert np.array_equal(data, model.emb._int_rows(None).numpy())


def test_gemm_alpha_beta_and_transpose_forms(tmp_path: Path) -> None:
    """Gemm's alpha / beta * C are kept (Mul, Add); a MatMul reading Transpose(W) is matched too."""
    torch.manual_seed(1)
    q = QuantizedLinear.from_float(nn.Linear(64, 48), G32)
    w = q.dequantized_weight().detach().numpy()
    bias = q.bias.detach().numpy()
    h = onnx.helper
    x_info = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 64])
    y_infos = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y_gemm", "y_mm")]
    nodes = [
        h.make_node("Gemm", ["x", "W", "C"], ["y_gemm"], alpha=0.5, beta=2.0, transB=1),
        h.make_node("Transpose", ["W2"], ["W2t"], perm=[1, 0]),
        h.make_node("MatMul", ["x", "W2t"], ["y_mm"]),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "C"), numpy_helper.from_array(w.copy(), "W2")]
    graph = h.make_graph(nodes, "g", [x_info], y_infos, inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]), str(tmp_path / "f.onnx"))

    report = write_int4_onnx(q, tmp_path / "f.onnx", tmp_path / "q.onnx")
    assert report["matmul_nbits"] == [""] and report["left_float"] == []
    proto = onnx.load(str(tmp_path / "q.onnx"))
    assert sorted(n.op_type for n in proto.graph.node) == ["Add", "MatMulNBits", "MatMulNBits", "Mul"]
    assert not {"W", "W2"} & {i.name for i in proto.graph.initializer}  # float weights gone
    x = torch.randn(5, 64)
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    y_gemm, y_mm = sess.run(["y_gemm", "y_mm"], {"x": x.numpy()})
    with torch.no_grad():
        lin = F.linear(x, q.dequantized_weight())
    assert _rel_err(y_gemm, 0.5 * lin + 2.0 * q.bias.detach()) < 1e-4
    assert _rel_err(y_mm, lin) < 1e-4


def test_int4_file_is_5x_smaller(tmp_path: Path) -> None:
    model = _quantize(Net(vocab=2000, d=256, hidden=1024, out=256))
    idx = torch.randint(0, 2000, (2, 9))
    fp32 = _export(model, (idx,), tmp_path / "big.fp32.onnx", dynamo=True)
    report = write_int4_onnx(model, fp32, tmp_path / "big.onnx")
    assert report["left_float"] == []
    ratio = os.path.getsize(fp32) / os.path.getsize(tmp_path / "big.onnx")
    assert ratio >= 5.0, ratio
    with torch.no_grad():
        ref = model(idx)
    assert _rel_err(_ort(tmp_path / "big.onnx", idx), ref) < 1e-4


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_ineligible_layers_stay_float_and_compute_right(tmp_path: Path, dynamo: bool) -> None:
    g24 = QScheme(bits=4, granularity="group", group_size=24)  # 24 divides K=96 but is no power of two
    g8 = QScheme(bits=4, granularity="group", group_size=8)  # below ONNX Runtime's minimum block of 16
    model = _quantize(Net(), s1=QScheme(bits=8, granularity="channel"), s2=g24, se=g8)
    idx = torch.randint(0, 300, (2, 5))
    fp32 = _export(model, (idx,), tmp_path / "m.fp32.onnx", dynamo)
    report = write_int4_onnx(model, fp32, tmp_path / "m.onnx")
    assert report["matmul_nbits"] == [] and report["gather_block_quantized"] == []
    assert report["left_float"] == ["emb", "l1", "l2"]
    assert "power of two" in report["why_float"]["l2"] and "int8" in report["why_float"]["l1"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "MatMulNBits" not in ops and "GatherBlockQuantized" not in ops
    with torch.no_grad():
        ref = model(idx)
    assert _rel_err(_ort(tmp_path / "m.onnx", idx), ref) < 1e-4

    # mixed: only the eligible layer ships as int4, the rest keeps computing in float
    mixed = _quantize(Net(), s2=g24, se=QScheme(bits=8, granularity="group", group_size=32))
    fp32 = _export(mixed, (idx,), tmp_path / "x.fp32.onnx", dynamo)
    report = write_int4_onnx(mixed, fp32, tmp_path / "x.onnx")
    assert report["matmul_nbits"] == ["l1"] and report["left_float"] == ["emb", "l2"]
    readers = _float_weight_readers(tmp_path / "x.onnx")  # the int8 table and l2 (MatMul or Gemm) stay float
    assert sorted(readers) in (["Gather", "MatMul"], ["Gather", "Gemm"])
    with torch.no_grad():
        ref = mixed(idx)
    assert _rel_err(_ort(tmp_path / "x.onnx", idx), ref) < 1e-4


def test_layer_not_in_graph_is_reported(tmp_path: Path) -> None:
    model = _quantize(Net(), se=None)
    idx = torch.randint(0, 300, (2, 5))
    other = _quantize(Net())  # different weights: nothing of `model` is in this graph
    fp32 = _export(other, (idx,), tmp_path / "o.fp32.onnx", dynamo=False)
    report = write_int4_onnx(model, fp32, tmp_path / "o.onnx")
    assert report["matmul_nbits"] == [] and report["left_float"] == ["l1", "l2"]
    assert "not found" in report["why_float"]["l1"]
    assert [n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node] == [
        n.op_type for n in onnx.load(str(fp32)).graph.node
    ]


class TiedLM(nn.Module):
    """Embedding whose table is also the output head (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb: nn.Module = nn.Embedding(300, 64)
        self.mix = nn.Linear(64, 64)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        table = self.emb.dequantized_weight() if isinstance(self.emb, QuantizedEmbedding) else self.emb.weight
        return F.linear(torch.tanh(self.mix(self.emb(idx))), table)


def test_tied_table_serves_gather_and_matmul(tmp_path: Path) -> None:
    model = TiedLM()
    model.emb = QuantizedEmbedding.from_float(model.emb, G32)
    model.eval()
    idx = torch.randint(0, 300, (2, 6))
    fp32 = _export(model, (idx,), tmp_path / "t.fp32.onnx", dynamo=False)
    report = write_int4_onnx(model, fp32, tmp_path / "t.onnx")
    assert report["gather_block_quantized"] == ["emb"] and report["matmul_nbits"] == ["emb"]
    assert report["left_float"] == []  # (mix is a plain float Linear, not a quantized layer)
    graph = onnx.load(str(tmp_path / "t.onnx")).graph
    assert not any(tuple(i.dims) in ((300, 64), (64, 300)) and i.data_type == onnx.TensorProto.FLOAT for i in graph.initializer)
    with torch.no_grad():
        ref = model(idx)
    assert _rel_err(_ort(tmp_path / "t.onnx", idx), ref) < 1e-4


# --------------------------------------------------------------------------- QuantizedEmbedding


@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_round_trip_within_half_step(bits: int) -> None:
    emb = nn.Embedding(300, 64, padding_idx=3)
    with torch.no_grad():
        emb.weight[7] *= 1e-6  # a tiny row (fp16 subnormal scales)
        emb.weight[11, :32] = 0.0  # an all-zero group
    q = QuantizedEmbedding.from_float(emb, QScheme(bits=bits, granularity="group", group_size=32))
    assert q.qweight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert q.qweight.numel() == (300 * 64 // 2 if bits == 4 else 300 * 64)
    assert q.scale.dtype == torch.float16 and tuple(q.scale.shape) == (300, 2)
    w = emb.weight.detach()
    deq = q.dequantized_weight()
    step = q.scale.float().repeat_interleave(32, dim=1)
    assert bool(((deq - w).abs() <= step / 2 * (1 + 1e-5)).all())
    assert torch.equal(deq[3], torch.zeros(64)) and torch.equal(deq[11, :32], torch.zeros(32))
    assert float((deq[7] - w[7]).abs().max()) < 0.1 * float(w[7].abs().max())  # tiny rows keep their shape
    # the max |x| of each group is reached by an integer of the full range (the scale is not wasted)
    ints = q._int_rows(None).reshape(300, 2, 32).abs().amax(-1)
    assert int(ints[0].min()) >= 2 ** (bits - 1) - 1


@pytest.mark.parametrize(("dim", "group"), [(64, 16), (45, 15)], ids=["even", "odd-row"])
def test_embedding_forward_gathers_rows(dim: int, group: int) -> None:
    emb = nn.Embedding(50, dim)
    q = QuantizedEmbedding.from_float(emb, QScheme(bits=4, granularity="group", group_size=group))
    idx = torch.tensor([[0, 49, 7], [7, 3, -1]])
    out = q(idx)
    assert out.shape == (2, 3, dim) and out.dtype == torch.float32
    assert torch.equal(out, q.dequantized_weight()[idx])
    assert torch.equal(out, float_embedding(q)(idx % 50))


def test_state_dict_into_empty_structure(tmp_path: Path) -> None:
    model = _quantize(Net(), s2=ASYM32)
    model.emb.padding_idx = None
    idx = torch.randint(0, 300, (4, 5))
    with torch.no_grad():
        ref = model(idx)
    torch.save(model.state_dict(), tmp_path / "sd.pt")

    empty = Net()
    empty.emb = QuantizedEmbedding(300, 64, G32, padding_idx=None)
    empty.l1 = QuantizedLinear(64, 96, True, G32)
    empty.l2 = QuantizedLinear(96, 32, True, ASYM32)
    assert not torch.equal(empty.eval()(idx), ref)
    empty.load_state_dict(torch.load(tmp_path / "sd.pt"), strict=True)
    with torch.no_grad():
        assert torch.equal(empty(idx), ref)
    assert set(model.emb.state_dict()) == {"qweight", "scale"}


@pytest.mark.parametrize(
    ("scheme", "match"),
    [
        (QScheme(bits=4, granularity="group", group_size=48), "does not divide embedding_dim=64"),
        (QScheme(bits=2, granularity="group", group_size=32), "bits must be 4 or 8"),
        (QScheme(bits=4, granularity="channel"), "granularity='group'"),
        (QScheme(bits=4, granularity="group", group_size=32, symmetric=False), "symmetric signed"),
    ],
)
def test_bad_embedding_scheme_is_a_config_error(scheme: QScheme, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QuantizedEmbedding(300, 64, scheme)
    with pytest.raises(ConfigError, match=match):
        QuantizedEmbedding.from_float(nn.Embedding(300, 64), scheme)


def test_accuracy_level_4_stays_close_and_bad_level_is_refused(tmp_path: Path) -> None:
    model = _quantize(Net(bias=True), s2=ASYM32)
    idx = torch.randint(0, 300, (3, 7))
    fp32 = _export(model, (idx,), tmp_path / "m.fp32.onnx", True)
    write_int4_onnx(model, fp32, tmp_path / "m.onnx", accuracy_level=4)
    levels = {a.i for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    with torch.no_grad():
        ref = model(idx)
    got = torch.from_numpy(_ort(tmp_path / "m.onnx", idx))
    # int8 activations inside the kernel: close to the float-compute result, not equal
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    with pytest.raises(ConfigError, match="accuracy_level"):
        write_int4_onnx(model, fp32, tmp_path / "x.onnx", accuracy_level=7)


def test_quantize_api_embeddings_flag_ships_int4_onnx(tmp_path: Path) -> None:
    from torchslim.quantize import QuantConfig, quantize_

    torch.manual_seed(0)
    model = Net(bias=True).eval()
    idx = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        ref = model(idx)
    with pytest.raises(ConfigError, match="embeddings"):
        QuantConfig(mode="dynamic", embeddings=True)
    plan = quantize_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=32, embeddings=True))
    assert plan.embeddings == ["emb"] and isinstance(model.emb, QuantizedEmbedding)
    files = export_integer_onnx(model, (idx[:1],), tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(files["onnx"]).graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("GatherBlockQuantized") == 1
    assert os.path.getsize(files["onnx_fp32"]) > 4 * os.path.getsize(files["onnx"])
    got = torch.from_numpy(_ort(Path(files["onnx"]), idx))
    with torch.no_grad():
        q = model(idx)
    assert (got - q).abs().max().item() < 0.05 * q.abs().max().item()  # int8 compute inside MatMulNBits
    assert (q - ref).abs().max().item() < 0.2 * ref.abs().max().item()


def test_int4_embeddings_save_load_replays(tmp_path: Path) -> None:
    import torchslim as ts
    from torchslim.quantize import QuantConfig, quantize_

    src = tmp_path / "tiny.py"
    src.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(300, 64)\n"
        "        self.fc = torch.nn.Linear(64, 8)\n"
        "    def forward(self, idx):\n"
        "        return self.fc(self.emb(idx))\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return Net()\n"
        "def example_inputs():\n"
        "    return (torch.randint(0, 300, (1, 5)),)\n"
    )
    model = ts.create_model(f"{src}:build")
    quantize_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=32, embeddings=True))
    ts.save(model, tmp_path / "saved")
    loaded = ts.load(tmp_path / "saved")
    assert isinstance(loaded.emb, QuantizedEmbedding)
    idx = torch.randint(0, 300, (3, 6))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


@pytest.mark.parametrize("compute,level", [("int8", 4), ("float", 0)])
def test_compute_type_ships_as_its_accuracy_level_and_equals_torch(tmp_path: Path, compute: str, level: int) -> None:
    """compute="int8" rounds each layer's input to int8 per group in torch (int8_blocks), which is
    what MatMulNBits computes at accuracy_level 4: the file gets level 4 and equals the torch model
    to float rounding; compute="float" gets level 0 and equals it too. Forcing the other level
    gives a visibly different result (the check can fail)."""
    from torchslim.quantize import QuantConfig, quantize_

    torch.manual_seed(0)
    model = Net(bias=True).eval()
    quantize_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=32, compute=compute))
    assert {m.act_block for m in model.modules() if isinstance(m, QuantizedLinear)} == {32 if compute == "int8" else 0}
    idx = torch.randint(0, 300, (3, 7))
    fp32 = _export(model, (idx,), tmp_path / "m.fp32.onnx", True)
    write_int4_onnx(model, fp32, tmp_path / "m.onnx")
    levels = {a.i for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {level}
    with torch.no_grad():
        ref = model(idx)
    scale = ref.abs().max().item()
    assert (torch.from_numpy(_ort(tmp_path / "m.onnx", idx)) - ref).abs().max().item() < 1e-5 * scale
    write_int4_onnx(model, fp32, tmp_path / "other.onnx", accuracy_level=4 - level)
    assert (torch.from_numpy(_ort(tmp_path / "other.onnx", idx)) - ref).abs().max().item() > 1e-4 * scale
