"""Contracts of the distillation losses: zero at agreement, reductions to known losses, adapters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as ts
from torchslim.distill import losses as L
from torchslim.errors import ConfigError


def test_every_loss_is_registered():
    assert ts.list_methods("distill.loss") == [
        "distill.loss.at", "distill.loss.hint", "distill.loss.kd", "distill.loss.tinybert"
    ]


def test_kd_is_zero_when_student_equals_teacher_and_reduces_to_cross_entropy():
    t = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    assert float(L.kd_loss(t, t, y, temperature=4.0, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 5)
    torch.testing.assert_close(L.kd_loss(s, t, y, 4.0, alpha=0.0), F.cross_entropy(s, y))
    # unlabeled rows (-1) drop out of the hard term; all-unlabeled keeps the soft term only
    soft = L.kd_loss(s, t, None, 4.0, 1.0)
    torch.testing.assert_close(L.kd_loss(s, t, torch.full((8,), -1), 4.0, 0.5), soft)
    mixed = y.clone()
    mixed[:4] = -1
    torch.testing.assert_close(
        L.kd_loss(s, t, mixed, 4.0, 0.5), 0.5 * soft + 0.5 * F.cross_entropy(s[4:], y[4:])
    )


def test_kd_soft_term_is_t_squared_kl():
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    kl = (F.softmax(t / 2, 1) * (F.log_softmax(t / 2, 1) - F.log_softmax(s / 2, 1))).sum(1).mean()
    torch.testing.assert_close(L.kd_loss(s, t, None, 2.0, 1.0), 4 * kl)


def test_kd_gives_no_gradient_to_the_teacher():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    L.KDLoss()(s, t, torch.zeros(4, dtype=torch.long)).backward()
    assert s.grad is not None and t.grad is None


def test_attention_maps_are_normalised_and_at_is_zero_for_same_attention():
    f = torch.randn(2, 8, 6, 6)
    q = L.attention_map(f)
    assert q.shape == (2, 36)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(2))
    # same spatial attention, other channel count and scale: zero loss; different sizes are pooled
    assert float(L.at_loss(f, 3 * torch.cat([f, f], 1))) == pytest.approx(0.0, abs=1e-9)
    assert L.at_loss(torch.randn(2, 4, 8, 8), torch.randn(2, 16, 4, 4)).shape == ()
    assert L.attention_map(torch.randn(2, 7, 5)).shape == (2, 7)
    with pytest.raises(ConfigError, match="attention transfer needs feature maps"):
        L.attention_map(torch.randn(2, 5))


def test_adapters_match_widths_and_identity_when_equal():
    assert isinstance(L.make_adapter(torch.Size([2, 4, 7, 7]), torch.Size([2, 16, 7, 7])), nn.Conv2d)
    assert isinstance(L.make_adapter(torch.Size([2, 32]), torch.Size([2, 64])), nn.Linear)
    assert isinstance(L.make_adapter(torch.Size([2, 5, 32]), torch.Size([2, 5, 32])), nn.Identity)
    with pytest.raises(ConfigError, match="same kind"):
        L.make_adapter(torch.Size([2, 4, 7, 7]), torch.Size([2, 16]))


def test_hint_loss_trains_its_adapter_and_is_zero_at_a_perfect_match():
    s, t = torch.randn(4, 3, 5, 5), torch.randn(4, 6, 5, 5)
    loss = L.HintLoss(feature_weight=1.0)
    loss.setup([(s, t)])
    assert isinstance(loss.adapters[0], nn.Conv2d) and loss.adapters[0].out_channels == 6
    logits = torch.randn(4, 10)
    value = loss(logits, logits, None, [(s, t)])
    value.backward()
    assert loss.adapters[0].weight.grad is not None
    same = L.HintLoss(temperature=1.0, alpha=1.0)
    same.setup([(t, t)])
    assert float(same(logits, logits, None, [(t, t)])) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="feature pair"):
        loss(logits, logits, None, [])


def test_tinybert_matches_hidden_states_and_attention_maps():
    hs, ht = torch.randn(2, 5, 8), torch.randn(2, 5, 16)
    as_, at = torch.softmax(torch.randn(2, 2, 5, 5), -1), torch.softmax(torch.randn(2, 4, 5, 5), -1)
    loss = L.TinyBERTLoss(alpha=1.0)
    loss.setup([(hs, ht)], [(as_, at)])
    logits = torch.randn(2, 3)
    expected = F.mse_loss(loss.adapters[0](hs), ht) + F.mse_loss(as_.mean(1), at.mean(1))
    torch.testing.assert_close(loss(logits, logits, None, [(hs, ht)], [(as_, at)]), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ConfigError, match="sequence length"):
        loss.setup([(hs, ht)], [(as_, torch.randn(2, 4, 6, 6))])


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_vocab_kl_loss_has_kd_loss_value_and_gradient_in_row_blocks(temperature):
    g = torch.Generator().manual_seed(0)
    s0, t = torch.randn(10, 300, generator=g) * 3, torch.randn(10, 300, generator=g) * 3
    ref_s = s0.clone().requires_grad_(True)
    ref = L.kd_loss(ref_s, t, None, temperature=temperature, alpha=1.0)
    (ref * 1.7).backward()
    s = s0.clone().requires_grad_(True)
    got = L.vocab_kl_loss(s, t, temperature=temperature, rows=3)  # 3 does not divide the 10 rows
    (got * 1.7).backward()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=1e-4, atol=1e-7)
    assert float(L.vocab_kl_loss(t, t, temperature=temperature)) == pytest.approx(0.0, abs=1e-6)

    half = s0.bfloat16().requires_grad_(True)  # bfloat16 logits (autocast): float32 inside, a bfloat16 gradient out
    L.vocab_kl_loss(half, t.bfloat16(), temperature=temperature).backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()
    with pytest.raises(ConfigError, match=r"two \(N, vocab\) logits of one shape"):
        L.vocab_kl_loss(s0, t[:, :10])
