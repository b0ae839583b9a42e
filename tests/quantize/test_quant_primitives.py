"""Contracts of the affine quantization primitives."""

from __future__ import annotations

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.quantize.primitives import (
    QScheme,
    dequantize,
    fake_quantize,
    pack_int4,
    qrange,
    quantize_tensor,
    sqnr,
    unpack_int4,
)

SCHEMES = [
    QScheme(bits=b, symmetric=sym, signed=sym, granularity=g, group_size=8)
    for b in (2, 4, 8)
    for sym in (True, False)
    for g in ("tensor", "channel", "group")
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_round_trip_error_at_most_half_a_step(scheme: QScheme) -> None:
    w = torch.randn(6, 4, 2, 2) * torch.arange(1, 7).reshape(6, 1, 1, 1)
    q, scale, zp = quantize_tensor(w, scheme)
    lo, hi = qrange(scheme)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    back = dequantize(q, scale, zp, scheme, w.shape)
    assert back.shape == w.shape
    step = fake_quantize(torch.ones_like(w), scale, zp, scheme)  # broadcast the scale to w's layout
    from torchslim.quantize.primitives import unview, view

    s_full = unview(torch.broadcast_to(scale, view(w, scheme).shape), w.shape, scheme)
    assert ((back - w).abs() <= s_full / 2 + 1e-6).all()
    assert step.shape == w.shape


def test_sixteen_bits_is_near_identity() -> None:
    w = torch.randn(32, 16, 3, 3)
    s = QScheme(bits=16, granularity="channel")
    q, scale, zp = quantize_tensor(w, s)
    assert sqnr(w, dequantize(q, scale, zp, s, w.shape)) > 60


def test_eight_bit_per_channel_conv_weights_sqnr() -> None:
    w = torch.randn(64, 32, 3, 3)
    s = QScheme(bits=8, granularity="channel")
    q, scale, zp = quantize_tensor(w, s)
    assert q.dtype == torch.int8
    assert sqnr(w, dequantize(q, scale, zp, s, w.shape)) > 30


def test_per_channel_beats_per_tensor_on_unequal_channels() -> None:
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-2, 1, 16).reshape(16, 1, 1, 1)
    errs = {}
    for g in ("tensor", "channel"):
        s = QScheme(bits=8, granularity=g)
        q, scale, zp = quantize_tensor(w, s)
        errs[g] = sqnr(w, dequantize(q, scale, zp, s, w.shape))
    assert errs["channel"] > errs["tensor"] + 3


def test_fake_quant_ste_gradient() -> None:
    s = QScheme(bits=4)
    x = torch.tensor([-10.0, -0.3, 0.2, 0.5, 10.0], requires_grad=True)
    scale, zp = torch.tensor(0.1), torch.tensor(0.0)
    fake_quantize(x, scale, zp, s).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # clipped values get no gradient


def test_int4_pack_round_trip() -> None:
    q = torch.randint(-8, 8, (101,), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 51
    assert torch.equal(unpack_int4(packed, 101), q)


@pytest.mark.parametrize("bits", [1, 9, 12, 32, 8.0, True])
def test_bad_bits(bits: object) -> None:
    with pytest.raises(ConfigError, match="bits"):
        QScheme(bits=bits)  # type: ignore[arg-type]


def test_bad_group_and_granularity() -> None:
    with pytest.raises(ConfigError, match="granularity"):
        QScheme(granularity="row")
    with pytest.raises(ConfigError, match="group_size"):
        quantize_tensor(torch.randn(4, 10), QScheme(granularity="group", group_size=3))


def test_scheme_dict_round_trip() -> None:
    s = QScheme(bits=4, symmetric=False, signed=False, granularity="group", group_size=32)
    assert QScheme.from_dict(s.to_dict()) == s
