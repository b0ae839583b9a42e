"""Binary layers: the forward each paper defines, its gradients, and its packed state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.binarize.layers import (
    BinaryConv2d,
    BinaryLinear,
    approx_sign,
    channel_scale,
    sign,
    ste_sign,
)
from torchslim.errors import ConfigError

METHODS = ["bnn", "xnor", "bireal", "bwn"]


def test_sign_of_zero_is_plus_one():
    assert sign(torch.tensor([-0.5, 0.0, 0.5])).tolist() == [-1.0, 1.0, 1.0]


def test_ste_gradient_is_clipped_identity():
    x = torch.tensor([-1.5, -1.0, -0.2, 0.0, 0.7, 1.0, 3.0], requires_grad=True)
    y = ste_sign(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.backward(torch.full_like(x, 2.0))
    assert x.grad.tolist() == [0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0]


def test_approx_sign_gradient_is_piecewise_polynomial():
    x = torch.tensor([-1.5, -0.75, -0.25, 0.0, 0.25, 0.75, 1.0], requires_grad=True)
    approx_sign(x).sum().backward()
    # d/dx of 2x + x^2 (x < 0) and 2x - x^2 (x >= 0) on [-1, 1], 0 outside
    assert x.grad.tolist() == pytest.approx([0.0, 0.5, 1.5, 2.0, 1.5, 0.5, 0.0])


def test_channel_scale_is_exact_for_already_binary_weights():
    alpha = torch.rand(50) + 0.01
    w = sign(torch.randn(50, 333)) * alpha[:, None]
    assert torch.equal(channel_scale(w), alpha)


@pytest.mark.parametrize("method", METHODS)
def test_linear_forward_matches_the_paper_formula(method):
    fp = nn.Linear(64, 32)
    layer = BinaryLinear.from_float(fp, method)
    assert layer.weight is fp.weight and layer.bias is fp.bias  # same Parameters
    x = torch.randn(5, 64)
    wb = sign(fp.weight)
    xb = x if method == "bwn" else sign(x)
    if method == "bnn":
        ref = F.linear(xb, wb) * 64**-0.5 + fp.bias
    else:
        alpha = fp.weight.abs().mean(dim=1)
        ref = F.linear(xb, wb) * alpha + fp.bias
    if method == "bireal":
        ref = ref + F.adaptive_avg_pool1d(x[:, None, :], 32)[:, 0]  # real shortcut, 64 -> 32 features
    assert torch.allclose(layer(x), ref, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_conv_forward_matches_the_paper_formula(method):
    fp = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    layer = BinaryConv2d.from_float(fp, method)
    x = torch.randn(2, 4, 9, 9)
    xb = x if method == "bwn" else sign(x)
    scale = torch.full((8,), 36**-0.5) if method == "bnn" else fp.weight.abs().mean(dim=(1, 2, 3))
    ref = F.conv2d(xb, sign(fp.weight), None, 2, 1) * scale[:, None, None] + fp.bias[:, None, None]
    if method == "bireal":  # pool to 5x5, then repeat channels 4 -> 8
        pooled = F.adaptive_avg_pool2d(x, (5, 5))
        ref = ref + pooled[:, torch.arange(8) * 4 // 8]
    assert torch.allclose(layer(x), ref, atol=1e-5)


def test_xnor_activation_scale():
    fp = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    layer = BinaryConv2d.from_float(fp, "xnor", scale_activations=True)
    x = torch.randn(2, 3, 6, 6)
    k = F.avg_pool2d(x.abs().mean(1, keepdim=True), 3, 1, 1, count_include_pad=True)
    ref = F.conv2d(sign(x), sign(fp.weight), None, 1, 1) * fp.weight.abs().mean(dim=(1, 2, 3))[:, None, None] * k
    assert torch.allclose(layer(x), ref, atol=1e-5)
    lin = BinaryLinear.from_float(nn.Linear(10, 2, bias=False), "xnor", scale_activations=True)
    xl = torch.randn(3, 10)
    ref_l = F.linear(sign(xl), sign(lin.weight)) * channel_scale(lin.weight) * xl.abs().mean(-1, keepdim=True)
    assert torch.allclose(lin(xl), ref_l, atol=1e-6)


def test_bireal_shortcut_grows_and_shrinks_features():
    grow = BinaryLinear.from_float(nn.Linear(3, 6), "bireal")
    shrink = BinaryLinear.from_float(nn.Linear(6, 3), "bireal")
    x = torch.randn(2, 3)
    assert grow._shortcut(x, torch.zeros(2, 6)).tolist() == x[:, [0, 0, 1, 1, 2, 2]].tolist()
    y = torch.randn(2, 6)
    assert torch.allclose(shrink._shortcut(y, torch.zeros(2, 3)), y.reshape(2, 3, 2).mean(-1))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_the_latent_weights(method):
    layer = BinaryConv2d.from_float(nn.Conv2d(3, 4, 3), method)
    x = (torch.rand(2, 3, 6, 6) - 0.5).requires_grad_()
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0  # through the STE / ApproxSign


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_gives_identical_outputs(method):
    a = BinaryConv2d.from_float(nn.Conv2d(5, 6, 3, padding=1), method, word_bits=64)
    b = BinaryConv2d.from_float(nn.Conv2d(5, 6, 3, padding=1), method, word_bits=64)
    sd = a.state_dict()
    assert ("weight::scale" in sd) == (method != "bnn") and "weight" not in sd
    assert sd["weight::signs"].dtype == torch.int64
    b.load_state_dict(sd)
    x = torch.randn(2, 5, 7, 7)
    assert torch.equal(b(x), a(x))
    b.load_state_dict(b.state_dict())  # and again from the reloaded weights
    assert torch.equal(b(x), a(x))


def test_a_float_state_dict_still_loads():
    fp = nn.Linear(8, 2)
    layer = BinaryLinear(8, 2, method="xnor")
    layer.load_state_dict(fp.state_dict())
    assert torch.equal(layer.weight, fp.weight)


def test_bad_layer_options_raise_config_error():
    with pytest.raises(ConfigError, match="bnn, xnor, bireal, bwn"):
        BinaryLinear(4, 2, method="ternary")
    with pytest.raises(ConfigError, match="XNOR-Net option"):
        BinaryLinear(4, 2, method="bnn", scale_activations=True)
    with pytest.raises(ConfigError, match="word_bits"):
        BinaryLinear(4, 2, word_bits=8)
    with pytest.raises(ConfigError, match="zero padding"):
        BinaryConv2d.from_float(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "xnor")
