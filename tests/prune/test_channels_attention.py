"""Head and width pruning through ``nn.MultiheadAttention``: zeroed heads prune without changing
outputs (slow path and fused fast path), the module stays valid for both, plans replay."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import torchslim as ts
from torchslim.graph import groups
from torchslim.graph._mha import SlicedMultiheadAttention
from torchslim.graph.surgery import slice_model_
from torchslim.prune.channels import prune_channels_


def _encoder(batch_first: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64).eval()


def _zero_heads_and_neurons(model: nn.Module, cg, zero_channels) -> set[int]:
    """Zero the outgoing weights of heads 1 and 3 of every attention and of every third MLP neuron."""
    removed: set[int] = set()
    params = dict(model.named_parameters())
    for g in cg.groups:
        consumers = [(n, d) for n, d in g.members if d == 1 and params[n].dim() == 2]
        if g.head_dim is not None:
            take = [1, 3]
        elif consumers and all(".out_proj." not in n for n, _ in consumers) and g.size == 64:
            take = list(range(0, g.size, 3))
        else:
            continue
        chans = {g.channels[i] for i in take}
        for name, dim in consumers:
            zero_channels(model, cg, name, dim, chans)
        removed |= chans
    return removed


@pytest.mark.parametrize("make", [lambda: _encoder(True), lambda: _encoder(False), _vit], ids=["enc_bf", "enc", "vit"])
def test_zeroed_heads_are_removed_without_changing_outputs(make, zero_channels) -> None:
    model = make()
    x = torch.randn(2, 3, 32, 32) if isinstance(model, VisionTransformer) else torch.randn(2, 7, 32)
    cg = groups(model, x)
    heads = [g for g in cg.groups if g.head_dim is not None]
    assert len(heads) == 2 and all(g.size == 4 and g.head_dim == 8 for g in heads)
    removed = _zero_heads_and_neurons(model, cg, zero_channels)
    with torch.no_grad():
        ref = model(x)  # fused fast path where PyTorch takes it
    ref_slow = model(x)  # autograd on: the slow path
    slice_model_(model, cg.keep_indices(removed), example_inputs=x)
    attn = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert all(type(m) is SlicedMultiheadAttention and m.num_heads == 2 for m in attn)
    assert all(m.in_proj_weight.shape == (48, 32) and m.out_proj.weight.shape == (32, 16) for m in attn)
    with torch.no_grad():
        got = model(x)
    assert (got - ref).abs().max().item() < 1e-5
    assert (model(x) - ref_slow).abs().max().item() < 1e-5


def test_attention_weights_and_masks_match_after_head_removal() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.out_proj.weight[:, 4:8] = 0  # head 1 contributes nothing
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    mask = torch.rand(5, 6) > 0.7
    mask[:, 0] = False
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, -1] = True
    ref, _ = mha(q, kv, kv, key_padding_mask=pad, attn_mask=mask)
    keep = [i for i in range(48) if (i % 16) // 4 != 1]
    slice_model_(mha, {"in_proj_weight": [torch.tensor(keep), None], "in_proj_bias": [torch.tensor(keep)],
                       "out_proj.weight": [None, torch.tensor([i for i in range(16) if i // 4 != 1])]})
    assert type(mha) is SlicedMultiheadAttention and mha.num_heads == 3 and mha.embed_dim == 16
    got, w = mha(q, kv, kv, key_padding_mask=pad, attn_mask=mask)
    assert (got - ref).abs().max().item() < 1e-5
    assert w.shape == (2, 5, 6) and torch.allclose(w.sum(-1), torch.ones(2, 5))
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    a, _ = mha(q, q, q, attn_mask=causal, need_weights=False)
    b, _ = mha(q, q, q, is_causal=True, attn_mask=causal, need_weights=True)
    assert (a - b).abs().max().item() < 1e-5


def test_consistent_widths_return_to_plain_attention_and_its_fast_path() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    rows = torch.tensor([i for i in range(48) if (i % 16) // 4 != 3])  # drop head 3 (q, k, v)
    cols = torch.arange(12)  # and the residual width down to 12 = 3 heads x 4
    keep = {"self_attn.in_proj_weight": [rows, cols], "self_attn.in_proj_bias": [rows],
            "self_attn.out_proj.weight": [cols, cols], "self_attn.out_proj.bias": [cols],
            "linear1.weight": [None, cols], "linear2.weight": [cols, None], "linear2.bias": [cols],
            "norm1.weight": [cols], "norm1.bias": [cols], "norm2.weight": [cols], "norm2.bias": [cols]}
    slice_model_(layer, keep)
    assert type(layer.self_attn) is nn.MultiheadAttention
    assert (layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.self_attn.head_dim) == (12, 3, 4)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x)
    assert (fast - slow).abs().max().item() < 1e-5


def test_failed_surgery_restores_attention_class_and_attributes() -> None:
    model = _encoder(True)
    x = torch.randn(2, 7, 32)
    before = copy.deepcopy(model.state_dict())
    keep = {"layers.0.self_attn.in_proj_weight": [torch.arange(24), None]}  # q/k/v rows out of step
    with pytest.raises(ts.errors.ModelRunError):
        slice_model_(model, keep, example_inputs=x)
    attn = model.layers[0].self_attn
    assert type(attn) is nn.MultiheadAttention and attn.num_heads == 4 and attn.embed_dim == 32
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_vit_half_ratio_prunes_heads_mlp_and_width_and_replays(tmp_path) -> None:
    model = _vit()
    x = torch.randn(1, 3, 32, 32)
    before = ts.profile(model, x, latency=False, size=False).macs
    plan = prune_channels_(model, x, ratio=0.5)
    assert not plan.left_whole
    assert model.hidden_dim == 16 and model.conv_proj.out_channels == 16
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            assert (m.num_heads, m.head_dim, m.embed_dim) == (2, 8, 16)
    out = model(x)
    out.sum().backward()
    assert out.shape == (1, 1000)
    assert ts.profile(model, x, latency=False, size=False).macs <= 0.6 * before
    # replay: the same plan on a fresh model gives the same shapes and, with the weights, outputs
    fresh = _vit()
    from torchslim.prune.channels import replay_channel_plan

    replay_channel_plan(fresh, plan.to_dict())
    fresh.load_state_dict(model.state_dict())
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_gpt2_heads_prune_with_split_size_and_zeroed_heads_keep_outputs(zero_heads) -> None:
    """GPT-2 splits its fused QKV projection with ``split(self.split_size)``: head pruning must
    rewrite ``split_size`` with ``num_heads`` (it was left whole before), and removing heads whose
    outgoing weights are zero leaves the logits unchanged."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tf.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 9))
    cg = groups(model, (ids,))
    heads = [g for g in cg.groups if g.head_dim is not None]
    assert len(heads) == 2 and all(g.size == 4 and g.head_dim == 8 for g in heads)
    removed = zero_heads(model, cg, heads, [1, 3], "c_proj.weight", dim=0)  # rows: Conv1D weight is (in, out)
    with torch.no_grad():
        ref = model(ids).logits
    from torchslim.prune.channels import _head_attrs

    attrs = _head_attrs(model, cg, [{"id": g.id, "size": g.size, "kept": 2} for g in heads])
    slice_model_(model, cg.keep_indices(removed), example_inputs=(ids,), attrs=attrs)
    for block in model.transformer.h:
        assert block.attn.num_heads == 2 and block.attn.split_size == 16
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max().item() < 1e-5


def test_llama_gqa_kv_heads_take_their_query_heads_and_config_follows(zero_channels) -> None:
    """Llama's eager/SDPA path repeats each key/value head for its query heads (expand + reshape):
    a key/value head and its query heads are one prunable unit; zeroing the out-projection columns
    of those query heads and removing the unit keeps the outputs; the config's head counts and FFN
    width follow a uniform pruning."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=100)
    cfg0 = copy.deepcopy(cfg)
    model = tf.LlamaModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 9))
    cg = groups(model, (ids,))
    heads = [g for g in cg.groups if g.head_dim is not None]
    assert len(heads) == 2 and all(g.size == 2 and g.head_dim == 16 for g in heads)
    removed: set[int] = set()
    for g in heads:  # key/value head 1 of each layer: query heads 2 and 3 read it
        chans = {g.channels[1]}
        name = next(n for n, d in g.members if n.endswith("o_proj.weight") and d == 1)
        assert len(zero_channels(model, cg, name, 1, chans)) == 32  # two query heads of 16
        removed |= chans
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    slice_model_(model, cg.keep_indices(removed), example_inputs=(ids,))
    attn = model.layers[0].self_attn
    assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16 and attn.v_proj.out_features == 16
    with torch.no_grad():
        assert (model(ids).last_hidden_state - ref).abs().max().item() < 1e-5
    fresh = tf.LlamaModel(cfg0).eval()  # slice_model_ above rewrote model.config, which is cfg
    plan = prune_channels_(fresh, (ids,), ratio=0.5)
    assert plan.config == {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}
    assert (fresh.config.num_attention_heads, fresh.config.num_key_value_heads, fresh.config.intermediate_size) == (2, 1, 64)


def test_timm_fused_qkv_heads_prune_without_changing_outputs(zero_heads) -> None:
    """timm's ``qkv.reshape(B, N, 3, num_heads, head_dim)``: head h of Q, K and V is one unit
    (the "3" is not a head count); zeroed heads are removed exactly and num_heads follows."""
    timm = pytest.importorskip("timm")
    from torchslim.prune.channels import _head_attrs

    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    cg = groups(model, x)
    heads = [g for g in cg.groups if g.head_dim is not None]
    assert [(g.size, g.head_dim) for g in heads] == [(4, 16), (4, 16)]
    removed = zero_heads(model, cg, heads, [1], "attn.proj.weight")
    with torch.no_grad():
        ref = model(x)
    attrs = _head_attrs(model, cg, [{"id": g.id, "size": g.size, "kept": g.size - 1} for g in heads])
    slice_model_(model, cg.keep_indices(removed), example_inputs=x, attrs=attrs)
    assert model.blocks[0].attn.num_heads == 3 and model.blocks[0].attn.qkv.out_features == 144
    with torch.no_grad():
        assert (model(x) - ref).abs().max().item() < 1e-5
