"""A channel-pruned transformers model reloads with stock ``from_pretrained``; DeBERTa-v2 prunes;
a refused prune leaves the model bit-identical.

``prune_channels_`` rewrites ``model.config`` to the new widths (recorded in the plan), so
``save_pretrained`` writes a directory that stock ``AutoModel*.from_pretrained`` rebuilds to the
same outputs, with no torchslim code.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, UnsupportedOpError

transformers = pytest.importorskip("transformers")
tf = transformers

V = 128
_COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _ids(length: int = 8) -> torch.Tensor:
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(0))


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON, num_key_value_heads=2)).eval()


def _qwen2() -> nn.Module:
    torch.manual_seed(0)
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON, num_key_value_heads=2)).eval()


def _bert() -> nn.Module:
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(**_COMMON, max_position_embeddings=32, num_labels=3)).eval()


def _deberta() -> nn.Module:
    """DeBERTa-v3 style: disentangled relative attention (the per-head position projections are
    tiled over the batch with ``.repeat``), shared attention keys, a normalised position table."""
    torch.manual_seed(0)
    cfg = tf.DebertaV2Config(**_COMMON, max_position_embeddings=32, relative_attention=True, pos_att_type=["p2c", "c2p"],
                             position_buckets=8, max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True,
                             position_biased_input=False)
    return tf.DebertaV2Model(cfg).eval()


CASES = {
    "llama": (_llama, tf.AutoModelForCausalLM, {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                               "num_key_value_heads": 1}),
    "qwen2": (_qwen2, tf.AutoModelForCausalLM, {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                               "num_key_value_heads": 1, "head_dim": 16}),
    "bert": (_bert, tf.AutoModelForSequenceClassification, {"hidden_size": 32, "intermediate_size": 64,
                                                            "num_attention_heads": 2}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_pretrained_reloads_with_stock_from_pretrained(name: str, tmp_path) -> None:
    build, auto, sizes = CASES[name]
    model = build()
    x = {"input_ids": _ids(), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    plan = ts.prune_channels_(model, x, ratio=0.5)
    assert plan.config == sizes and plan.config_note is None
    with torch.no_grad():
        ref = model(**x).logits
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert {k: written[k] for k in sizes} == sizes
    stock = auto.from_pretrained(tmp_path).eval()  # transformers' own code only
    assert type(stock) is type(model)
    with torch.no_grad():
        assert torch.allclose(stock(**x).logits, ref, atol=1e-5)


def test_deberta_v2_relative_attention_prunes() -> None:
    model = _deberta()
    x = {"input_ids": _ids()}
    with torch.no_grad():
        shape = model(**x).last_hidden_state.shape
    before = ts.profile(model, x, latency=False, size=False).macs
    plan = ts.prune_channels_(model, x, ratio=0.5)
    assert ts.profile(model, x, latency=False, size=False).macs / before <= 0.6
    assert plan.config["num_attention_heads"] == 2
    model.train()
    out = model(**x).last_hidden_state
    assert out.shape == shape  # the hidden states are the interface of a bare encoder
    out.sum().backward()


def test_deberta_v2_zeroed_heads_prune_exactly(zero_heads) -> None:
    """Heads whose output-projection columns are zero are removed without changing the outputs:
    the tiled position projections (``.repeat``) follow the heads they belong to."""
    from torchslim.graph import groups
    from torchslim.graph.surgery import slice_model_
    from torchslim.prune.channels import _head_attrs

    model = _deberta()
    x = {"input_ids": _ids()}
    cg = groups(model, x)
    heads = [g for g in cg.groups if g.head_dim is not None]
    assert [g.size for g in heads] == [4, 4]
    removed = zero_heads(model, cg, heads, [0, 2], "attention.output.dense.weight")
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    attrs = _head_attrs(model, cg, [{"id": g.id, "size": g.size, "kept": 2} for g in heads])
    slice_model_(model, cg.keep_indices(removed), example_inputs=x, attrs=attrs)
    assert model.encoder.layer[0].attention.self.query_proj.out_features == 32
    with torch.no_grad():
        assert (model(**x).last_hidden_state - ref).abs().max().item() < 1e-5


class _NoRule(nn.Module):
    """An activation through an op no channel rule covers (a running maximum over tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=1).values


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_json_string()


def _unchanged(model: nn.Module, snap, x, ref) -> None:
    state, cfg = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert model.config.to_json_string() == cfg
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref)


def test_refused_prune_leaves_the_model_bit_identical() -> None:
    model = _llama()
    model.model.layers[1].mlp.act_fn = _NoRule()
    x = {"input_ids": _ids()}
    with torch.no_grad():
        ref = model(**x).logits
    snap = _snapshot(model)
    with pytest.raises(UnsupportedOpError, match="cummax"):
        ts.prune_channels_(model, x, ratio=0.5)
    _unchanged(model, snap, x, ref)


def test_budget_refused_after_trials_leaves_the_config_alone() -> None:
    """The budget search prunes and syncs configs of shape-only copies only."""
    model = _llama()
    x = {"input_ids": _ids()}
    with torch.no_grad():
        ref = model(**x).logits
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match="cannot be met"):
        ts.prune_channels_(model, x, target=ts.Budget(macs=0.001))
    _unchanged(model, snap, x, ref)
