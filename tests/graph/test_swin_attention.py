"""torchvision Swin window attention: the sliced forward (head width from the qkv weight, query
scale frozen) is the same function as torchvision's, and lets the residual width be pruned."""

from __future__ import annotations

import pytest
import torch
import torchvision

import torchslim as ts
from torchslim.graph._swin import sliced_swin, swin_attention_types, switch_swin_
from torchslim.prune.channels import prune_channels_


@pytest.mark.parametrize("arch", ["swin_t", "swin_v2_t"])
def test_sliced_forward_equals_torchvision(arch: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    x = torch.randn(2, 3, 96, 112)  # not a multiple of the window: padding and shifts both used
    with torch.no_grad():
        ref = model(x)
        with sliced_swin(model):
            assert all(type(m).__name__.startswith("Sliced") for m in model.modules() if hasattr(m, "query_scale"))
            got = model(x)
    assert (got - ref).abs().max().item() < 1e-5
    # the context restores the original classes
    assert all(type(m) in swin_attention_types() for m in model.modules() if "WindowAttention" in type(m).__name__)


def test_sliced_attention_runs_with_narrower_residual_than_heads() -> None:
    torch.manual_seed(0)
    attn = torchvision.models.swin_transformer.ShiftedWindowAttention(32, [4, 4], [2, 2], num_heads=4).eval()
    x = torch.randn(1, 8, 8, 32)
    keep = torch.arange(0, 32, 2)  # half the residual channels in and out; heads and head width intact
    x_zeroed = torch.zeros_like(x)
    x_zeroed[..., keep] = x[..., keep]  # the removed input channels carry nothing
    with torch.no_grad():
        ref = attn(x_zeroed)[..., keep]
    switch_swin_(attn)
    with torch.no_grad():
        attn.qkv.weight.data = attn.qkv.weight.data[:, keep].clone()
        attn.proj.weight.data = attn.proj.weight.data[keep].clone()
        attn.proj.bias.data = attn.proj.bias.data[keep].clone()
        out = attn(x[..., keep])  # torchvision's forward would now take head width 16 // 4 = 4
    assert out.shape == (1, 8, 8, 16)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ["swin_t", "swin_v2_t"])
def test_swin_half_ratio_prunes_residual_streams(arch: str) -> None:
    model = ts.create_model(f"torchvision:{arch}")
    (x,) = ts.example_inputs(model)
    before = ts.profile(model, latency=False, size=False).macs
    plan = prune_channels_(model, ratio=0.5)
    assert plan.left_whole == []
    out = model(x)
    out.sum().backward()
    assert out.shape == (1, 1000)
    assert ts.profile(model, latency=False, size=False).macs <= 0.45 * before


@pytest.mark.parametrize("arch", ["swin_t", "swin_v2_t"])
def test_zeroed_heads_prune_without_changing_outputs(arch: str, zero_heads) -> None:
    """Head h of Q, K, V, its relative-position bias (V1: a table column; V2: a row of the bias MLP's
    last layer and its logit scale) go together; heads whose out-projection columns are zero go
    without changing the output."""
    from torchslim.graph import groups
    from torchslim.graph.surgery import slice_model_
    from torchslim.prune.channels import _head_attrs

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    x = torch.randn(1, 3, 64, 64)
    cg = groups(model, x)
    heads = [g for g in cg.groups if g.head_dim is not None]
    assert heads and all(g.head_dim == 32 for g in heads)
    removed = zero_heads(model, cg, heads, [0], "attn.proj.weight")
    with torch.no_grad():
        ref = model(x)
    attrs = _head_attrs(model, cg, [{"id": g.id, "size": g.size, "kept": g.size - 1} for g in heads])
    slice_model_(model, cg.keep_indices(removed), example_inputs=x, attrs=attrs)
    attn = model.features[1][0].attn
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * 32
    with torch.no_grad():
        assert (model(x) - ref).abs().max().item() < 1e-4


def test_swin3d_sliced_forward_equals_torchvision_and_prunes_its_residual_streams() -> None:
    """Video Swin3D: the 3-D window attention gets the same sliced forward; at ratio 0.5 the
    residual streams prune too (it kept 0.74 of its MACs when they were left whole)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("swin3d_t", weights=None).eval()
    x = torch.randn(1, 3, 8, 64, 64)  # shifted windows (8x7x7) with padding on H and W
    with torch.no_grad():
        ref = model(x)
        with sliced_swin(model):
            assert torch.allclose(model(x), ref, atol=1e-5)
    assert all(type(m) in swin_attention_types() for m in model.modules() if "Attention" in type(m).__name__)
    ts.set_example_inputs(model, (x,))
    before = ts.profile(model, latency=False, size=False).macs
    plan = prune_channels_(model, ratio=0.5)
    assert plan.left_whole == []
    assert ts.profile(model, latency=False, size=False).macs <= 0.6 * before
    model.train()
    out = model(x)
    assert out.shape == ref.shape
    out.sum().backward()
