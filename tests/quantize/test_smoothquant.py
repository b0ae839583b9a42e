"""SmoothQuant scale migration (QuantConfig(smoothquant_alpha=...)): float outputs unchanged,
int8 SQNR better on activations with outlier channels, save/load and ONNX round trips, bad input."""

from __future__ import annotations

import copy
from typing import Any

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
    done, folded = smooth_linears_(m, {"fc1": m.fc1, "fc2": m.fc2}, calib, 4, alpha=0.5)
    assert done == ["fc1", "fc2"] and folded == {}
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
    from torchslim.export.onnx_int import export_integer_onnx
    from torchslim.quantize.onnx_lowering import onnx_parity

    model = ts.create_model("zoo:lenet300", data="mnist")
    calib = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    quantize_(model, QuantConfig(mode="static", smoothquant_alpha=0.5), calibration=calib)
    ts.save(model, tmp_path / "q")
    loaded = ts.load(tmp_path / "q")
    x = calib[0][:4]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    files = export_integer_onnx(model, (x[:1],), tmp_path / "m.onnx", calibration=calib)
    parity = onnx_parity(model, files, x)
    assert parity["fp32_vs_torch_float_db"] > 60
    assert parity["int8_vs_torch_quantized_db"] > 20


def test_smoothquant_bad_input_leaves_model_unchanged() -> None:
    with pytest.raises(ConfigError, match="smoothquant_alpha"):
        QuantConfig(mode="static", smoothquant_alpha=1.5)
    with pytest.raises(ConfigError, match="smoothquant_alpha"):
        QuantConfig(mode="weight-only", smoothquant_alpha=0.5)
    model, _, _ = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="calibration"):
        quantize_(model, QuantConfig(mode="qat", smoothquant_alpha=0.5))
    with pytest.raises(ConfigError, match="calibration"):
        quantize_(model, QuantConfig(mode="dynamic", smoothquant_alpha=0.5))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert QuantConfig.from_dict(QuantConfig(smoothquant_alpha=0.5).to_dict()) == QuantConfig(smoothquant_alpha=0.5)


class _Siblings(nn.Module):
    """Q, K and V reading one tensor with outlier channels, then an output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.o = nn.Linear(64, 16)
        gain = torch.ones(64)
        gain[[5, 33]] = 40.0
        self.register_buffer("gain", gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.gain
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8.0, dim=-1)
        return self.o(a @ self.v(h))


def _dynamic_pair(model: nn.Module, **smoothing: float) -> tuple[Any, ...]:
    """``model`` quantized dynamic int8 twice, plain and with SmoothQuant; with the calibration
    batches, held-out inputs, float reference outputs and the smoothed copy's plan."""
    calib = [torch.randn(8, 12, 64) for _ in range(4)]
    x = torch.randn(16, 12, 64)
    with torch.no_grad():
        ref = model(x)
    plain, smooth = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(plain, QuantConfig(mode="dynamic"))
    plan = quantize_(smooth, QuantConfig(mode="dynamic", **smoothing), calibration=calib)
    return calib, x, ref, plain, smooth, plan


def test_dynamic_smoothquant_improves_sqnr_and_shares_sibling_scales() -> None:
    torch.manual_seed(0)
    model = _Siblings().eval()
    calib, x, ref, plain, smooth, plan = _dynamic_pair(model, smoothquant_alpha=0.75)
    # Q, K and V read the same tensor: one scale for the three; the output projection's input
    # has no outlier channels, smoothing would not pay for its multiply there
    assert plan.smoothed == ["q", "k", "v"] and not hasattr(smooth.o, "smooth_scale")
    assert torch.equal(smooth.q.smooth_scale, smooth.k.smooth_scale) and torch.equal(smooth.q.smooth_scale, smooth.v.smooth_scale)
    forced = copy.deepcopy(model)
    layers = {n: getattr(forced, n) for n in ("q", "k", "v", "o")}
    assert smooth_linears_(forced, layers, calib, 4, alpha=0.75, min_gain=0) == (["q", "k", "v", "o"], {})
    assert not torch.equal(forced.q.smooth_scale, forced.o.smooth_scale)
    with torch.no_grad():
        gain = sqnr(ref, smooth(x)) - sqnr(ref, plain(x))
    assert gain > 3.0  # dB


def test_dynamic_smoothquant_save_load_and_onnx_has_one_shared_scaling(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from torchslim.export.onnx_int import export_integer_onnx
    from torchslim.quantize.onnx_lowering import onnx_parity

    torch.manual_seed(0)
    model = _Siblings().eval()
    calib = [torch.randn(8, 12, 64) for _ in range(4)]
    quantize_(model, QuantConfig(mode="dynamic", smoothquant_alpha=0.75), calibration=calib)
    x = calib[0][:2]
    files = export_integer_onnx(model, (x[:1],), tmp_path / "m.onnx")
    g = onnx.load(files["onnx_fp32"]).graph
    # the smoothing of Q, K and V is one Mul by a per-channel constant, not 3 (merged on export)
    scaled = [n for n in g.node if n.op_type in ("Mul", "Div") and "gain" not in n.input
              and any(i.name in n.input and len(i.dims) == 1 and i.dims[0] == 64 for i in g.initializer)]
    assert len(scaled) == 1
    parity = onnx_parity(model, files, x)
    assert parity["fp32_vs_torch_float_db"] > 60
    assert parity["int8_vs_torch_quantized_db"] > 25


def test_dynamic_smoothquant_save_load(tmp_path) -> None:
    model = ts.create_model("zoo:lenet300", data="mnist")
    calib = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    plan = quantize_(model, QuantConfig(mode="dynamic", smoothquant_alpha=0.6, smoothquant_min_gain=0), calibration=calib)
    assert plan.smoothed
    ts.save(model, tmp_path / "q")
    loaded = ts.load(tmp_path / "q")
    x = calib[0][:4]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class _Block(nn.Module):
    """A pre-LN block (ViT / GPT layout: each LayerNorm feeds only its Linears) followed by a
    post-LN one (BERT layout: the LayerNorm's output also feeds the residual). The norms' gains
    give their outputs outlier channels."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.post = nn.Linear(c, c)
        with torch.no_grad():
            for ln in (self.ln1, self.ln2, self.ln3):
                ln.weight[[4, 20, 50]] = 30.0
                ln.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8.0, dim=-1)
        x = x + self.o(a @ self.v(h))
        x = x + self.fc2(torch.relu(self.fc1(self.ln2(x))))
        y = self.ln3(x)
        return y + self.post(y)  # post-LN: y is read by the Linear and by the residual


def test_smoothing_folds_into_a_layernorm_that_feeds_only_its_linears(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from torchslim.export.onnx_int import export_integer_onnx
    from torchslim.quantize.onnx_lowering import onnx_parity

    torch.manual_seed(0)
    model = _Block().eval()
    calib, x, ref, plain, smooth, plan = _dynamic_pair(model, smoothquant_alpha=0.75, smoothquant_min_gain=1.25)
    # ln1 -> q/k/v and ln2 -> fc1 fold (free); ln3 also feeds the residual: the fold is undone
    # and post gets a multiply instead
    assert plan.smoothed_into_norm == {"q": "ln1", "k": "ln1", "v": "ln1", "fc1": "ln2"}
    assert "post" in plan.smoothed and not set(plan.smoothed) & set(plan.smoothed_into_norm)
    assert torch.equal(smooth.ln3.weight, model.ln3.weight) and torch.equal(smooth.ln3.bias, model.ln3.bias)
    assert not torch.equal(smooth.ln1.weight, model.ln1.weight)
    assert not any(hasattr(getattr(smooth, n), "smooth_scale") for n in ("q", "k", "v", "fc1"))
    with torch.no_grad():
        assert sqnr(ref, smooth(x)) - sqnr(ref, plain(x)) > 3.0  # dB
    # float outputs unchanged by the folds (the float twin of the quantized model is exported)
    folded = copy.deepcopy(model)
    done, into = smooth_linears_(folded, {n: getattr(folded, n) for n in ("q", "k", "v", "fc1")}, calib, 4, alpha=0.75)
    assert done == [] and into == {"q": "ln1", "k": "ln1", "v": "ln1", "fc1": "ln2"}
    with torch.no_grad():
        assert torch.allclose(folded(x), ref, rtol=1e-4, atol=1e-4)
    # the ONNX graph has one smoothing multiply (post's), none for the folded layers
    files = export_integer_onnx(smooth, (x[:1],), tmp_path / "m.onnx")
    g = onnx.load(files["onnx_fp32"]).graph
    scaled = [n for n in g.node if n.op_type in ("Mul", "Div")
              and any(i.name in n.input and len(i.dims) == 1 and i.dims[0] == 64 for i in g.initializer)]
    assert len(scaled) == 1
    assert onnx_parity(smooth, files, x)["int8_vs_torch_quantized_db"] > 25


def test_folded_smoothing_on_timm_vit_saves_and_loads(tmp_path) -> None:
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = ts.create_model("timm:vit_tiny_patch16_224").eval()
    calib = [torch.randn(2, 3, 224, 224) for _ in range(2)]
    plan = quantize_(model, QuantConfig(mode="dynamic", smoothquant_alpha=0.5, smoothquant_min_gain=0), calibration=calib)
    # every block's norm1 -> qkv and norm2 -> fc1 fold; proj / fc2 / head get a multiply
    assert len(plan.smoothed_into_norm) == 24
    assert plan.smoothed_into_norm["blocks.3.attn.qkv"] == "blocks.3.norm1"
    assert plan.smoothed_into_norm["blocks.3.mlp.fc1"] == "blocks.3.norm2"
    assert "blocks.3.attn.proj" in plan.smoothed and "blocks.3.attn.qkv" not in plan.smoothed
    ts.save(model, tmp_path / "q")
    loaded = ts.load(tmp_path / "q")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_smoothing_folds_into_llama_rmsnorms() -> None:
    """transformers Llama (RMSNorm, pre-norm, grouped-query attention): q/k/v fold into
    input_layernorm and gate/up into post_attention_layernorm; float logits unchanged."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for mod in model.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.weight[[3, 30]] = 20.0  # outlier channels, as trained LLMs have
    calib = [torch.randint(0, 128, (4, 16)) for _ in range(3)]
    x = torch.randint(0, 128, (4, 16))
    with torch.no_grad():
        ref = model(x).logits
    folded = copy.deepcopy(model)
    layers = {n: m for n, m in folded.named_modules() if isinstance(m, nn.Linear)}
    done, into = smooth_linears_(folded, layers, calib, 3, alpha=0.5, min_gain=0)
    for i in range(2):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert into[f"model.layers.{i}.{proj}"] == f"model.layers.{i}.input_layernorm"
        for proj in ("mlp.gate_proj", "mlp.up_proj"):
            assert into[f"model.layers.{i}.{proj}"] == f"model.layers.{i}.post_attention_layernorm"
    assert not set(done) & set(into)
    with torch.no_grad():
        assert torch.allclose(folded(x).logits, ref, rtol=1e-4, atol=1e-4)
    plain, smooth = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(plain, QuantConfig(mode="dynamic"))
    quantize_(smooth, QuantConfig(mode="dynamic", smoothquant_alpha=0.5), calibration=calib)
    with torch.no_grad():
        assert sqnr(ref, smooth(x).logits) > sqnr(ref, plain(x).logits) + 3.0  # dB


def test_fold_check_holds_with_a_shuffling_loader() -> None:
    """The fold is checked on one fixed batch: a loader that shuffles does not make every fold
    look wrong."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = _Block().eval()
    loader = DataLoader(TensorDataset(torch.randn(64, 12, 64)), batch_size=8, shuffle=True)
    x = torch.randn(4, 12, 64)
    with torch.no_grad():
        ref = model(x)
    layers = {n: getattr(model, n) for n in ("q", "k", "v", "fc1", "post")}
    done, into = smooth_linears_(model, layers, loader, 4, alpha=0.75, min_gain=0)
    assert into == {"q": "ln1", "k": "ln1", "v": "ln1", "fc1": "ln2"} and done == ["post"]
    with torch.no_grad():
        assert torch.allclose(model(x), ref, rtol=1e-4, atol=1e-4)
