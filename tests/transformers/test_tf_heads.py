"""Head / FFN-neuron / layer pruning on small transformers configs (BERT, Llama with GQA)."""

from __future__ import annotations

import copy

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.prune.heads import (
    attention_sites,
    drop_layers_,
    ffn_sites,
    head_importance,
    prune_ffn_,
    prune_ffn_by_importance_,
    prune_heads_,
    prune_heads_by_importance_,
)

transformers = pytest.importorskip("transformers")


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(0))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def test_gqa_head_pruning_keeps_ratio_and_output_shape() -> None:
    model = _llama()
    ids = _ids()
    shape = model(ids).logits.shape
    plan = prune_heads_by_importance_(model, [ids], 0.5)
    assert plan
    for site in attention_sites(model).values():
        assert site.num_heads % site.num_kv_heads == 0
        assert site.module.num_key_value_groups == site.num_heads // site.num_kv_heads
        assert site.o.in_features == site.q.out_features
    assert sum(s.num_heads for s in attention_sites(model).values()) == 8  # half of 2 x 8
    assert model(ids).logits.shape == shape
    out = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_gqa_whole_group_removal_drops_its_kv_head() -> None:
    model = _llama()
    name = next(iter(attention_sites(model)))
    prune_heads_(model, {name: [0, 1, 2, 3]})  # every query head of key/value group 0
    site = attention_sites(model)[name]
    assert (site.num_heads, site.num_kv_heads) == (4, 1)
    assert model(_ids()).logits.shape[-1] == 96


@pytest.mark.parametrize("heads", [[0, 1, 2, 3, 4, 5, 6, 7], [0], [9], [-1]])
def test_bad_gqa_head_lists_leave_model_unchanged(heads: list[int]) -> None:
    model = _llama()
    before = _state(model)
    name = next(iter(attention_sites(model)))
    with pytest.raises(ConfigError):
        prune_heads_(model, {name: heads})
    assert _same(before, _state(model))


def test_zero_heads_left_and_empty_calibration_raise() -> None:
    model = _bert()
    before = _state(model)
    name = next(iter(attention_sites(model)))
    with pytest.raises(ConfigError, match="zero"):
        prune_heads_(model, {name: [0, 1, 2, 3]})
    with pytest.raises(ConfigError, match="calibration"):
        prune_heads_by_importance_(model, [], 0.5)
    with pytest.raises(ConfigError):
        prune_heads_by_importance_(model, [_ids()], 1.0)
    assert _same(before, _state(model))


def test_pruning_a_head_zeroed_first_leaves_bert_output_unchanged() -> None:
    model = _bert()
    ids = _ids()
    name = next(iter(attention_sites(model)))
    site = attention_sites(model)[name]
    with torch.no_grad():  # head 1 contributes nothing: zero its value rows
        site.v.weight[site.head_dim : 2 * site.head_dim] = 0
        site.v.bias[site.head_dim : 2 * site.head_dim] = 0
    ref = model(ids).last_hidden_state
    prune_heads_(model, {name: [1]})
    assert attention_sites(model)[name].num_heads == 3
    assert torch.allclose(model(ids).last_hidden_state, ref, atol=1e-5)


def test_head_importance_shapes() -> None:
    scores = head_importance(_bert(), [_ids()])
    assert all(s.shape == (4,) and torch.all(s >= 0) for s in scores.values())


def test_ffn_neuron_pruning_and_layer_dropping() -> None:
    model = _bert()
    ids = _ids()
    plan = prune_ffn_by_importance_(model, [ids], 0.5, round_to=8)
    assert all(s.width == 24 for s in ffn_sites(model).values()) and plan
    drop_layers_(model, [1])
    assert len(model.encoder.layer) == 2
    assert model(ids).last_hidden_state.shape == (2, 10, 32)
    before = _state(model)
    with pytest.raises(ConfigError):
        drop_layers_(model, [0, 1])
    with pytest.raises(ConfigError):
        prune_ffn_(model, {next(iter(ffn_sites(model))): list(range(24))})
    assert _same(before, _state(model))


def test_llama_ffn_pruning_runs() -> None:
    model = copy.deepcopy(_llama())
    name = next(iter(ffn_sites(model)))
    prune_ffn_(model, {name: list(range(0, 96, 2))})
    assert ffn_sites(model)[name].width == 48
    assert model(_ids()).logits.shape == (2, 10, 96)


@pytest.mark.parametrize("make, picks", [(_bert, [0, 2]), (_llama, [1, 6])], ids=["bert", "llama_gqa"])
def test_removed_heads_match_zeroed_heads(make, picks: list[int]) -> None:
    """Zeroing what a head writes (its output-projection columns) and removing the head give the
    same outputs: the one surgery cuts exactly that head's rows and columns (GQA: one query head
    of each key/value group, so the key/value heads stay)."""
    model = make()
    ids = _ids()
    sites = attention_sites(model)
    with torch.no_grad():
        for site in sites.values():
            for h in picks:
                site.o.weight[:, h * site.head_dim : (h + 1) * site.head_dim] = 0
        out = model(ids)
    ref = getattr(out, "logits", None) if getattr(out, "logits", None) is not None else out.last_hidden_state
    before = {n: (s.num_heads, s.num_kv_heads) for n, s in sites.items()}
    left = prune_heads_(model, {n: picks for n in sites})
    for n, site in attention_sites(model).items():
        assert left[n] == site.num_heads == before[n][0] - 2
        gqa = before[n][1] < before[n][0]
        assert site.num_kv_heads == (before[n][1] if gqa else site.num_heads)
        assert site.o.in_features == site.q.out_features == site.num_heads * site.head_dim
    with torch.no_grad():
        out = model(ids)
    got = getattr(out, "logits", None) if getattr(out, "logits", None) is not None else out.last_hidden_state
    assert (got - ref).abs().max().item() < 1e-5


_FACTORY = '''
import torch, transformers


def build():
    torch.manual_seed(0)
    cfg = transformers.{cls}Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=8, {extra})
    return transformers.{cls}Model(cfg{args}).eval()


def example_inputs():
    return (torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0)),)
'''


@pytest.mark.parametrize("cls", ["Bert", "Llama"])
def test_prune_transformer_plans_save_load_and_replay_to_identical_outputs(tmp_path, cls: str) -> None:
    """Heads, FFN neurons and layers removed, saved as ``prune_transformer`` plans, loaded: the
    rebuilt model replays them through the same surgery and gives identical outputs."""
    import json

    import torchslim as ts

    extra = "num_key_value_heads=2, max_position_embeddings=64" if cls == "Llama" else ""
    args = ", add_pooling_layer=False" if cls == "Bert" else ""
    path = tmp_path / "tiny.py"
    path.write_text(_FACTORY.format(cls=cls, extra=extra, args=args))
    model = ts.create_model(f"{path}:build")
    ids = ts.example_inputs(model)[0]
    sites = list(attention_sites(model))
    prune_heads_(model, {sites[0]: [0, 4] if cls == "Llama" else [1, 2, 5], sites[2]: [0, 1, 2, 3]})
    prune_ffn_(model, {next(iter(ffn_sites(model))): list(range(0, 96, 3))})
    drop_layers_(model, [1])
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    saved = ts.save(model, tmp_path / "pruned")
    kinds = [(p["kind"], p.get("op")) for p in json.loads((saved / "plan.json").read_text())["model"]["plans"]]
    assert kinds[-3:] == [("prune_transformer", "heads"), ("prune_transformer", "ffn"), ("prune_transformer", "layers")]
    loaded = ts.load(saved)
    assert [s.num_heads for s in attention_sites(loaded).values()] == [s.num_heads for s in attention_sites(model).values()]
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, ref)
