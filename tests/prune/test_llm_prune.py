"""Width and depth pruning of decoder LLMs (issue 23): activation importance, block influence,
layer removal, ``prune_llm_``; the results reload with stock ``from_pretrained`` and ``ts.load``,
generate with a KV cache, and bad input leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.graph.spaces import analyse
from torchslim.graph.state import state_digest
from torchslim.prune import ActivationImportance, block_influence, prune_llm_, remove_layers_
from torchslim.prune.llm import parameter_counts

transformers = pytest.importorskip("transformers")
tf = transformers

V = 64
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)


def _ids(rows: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (rows, length), generator=torch.Generator().manual_seed(seed))


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON)).eval()


def _qwen2() -> nn.Module:  # grouped-query attention with q/k/v biases, per-layer layer_types
    torch.manual_seed(0)
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON)).eval()


def _gemma3() -> nn.Module:  # sliding and full attention layers (layer_types), tied embeddings
    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(**{**_COMMON, "num_hidden_layers": 6}, head_dim=8, sliding_window=8)
    return tf.Gemma3ForCausalLM(cfg).eval()


BUILD = {"llama": _llama, "qwen2": _qwen2, "gemma3": _gemma3}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------- activation importance


def test_activation_scores_one_per_channel_and_zeroed_channels_score_lowest() -> None:
    model = _qwen2()
    layer = model.model.layers[1]
    with torch.no_grad():  # zero: hidden channel 5 everywhere, MLP channel 7 of layer 1, KV group 1 of layer 1
        model.model.embed_tokens.weight[:, 5] = 0
        for blk in model.model.layers:
            blk.self_attn.o_proj.weight[5] = 0
            blk.mlp.down_proj.weight[5] = 0
        layer.mlp.gate_proj.weight[7] = 0
        layer.mlp.up_proj.weight[7] = 0
        head_dim = 8
        layer.self_attn.v_proj.weight[head_dim:] = 0
        layer.self_attn.v_proj.bias[head_dim:] = 0
    x = _ids(1, 8)
    cg = analyse(model, (x,))
    crit = ActivationImportance().calibrated(model, _ids())
    scores = {g.id: crit(model, cg, g) for g in cg.groups}
    for g in cg.groups:
        assert scores[g.id].shape == (g.size,) and torch.isfinite(scores[g.id]).all()

    def group_of(name: str, dim: int):
        return next(g for g in cg.groups if (name, dim) in g.members)

    hidden = group_of("model.embed_tokens.weight", 1)
    mlp = group_of("model.layers.1.mlp.down_proj.weight", 1)
    heads = group_of("model.layers.1.self_attn.o_proj.weight", 1)
    assert heads.size == 2 and heads.head_dim is not None  # the prunable units are the key/value groups
    for g, zeroed in ((hidden, 5), (mlp, 7), (heads, 1)):
        s = scores[g.id]
        assert int(torch.argmin(s)) == zeroed and float(s[zeroed]) == 0.0, (g, s)
        assert float(s.sort().values[1]) > 0


def test_activation_importance_needs_data_and_leaves_the_model_unchanged() -> None:
    model = _llama()
    before = state_digest(model)
    with pytest.raises(ConfigError, match="calibration data"):
        ts.prune_channels_(model, (_ids(1, 8),), ratio=0.25, importance="activation")
    assert state_digest(model) == before
    plan = ts.prune_channels_(model, (_ids(1, 8),), ratio=0.25, importance="activation", data=_ids())
    assert plan.importance == "activation" and model.config.hidden_size == 24


# ---------------------------------------------------------------------------- depth


def test_block_influence_is_one_minus_cosine_of_layer_input_and_output() -> None:
    model = _llama()
    ids = _ids()
    bi = block_influence(model, ids)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states  # the last one is after the final norm: compare the first layers only
    for i in range(len(bi) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1).mean()
        assert bi[i] == pytest.approx(1 - float(cos), abs=1e-6)


@pytest.mark.parametrize("name", sorted(BUILD))
def test_removed_layers_reload_with_stock_from_pretrained_and_generate(name: str, tmp_path) -> None:
    model = BUILD[name]()
    n = model.config.num_hidden_layers
    types = list(getattr(model.config, "layer_types", None) or [])
    kept = remove_layers_(model, [1, n - 2])
    assert kept == [i for i in range(n) if i not in (1, n - 2)]
    assert model.config.num_hidden_layers == len(model.model.layers) == n - 2
    assert [blk.self_attn.layer_idx for blk in model.model.layers] == list(range(n - 2))
    if types:
        assert model.config.layer_types == [types[i] for i in kept]
    ids = _ids(2, 12)
    ref = _logits(model, ids)
    model.save_pretrained(tmp_path)
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # transformers' own code only
    assert type(stock) is type(model) and len(stock.model.layers) == n - 2
    assert torch.equal(_logits(stock, ids), ref)
    # generation with the KV cache gives the tokens a full forward per step gives
    prompt = ids[:1, :5]
    cached = model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=True)
    plain = model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=False)
    assert cached.shape == (1, 8) and torch.equal(cached, plain)
    assert torch.equal(stock.generate(prompt, max_new_tokens=3, do_sample=False), cached)


_FILE = '''
import torch, transformers


def build():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def example_inputs():
    return (torch.tensor([[1, 5, 9, 13, 2]]),)
'''


@pytest.mark.parametrize("mode", ["depth", "both"])
def test_depth_pruned_model_round_trips_through_ts_save_and_load(mode: str, tmp_path) -> None:
    path = tmp_path / "tiny4.py"
    path.write_text(_FILE)
    model = ts.create_model(f"{path}:build")
    plan = prune_llm_(model, _ids(), target=0.5 if mode == "depth" else 0.4, mode=mode)
    assert plan.removed_layers and model.config.num_hidden_layers == 4 - len(plan.removed_layers)
    ids = _ids(2, 10)
    ref = _logits(model, ids)
    ts.save(model, tmp_path / "saved")
    loaded = ts.load(tmp_path / "saved").eval()
    assert torch.equal(_logits(loaded, ids), ref)
    assert loaded.config.num_hidden_layers == model.config.num_hidden_layers
    assert loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


# ---------------------------------------------------------------------------- prune_llm_


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_width_pruning_meets_the_target_and_reloads_with_stock_from_pretrained(name: str, tmp_path) -> None:
    model = BUILD[name]()
    before = parameter_counts(model)
    plan = prune_llm_(model, _ids(), target=0.3, mode="width")
    after = parameter_counts(model)
    assert plan.non_embedding_before == before["non_embedding"] and plan.non_embedding_after == after["non_embedding"]
    assert plan.achieved == pytest.approx(1 - after["non_embedding"] / before["non_embedding"])
    assert abs(plan.achieved - 0.3) <= 0.03, plan.to_dict()
    assert plan.widths_after["hidden_size"] < plan.widths_before["hidden_size"] and plan.config_note is None
    assert plan.removed_layers == [] and plan.to_dict()["mode"] == "width"
    ids = _ids(2, 12)
    ref = _logits(model, ids)
    model.save_pretrained(tmp_path)
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(stock, ids), ref)
    assert model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_both_modes_split_the_target_between_depth_and_width() -> None:
    model = _llama()
    plan = prune_llm_(model, _ids(), target=0.4, mode="both", depth_share=0.5)
    assert len(plan.removed_layers) == 1 and plan.width_ratio > 0
    assert abs(plan.achieved - 0.4) <= 0.03 and len(plan.block_influence) == 4


def _bad_calls():
    return {
        "all layers": lambda m: remove_layers_(m, [0, 1, 2, 3]),
        "duplicate": lambda m: remove_layers_(m, [1, 1]),
        "out of range": lambda m: remove_layers_(m, [4]),
        "negative": lambda m: remove_layers_(m, [-1]),
        "not a list": lambda m: remove_layers_(m, "1"),
        "target": lambda m: prune_llm_(m, _ids(), target=1.5),
        "mode": lambda m: prune_llm_(m, _ids(), mode="diagonal"),
        "no data": lambda m: prune_llm_(m, None),
        "importance": lambda m: prune_llm_(m, _ids(), importance="nosuchcriterion"),
        "unreachable": lambda m: prune_llm_(m, _ids(), target=0.999, mode="width"),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_input_is_refused_and_leaves_the_model_unchanged(case: str) -> None:
    model = _llama()
    before = state_digest(model)
    ids = _ids(1, 6)
    out = _logits(model, ids)
    with pytest.raises(ConfigError):
        _bad_calls()[case](model)
    assert state_digest(model) == before
    assert torch.equal(_logits(model, ids), out)


def test_a_failure_after_layers_went_puts_them_back(monkeypatch) -> None:
    model = _llama()
    before = state_digest(model)
    import torchslim.prune.llm as llm

    def fail(*args, **kwargs):
        raise ConfigError("width step failed")

    monkeypatch.setattr(llm, "prune_channels_", fail)
    with pytest.raises(ConfigError, match="width step failed"):
        prune_llm_(model, _ids(), target=0.4, mode="both")
    assert state_digest(model) == before and len(model.model.layers) == 4


def test_a_head_count_that_leaves_no_hidden_width_on_the_grid_keeps_the_hidden_width() -> None:
    # 3 heads and multiples of 32: the only hidden width both allow is the whole 96, so the MLP and
    # the heads carry the target (what int4 groups of 32 need on SmolLM2, whose 9 heads allow 288 / 576)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=3, head_dim=32)
    model = tf.LlamaForCausalLM(cfg).eval()
    plan = prune_llm_(model, _ids(), target=0.3, mode="width", round_to=32)
    assert plan.widths_after["hidden_size"] == 96 and plan.achieved > 0.2
    assert all(m.in_features % 32 == 0 for m in model.modules() if isinstance(m, nn.Linear))
    assert model.config.intermediate_size < 256
