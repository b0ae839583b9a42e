"""A tied token table quantized once: ``quantize_llm_``'s ``tie_head`` on a tiny random Gemma-3.

Gemma-3-270M ties ``lm_head`` to a 262k x 640 table (63% of its parameters) that scales its rows
by ``sqrt(hidden)``. The tiny config keeps those traits (and head_dim 256: transformers reads a
Gemma-3 GGUF file back with ``query_pre_attn_scalar=256``): the table holds most of the parameters,
so ``tie_head="auto"`` keeps the head tied to the one quantized table.
"""

from __future__ import annotations

import copy

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import QuantizedLinear, quantize_llm_
from torchslim.quantize.embedding import QuantizedEmbedding, TiedQuantizedHead
from torchslim.quantize.primitives import int8_blocks

transformers = pytest.importorskip("transformers")

_GEMMA_FILE = '''
import torch, transformers

def build():
    cfg = transformers.Gemma3TextConfig(vocab_size=4096, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                        max_position_embeddings=256, sliding_window=8)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    return model
'''
IDS = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def gemma_spec(tmp_path) -> str:
    path = tmp_path / "tiny_gemma3.py"
    path.write_text(_GEMMA_FILE)
    return f"{path}:build"


@pytest.fixture
def gemma(gemma_spec):
    model = ts.create_model(gemma_spec)
    ts.set_example_inputs(model, (IDS,))
    return model


class _RoundedInputs(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, block: int) -> None:
        super().__init__()
        self.inner, self.block = inner, block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(int8_blocks(x, self.block))


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _stored(model) -> int:
    seen, n = set(), 0
    for t in model.state_dict().values():
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            n += t.numel() * t.element_size()
    return n


def test_auto_keeps_a_large_tied_table_once(gemma, tmp_path) -> None:
    float_table = gemma.model.embed_tokens.weight.detach().clone()
    scale = float(gemma.model.embed_tokens.embed_scale)
    before = _logits(gemma)
    plan = quantize_llm_(gemma, method="rtn")
    emb, head = gemma.model.embed_tokens, gemma.lm_head
    assert plan.tied_heads == {"lm_head": "model.embed_tokens"} and "lm_head" not in plan.layers
    assert isinstance(emb, QuantizedEmbedding) and emb.scheme.bits == 8 and emb.embed_scale == pytest.approx(scale)
    assert isinstance(head, TiedQuantizedHead) and head.table is emb
    state = gemma.state_dict()
    assert not any(k.startswith("lm_head") for k in state)
    table_bytes = emb.qweight.numel() + 2 * emb.scale.numel()
    assert table_bytes == 4096 * 64 + 2 * 4096 * 2
    body = sum(t.numel() * t.element_size() for k, t in state.items() if "embed_tokens" not in k)
    assert _stored(gemma) == table_bytes + body  # the table once
    # the looked-up rows are the table's (times Gemma's sqrt(hidden)); the head multiplies by the same table
    rows = emb(IDS)[0]
    torch.testing.assert_close(rows, emb.dequantized_weight()[IDS[0]] * scale, atol=1e-5, rtol=0)
    assert (emb.dequantized_weight() - float_table).abs().max() <= float_table.abs().max() / 127
    # compute="auto": the head rounds its inputs to int8 per group of the table (32), as the body's
    # layers do, so the ONNX decoder runs its bits=8 MatMulNBits at level 4
    assert head.act_block == 32 and "int8 activations per 32" in repr(head)
    h = torch.randn(3, 64)
    torch.testing.assert_close(head(h), int8_blocks(h, 32) @ emb.dequantized_weight().T, atol=1e-4, rtol=1e-5)
    assert (head(h) - h @ emb.dequantized_weight().T).abs().max() > 1e-4  # the rounding is really there
    after = _logits(gemma)
    twin = copy.deepcopy(gemma)  # the same model with a float head holding the dequantized table
    assert twin.lm_head.table is twin.model.embed_tokens
    linear = torch.nn.Linear(64, 4096, bias=False)
    with torch.no_grad():
        linear.weight.copy_(emb.dequantized_weight())
    twin.lm_head = _RoundedInputs(linear, 32)
    torch.testing.assert_close(_logits(twin), after, atol=1e-4, rtol=1e-5)
    assert after.shape == before.shape
    loaded = ts.load(ts.save(gemma, tmp_path / "q"))
    assert isinstance(loaded.lm_head, TiedQuantizedHead) and loaded.lm_head.table is loaded.model.embed_tokens
    assert loaded.lm_head.act_block == 32
    assert loaded.model.embed_tokens.embed_scale == pytest.approx(scale)
    torch.testing.assert_close(_logits(loaded), after, atol=0, rtol=0)


def test_float_compute_keeps_float_head_inputs(gemma, tmp_path) -> None:
    quantize_llm_(gemma, method="rtn", compute="float")
    head, emb = gemma.lm_head, gemma.model.embed_tokens
    assert isinstance(head, TiedQuantizedHead) and head.act_block == 0
    h = torch.randn(3, 64)
    torch.testing.assert_close(head(h), h @ emb.dequantized_weight().T, atol=1e-4, rtol=1e-5)
    loaded = ts.load(ts.save(gemma, tmp_path / "f"))
    assert loaded.lm_head.act_block == 0
    torch.testing.assert_close(_logits(loaded), _logits(gemma), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="act_block must be 0"):
        TiedQuantizedHead(emb, act_block=48)  # does not divide the width 64


def test_separate_head_and_refusals(gemma) -> None:
    untouched = copy.deepcopy(gemma)
    for kwargs, match in [({"tie_head": "yes"}, "tie_head must be"),
                          ({"tie_head": True, "lm_head_bits": 4}, "lm_head_bits=4 differs from embedding_bits=8"),
                          ({"tie_head": True, "embedding_bits": None}, "embedding_bits=None keeps the table float"),
                          ({"tie_head": True, "skip": ("model.embed_tokens",)}, "leaves that table float")]:
        with pytest.raises(ConfigError, match=match):
            quantize_llm_(gemma, method="rtn", **kwargs)
        assert type(gemma.lm_head) is torch.nn.Linear and gemma.lm_head.weight is gemma.model.embed_tokens.weight
        torch.testing.assert_close(_logits(gemma), _logits(untouched), atol=0, rtol=0)
    plan = quantize_llm_(gemma, method="rtn", tie_head=False)  # a second int8 copy, quantized apart
    assert plan.tied_heads == {} and plan.layers[-1] == "lm_head" and isinstance(gemma.lm_head, QuantizedLinear)
    assert isinstance(gemma.model.embed_tokens, QuantizedEmbedding)
    assert any(k.startswith("lm_head") for k in gemma.state_dict())


def test_auto_leaves_a_small_tied_table_apart(llama_spec) -> None:
    model = ts.create_model(llama_spec(vocab=64, hidden=32, inter=64, tie=True))  # the table: a small part
    plan = quantize_llm_(model, method="rtn")
    assert plan.tied_heads == {} and isinstance(model.lm_head, QuantizedLinear)
    model = ts.create_model(llama_spec(vocab=64, hidden=32, inter=64, tie=True))
    assert quantize_llm_(model, method="hqq", tie_head=True).tied_heads == {"lm_head": "model.embed_tokens"}
    assert isinstance(model.lm_head, TiedQuantizedHead)


def test_gguf_of_a_tied_quantized_gemma_has_no_output_tensor(gemma, tmp_path) -> None:
    from torchslim.export.gguf import export_gguf, read_gguf_weights

    quantize_llm_(gemma, method="rtn")
    r = export_gguf(gemma, tmp_path / "g.gguf")
    assert r.info["tied_embeddings"] and r.info["snapped"] == {} and "output.weight" not in r.info["tensor_types"]
    assert r.info["tensor_types"]["token_embd.weight"] == "Q8_0" and "token_embd.weight" in r.info["exact"]
    w = read_gguf_weights(r.path)
    assert torch.equal(torch.as_tensor(w["token_embd.weight"]).float(), gemma.model.embed_tokens.dequantized_weight())
    for i, layer in enumerate(gemma.model.layers):  # every int4 weight read back is the torch weight, bit for bit
        for name, mod in [("ffn_down", layer.mlp.down_proj), ("attn_q", layer.self_attn.q_proj)]:
            assert torch.equal(torch.as_tensor(w[f"blk.{i}.{name}.weight"]).float(), mod.dequantized_weight())
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="g.gguf", dtype=torch.float32)
    assert torch.equal(back.lm_head.weight, gemma.model.embed_tokens.dequantized_weight())
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
