"""Fake-quant modules: observe/freeze, STE, LSQ / LSQ+ step gradients."""

from __future__ import annotations

import torch

from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize
from torchslim.quantize.primitives import QScheme


def test_fake_quantize_observe_then_freeze() -> None:
    fq = FakeQuantize(QScheme(symmetric=False, signed=False), "minmax")
    fq.observing = True
    x = torch.linspace(-1, 3, 101)
    assert torch.equal(fq(x), x)  # observing passes through
    fq.observing = False
    fq.freeze()
    assert abs(float(fq.scale) - 4 / 255) < 1e-6
    y = fq(x)
    assert (y - x).abs().max() <= float(fq.scale) / 2 + 1e-6
    assert not torch.equal(y, x)


def test_lsq_step_gets_gradients() -> None:
    fq = LSQFakeQuantize(QScheme(bits=4, granularity="channel"), shape=(4, 16))
    x = torch.randn(4, 16, requires_grad=True)
    (fq(x) - 2 * x).pow(2).sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.shape == (4, 1)
    assert fq.scale.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    assert fq.offset.grad is None  # plain LSQ learns no offset


def test_lsq_plus_learns_offset_and_reduces_error() -> None:
    torch.manual_seed(0)
    fq = LSQFakeQuantize(QScheme(bits=3, symmetric=False, signed=False), learn_offset=True)
    x = torch.randn(4096) * 0.5 + 1.0
    fq(x)  # initialise from min-max
    opt = torch.optim.Adam(fq.parameters(), lr=0.01)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = (fq(x) - x).pow(2).mean()
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step()
    assert fq.offset.grad is not None
    assert float(loss.detach()) < first
