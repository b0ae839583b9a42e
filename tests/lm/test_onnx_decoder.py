"""ONNX decoder with a KV cache (export_onnx_decoder), ts.generate on torch and ONNX Runtime,
evaluate_lm / lm_speed / `torchslim eval` on the exported file."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

import torchslim as ts  # noqa: E402
from torchslim.errors import CheckpointError, ConfigError  # noqa: E402
from torchslim.export.onnx_decoder import OnnxDecoder, decoder_metadata, export_onnx_decoder  # noqa: E402


def _llama(tie: bool = False, head_dim16: bool = True) -> torch.nn.Module:
    """A random 2-layer Llama with GQA (4 query heads, 2 kv heads); head_dim 16 fits GroupQueryAttention."""
    hidden = 64 if head_dim16 else 32
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _int4(model: torch.nn.Module, embeddings: bool, compute: str = "auto") -> torch.nn.Module:
    from torchslim.quantize import QuantConfig

    ts.quantize_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=16, embeddings=embeddings,
                                    compute=compute))
    return model


def _stepwise(dec: OnnxDecoder, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` computed as a prefill of all but 2 tokens, then 2 one-token decode steps."""
    lg, past = dec.step(ids[:, :-2])
    outs = [lg]
    for j in (-2, -1):
        lg, past = dec.step(ids[:, j:][:, :1], past)
        outs.append(lg)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tie", [False, True])
def test_decoder_equals_hf_logits_prefill_and_decode(tmp_path, fused, tie):
    model = _llama(tie)
    info = export_onnx_decoder(model, tmp_path / "d.onnx", fused=fused)
    assert info["graph"] == ("fused" if fused else "reference") and info["kv_heads"] == 2 and info["heads"] == 4
    assert info["tied_head_shares_table"] is tie  # a tied table is stored once
    dec = OnnxDecoder(info["path"], threads=1)
    assert tuple(dec.session.get_inputs()[2].shape[1::2]) == (2, 16)  # kv heads stored once, not repeated
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(_stepwise(dec, ids), ref, atol=1e-4, rtol=1e-4)
    _, past = dec.step(ids)
    assert tuple(past[0].shape) == (2, 2, 9, 16) and len(past) == 4


@pytest.mark.parametrize("fused", [True, False])
def test_qwen2_layout_with_qkv_biases(tmp_path, fused):
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    dec = OnnxDecoder(export_onnx_decoder(model, tmp_path / "q.onnx", fused=fused)["path"])
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(_stepwise(dec, ids), ref, atol=1e-4, rtol=1e-4)


def test_reference_graph_left_padding_and_auto_choice(tmp_path, tiny_llama):
    info = export_onnx_decoder(tiny_llama, tmp_path / "d.onnx")  # head_dim 8: GroupQueryAttention cannot: reference
    assert info["graph"] == "reference"
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = tiny_llama(ids, attention_mask=mask).logits
    got, _ = OnnxDecoder(info["path"]).step(ids, None, mask)
    torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0, 3:], ref[0, 3:], atol=1e-4, rtol=1e-4)  # padded positions are not scored
    with pytest.raises(ConfigError, match="head_dim 8"):
        export_onnx_decoder(tiny_llama, tmp_path / "e.onnx", fused=True)
    assert not (tmp_path / "e.onnx").exists()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tie,compute", [(False, "auto"), (True, "auto"), (False, "float")])
def test_int4_decoder_matmulnbits_and_greedy_parity(tmp_path, fused, tie, compute):
    """The file computes what the torch model does: int8 activations per group (compute "auto" =
    "int8" for group-wise weights) ship at accuracy_level 4, float activations at 0."""
    model = _int4(_llama(tie), embeddings=tie, compute=compute)
    info = export_onnx_decoder(model, tmp_path / "q.onnx", fused=fused)
    # every Linear as MatMulNBits (fused: q/k/v and gate/up share one each), nothing left float
    assert len(info["matmul_nbits"]) == (9 if fused else 15) and info["left_float"] == []
    levels = {a.i for n in __import__("onnx").load(info["path"]).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {0 if compute == "float" else 4} and info["accuracy_level"] == levels.pop()
    assert info["embedding"] == ("int4" if tie else "float32")
    ops = {n.op_type for n in __import__("onnx").load(info["path"]).graph.node}
    assert "MatMulNBits" in ops and ("GatherBlockQuantized" in ops) == tie
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(_stepwise(OnnxDecoder(info["path"]), ids), ref, atol=1e-4, rtol=1e-4)
    a = ts.generate(model, ids, 12)
    b = ts.generate(info["path"], ids, 12)
    assert a.runtime == "torch" and b.runtime == "onnxruntime"
    assert torch.equal(a.new_tokens, b.new_tokens)


def test_int8_embedding_and_file_bytes(tmp_path):
    model = _llama()
    f32 = export_onnx_decoder(model, tmp_path / "f.onnx")
    q8 = export_onnx_decoder(model, tmp_path / "e.onnx", embedding_bits=8)
    assert q8["embedding"] == "int8" and q8["bytes"] < f32["bytes"]
    ids = torch.tensor([[1, 5, 9, 63]])
    with torch.no_grad():
        ref = model(ids).logits
    got = OnnxDecoder(q8["path"])(ids)
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_int8_lm_head_ships_as_8bit_matmulnbits(tmp_path):
    """quantize_llm_'s default int8 lm_head (and int8 table) ship as integers, not as a float head."""
    from torchslim.quantize import quantize_llm_

    model = _llama(True)
    quantize_llm_(model, method="rtn", embedding_bits=8, lm_head_bits=8)
    assert type(model.lm_head).__name__ == "QuantizedLinear" and model.lm_head.scheme.bits == 8
    assert model.lm_head.act_block == 32  # quantize_llm_'s default: int8 activations per group
    info = export_onnx_decoder(model, tmp_path / "h.onnx")
    assert info["accuracy_level"] == 4  # the bits=8 MatMulNBits quantizes its input the same way
    assert "lm_head" in info["matmul_nbits"] and info["left_float"] == [] and info["embedding"] == "int8"
    graph = __import__("onnx").load(info["path"]).graph
    assert sorted({a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}) == [4, 8]
    ids = torch.tensor([[1, 5, 9, 63, 2]])
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(OnnxDecoder(info["path"])(ids), ref, atol=1e-4, rtol=1e-4)


def test_tied_int8_head_shares_the_tables_codes(tmp_path):
    """quantize_llm_(tie_head=True): lm_head multiplies by the int8 table; the decoder stores the
    codes once, read by the GatherBlockQuantized and by the head's bits=8 MatMulNBits."""
    from torchslim.quantize import quantize_llm_

    tied, apart = _llama(True), _llama(True)
    quantize_llm_(tied, method="rtn", tie_head=True)
    quantize_llm_(apart, method="rtn", tie_head=False)
    assert type(tied.lm_head).__name__ == "TiedQuantizedHead"
    info = export_onnx_decoder(tied, tmp_path / "t.onnx")
    other = export_onnx_decoder(apart, tmp_path / "u.onnx")
    assert "lm_head" in info["matmul_nbits"] and info["embedding"] == "int8" and info["left_float"] == []
    assert info["bytes"] < other["bytes"]
    graph = __import__("onnx").load(info["path"]).graph
    readers = [n.op_type for n in graph.node if "embed_tokens.q8" in n.input]
    assert sorted(readers) == ["GatherBlockQuantized", "MatMulNBits"]
    # the head rounds its inputs to int8 as the body does (compute="auto"): its bits=8 MatMulNBits runs
    # at level 4, the only level at which ONNX Runtime's 8-bit kernel is fast
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and "embed_tokens.q8" in n.input)
    assert tied.lm_head.act_block > 0 and {a.name: a.i for a in head.attribute}["accuracy_level"] == 4
    ids = torch.tensor([[1, 5, 9, 63, 2, 7]])
    with torch.no_grad():
        ref = tied(ids).logits
    torch.testing.assert_close(_stepwise(OnnxDecoder(info["path"]), ids), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="fused graph only"):
        export_onnx_decoder(tied, tmp_path / "r.onnx", fused=False)
    assert not (tmp_path / "r.onnx").exists()


def test_generate_fp32_parity_batch_and_sampling(tmp_path):
    model = _llama()
    path = export_onnx_decoder(model, tmp_path / "d.onnx")["path"]
    prompts = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    a, b = ts.generate(model, prompts, 10), ts.generate(path, prompts, 10)
    assert a.new_tokens.shape == (2, 10) and torch.equal(a.new_tokens, b.new_tokens)
    assert torch.equal(b.tokens[:, :5], prompts)
    s1 = ts.generate(path, [1, 2, 3], 8, greedy=False, seed=7, temperature=0.8, top_k=5)
    s2 = ts.generate(path, [1, 2, 3], 8, greedy=False, seed=7, temperature=0.8, top_k=5)
    assert torch.equal(s1.new_tokens, s2.new_tokens)
    stop = ts.generate(path, prompts[:1], 10, eos_token_id=int(a.new_tokens[0, 0]))  # stops at the first token
    assert stop.new_tokens.shape == (1, 1)


def test_evaluate_lm_and_lm_speed_on_the_onnx_file(tmp_path):
    model = _llama()
    path = export_onnx_decoder(model, tmp_path / "d.onnx")["path"]
    ids = torch.randint(0, 64, (100,), generator=torch.Generator().manual_seed(5))
    r_torch = ts.evaluate_lm(model, ids, context=32, stride=16)
    r_onnx = ts.evaluate_lm(path, ids, context=32, stride=16, threads=1)
    assert r_onnx.threads == 1 and r_onnx.tokens == r_torch.tokens
    assert r_onnx.perplexity == pytest.approx(r_torch.perplexity, rel=1e-4)
    s = ts.lm_speed(path, prompt_tokens=8, new_tokens=3, runs=1, warmup=0, threads=1)
    assert s.threads == 1 and s.prefill_ms > 0 and s.decode_tokens_per_s > 0 and "onnxruntime" in s.method


def test_refusals_leave_model_and_file_alone(tmp_path):
    cfg = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    gemma = transformers.Gemma3ForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in gemma.state_dict().items()}
    with pytest.raises(ConfigError, match="gemma3"):
        export_onnx_decoder(gemma, tmp_path / "g.onnx")
    assert all(torch.equal(before[k], v) for k, v in gemma.state_dict().items())
    model = _llama()
    with pytest.raises(ConfigError, match="accuracy_level"):
        export_onnx_decoder(model, tmp_path / "d.onnx", accuracy_level=7)
    with pytest.raises(ConfigError, match="embedding_bits"):
        export_onnx_decoder(model, tmp_path / "d.onnx", embedding_bits=4)
    with pytest.raises(ConfigError, match="tied"):
        export_onnx_decoder(_llama(tie=True), tmp_path / "d.onnx", embedding_bits=8)
    target = tmp_path / "keep.onnx"
    target.write_bytes(b"old")
    import onnx

    real = onnx.save

    def broken(*a, **k):
        raise OSError("disk full")

    onnx.save = broken
    try:
        with pytest.raises(OSError):
            export_onnx_decoder(model, target)
    finally:
        onnx.save = real
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx"]
    fused = OnnxDecoder(export_onnx_decoder(model, tmp_path / "f.onnx")["path"])
    with pytest.raises(ConfigError, match="no padding"):
        fused.step(torch.tensor([[1, 2, 3]]), None, torch.tensor([[0, 1, 1]]))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        ts.generate(model, [1, 2], 0)
    with pytest.raises(ConfigError, match="tokenizer"):
        ts.generate(model, "some text", 2)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.ones(1, 3),), str(plain), dynamo=False)
    with pytest.raises(ConfigError, match="not an ONNX decoder"):
        OnnxDecoder(plain)
    with pytest.raises(CheckpointError):
        OnnxDecoder(tmp_path / "missing.onnx")
    assert decoder_metadata(plain) is None


def test_cli_eval_refuses_other_exported_files(tmp_path):
    from torchslim.errors import SpecError
    from torchslim.lm._cli import _refuse_exported

    _refuse_exported(str(tmp_path / "m.onnx"))  # an ONNX decoder is scored
    _refuse_exported(str(tmp_path / "m.gguf"))  # a GGUF file too, in llama.cpp
    for name in ("m.pte", "m.pt2", "m.tslim"):
        with pytest.raises(SpecError, match="exported file"):
            _refuse_exported(str(tmp_path / name))


def test_smollm2_int4_onnx_greedy_equals_torch_int4(tmp_path, smollm2, smollm2_tokenizer, capsys):
    """SmolLM2-135M int4 g32 (every Linear, lm_head too): 3 prompts x 16 greedy tokens, ONNX == torch.

    The ONNX file generates with its KV cache; the torch int4 model then scores each generated
    sequence in one forward, and its arg-max after every prefix must be the token the ONNX
    decoder chose: the torch model's own greedy generation is then the same ids (each next token
    is the arg-max given the same prefix), at one forward instead of 16 slow steps.
    """
    from torchslim.quantize import QuantConfig

    model = ts.create_model("pretrained:smollm2-135m")  # a fresh copy: the session fixture stays float
    # float activations: accuracy_level 0, whose float kernels give the torch logits to rounding; with
    # int8 activations (compute "int8", level 4) each layer still equals its MatMulNBits to rounding,
    # but a float difference upstream can move an activation across an int8 rounding boundary, so
    # greedy tokens agree only mostly (benchmarks/llm_decode.py measures how often)
    ts.quantize_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=32, compute="float"))
    info = export_onnx_decoder(model, tmp_path / "smollm2-int4.onnx")
    assert info["accuracy_level"] == 0
    assert info["left_float"] == [] and len(info["matmul_nbits"]) == 30 * 4 + 1 and info["graph"] == "fused"
    assert decoder_metadata(info["path"])["spec"] == "pretrained:smollm2-135m"
    dec = OnnxDecoder(info["path"], threads=2)
    for prompt in ("To be, or not to be, that is the question:", "The capital of France is", "def fibonacci(n):"):
        out = ts.generate(dec, prompt, 16, tokenizer=smollm2_tokenizer, eos_token_id=-1)
        assert out.new_tokens.shape == (1, 16) and isinstance(out.text, str)
        with torch.no_grad():
            logits = model(out.tokens).logits[0, out.prompt_tokens - 1 : -1]
        assert logits.argmax(-1).tolist() == out.new_tokens[0].tolist(), prompt
    from torchslim.cli import main

    assert main(["eval", info["path"], "--perplexity", "--data", "shakespeare", "--max-tokens", "64", "--threads", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["evaluation"]["tokens"] == 63 and 1 < out["perplexity"] < 1e4
