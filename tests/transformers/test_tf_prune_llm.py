"""Channel pruning of decoder LLMs (random weights, tiny configs): the residual width goes too.

At ratio 0.5 every decoder LLM keeps at most 0.55 of its MACs (hidden width, heads, MLP), its
outputs keep their structure, forward and backward run, heads stay whole (rotary dims and GQA
groups consistent), and ``model.config`` describes the result. Gemma's ``sqrt(hidden_size)``
embedding scale is recomputed by a rebuilt model: the pruned model is compensated so that its
function is the one the plain slicing gives.
"""

from __future__ import annotations

import logging

import pytest
import torch

import torchslim as ts
from torchslim.graph import groups
from torchslim.graph.surgery import slice_model_

transformers = pytest.importorskip("transformers")
tf = transformers

V = 128
_COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON, num_key_value_heads=2))
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**_COMMON, num_key_value_heads=2))
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON, num_key_value_heads=2))
    if name == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**_COMMON, num_key_value_heads=2, head_dim=16))
    if name == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4))
    if name == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                                bos_token_id=1))
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                                bos_token_id=1, eos_token_id=1))
    if name == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                              num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=32,
                                              pad_token_id=1, bos_token_id=1, eos_token_id=1))
    if name == "falcon":
        return tf.FalconForCausalLM(tf.FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    bos_token_id=1, eos_token_id=1))
    raise KeyError(name)


def _ids(length: int = 8) -> torch.Tensor:
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(0))


def _macs(model: torch.nn.Module, inputs) -> int:
    return ts.profile(model, inputs, latency=False, size=False).macs


LLMS = ["llama", "mistral", "qwen2", "gemma", "gemma3", "phi3", "gpt2", "opt", "falcon"]


@pytest.mark.parametrize("name", LLMS)
def test_decoder_llm_prunes_its_residual_width(name: str) -> None:
    model = _build(name).eval()
    x = {"input_ids": _ids()}
    with torch.no_grad():
        before_out = model(**x)
    hidden = model.get_input_embeddings().weight.shape[1]
    before = _macs(model, x)
    plan = ts.prune_channels_(model, x, ratio=0.5)
    assert _macs(model, x) / before <= 0.55
    assert model.get_input_embeddings().weight.shape[1] == hidden // 2  # the residual width went too
    with torch.no_grad():
        out = model(**x)
    assert list(out.keys()) == list(before_out.keys()) and out.logits.shape == before_out.logits.shape
    model.train()
    model(**x).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if name != "falcon":  # Falcon's config derives head_dim from hidden_size: its multi-query heads stay
        assert plan.config_note is None
        assert plan.config.get("hidden_size", plan.config.get("n_embd")) == hidden // 2
        assert model.config.num_attention_heads == 2
    else:
        assert "cannot describe" in plan.config_note


@pytest.mark.parametrize("name", ["llama", "phi3", "gemma3"])
def test_heads_stay_whole_and_gqa_groups_consistent(name: str) -> None:
    """Every attention keeps whole heads (head_dim and the rotary table unchanged) and the same
    number of query heads per key/value head; Phi-3's fused qkv_proj keeps its q | k | v segments."""
    model = _build(name).eval()
    ts.prune_channels_(model, {"input_ids": _ids()}, ratio=0.5)
    for layer in model.model.layers:
        attn = layer.self_attn
        hd = attn.head_dim
        assert hd == 16
        if name == "phi3":
            q = model.config.num_attention_heads * hd
            kv = attn.num_key_value_heads * hd
            assert attn.qkv_proj.out_features == q + 2 * kv and (q, kv) == (32, 16)
            assert layer.mlp.gate_up_proj.out_features == 2 * layer.mlp.down_proj.in_features == 128
        else:
            assert (attn.q_proj.out_features, attn.k_proj.out_features) == (32, 16)
    tables = [b for n, b in model.model.rotary_emb.named_buffers() if "inv_freq" in n]
    assert tables and all(b.shape == (8,) for b in tables)  # head_dim 16: 8 rotary frequencies


def test_uniform_layers_keep_one_count_per_layer_under_global_ranking() -> None:
    """Global ranking with transformers models keeps one count per layer (importance summed over
    layers): the config describes it; switched off, layers differ and the plan says so."""
    model = _build("llama").eval()
    x = {"input_ids": _ids()}
    with torch.no_grad():  # make layer 1's MLP look much more important than layer 0's
        model.model.layers[1].mlp.down_proj.weight.mul_(4)
        model.model.layers[1].mlp.up_proj.weight.mul_(4)
    plan = ts.prune_channels_(model, x, ratio=0.4, global_ranking=True)
    widths = {layer.mlp.up_proj.out_features for layer in model.model.layers}
    assert len(widths) == 1 and plan.config_note is None
    assert model.config.intermediate_size == widths.pop()

    free = _build("llama").eval()
    with torch.no_grad():
        free.model.layers[1].mlp.down_proj.weight.mul_(4)
        free.model.layers[1].mlp.up_proj.weight.mul_(4)
    plan = ts.prune_channels_(free, x, ratio=0.4, global_ranking=True, uniform_layers=False)
    widths = [layer.mlp.up_proj.out_features for layer in free.model.layers]
    assert widths[0] < widths[1]
    assert plan.config_note is not None and "ts.save" in plan.config_note
    assert free.config.intermediate_size == 128  # a field whose layers differ keeps its value


def test_coupled_head_width_keeps_hidden_equal_heads_times_head_dim() -> None:
    """GPT-2 derives head_dim from n_embd // n_head: at a ratio that removes 1 of 4 heads, the
    residual keeps 3 * 16 channels so the config still rebuilds the model."""
    model = _build("gpt2").eval()
    plan = ts.prune_channels_(model, {"input_ids": _ids()}, ratio=0.3)
    assert model.config.n_head == 3 and model.config.n_embd == 48
    assert plan.config_note is None


def test_non_uniform_note_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    model = _build("llama").eval()
    with caplog.at_level(logging.WARNING, logger="torchslim.prune.hf"):
        ts.prune_channels_(model, {"input_ids": _ids()}, ratio=0.5, ratios={"model.layers.0.mlp*": 0.25})
    assert any("cannot describe" in r.getMessage() for r in caplog.records)


def test_gemma_embedding_scale_is_compensated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Halving Gemma's hidden width changes the scale a rebuilt model multiplies its embeddings by
    (sqrt(hidden_size)); the rows and the final norm absorb it, so the function equals plain slicing."""
    import torchslim.graph.surgery as surgery

    x = {"input_ids": _ids()}
    plain, synced = _build("gemma").eval(), _build("gemma").eval()
    cg = groups(synced, x)
    residual = next(g for g in cg.groups if ("model.embed_tokens.weight", 1) in g.members)
    keep = cg.keep_indices(set(residual.channels[::2]))
    slice_model_(synced, keep, example_inputs=x)
    monkeypatch.setattr(surgery, "sync_config", lambda model: None)
    slice_model_(plain, keep, example_inputs=x)
    assert synced.config.hidden_size == 32 and plain.config.hidden_size == 64
    assert float(synced.model.embed_tokens.embed_scale) == pytest.approx(32**0.5)
    assert float(plain.model.embed_tokens.embed_scale) == pytest.approx(64**0.5)
    with torch.no_grad():
        assert torch.allclose(synced(**x).logits, plain(**x).logits, atol=1e-5)
