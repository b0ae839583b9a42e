"""Affine quantization primitives: ranges, scales, quantize / dequantize, STE fake-quant, int4 packing.

Everything is a tensor function driven by a :class:`QScheme` (bits, symmetric or not, signed or
not, per-tensor / per-channel / per-group). Scales and zero points have the *view* shape of the
scheme (see :func:`view`), so they broadcast against the viewed tensor:

* ``"tensor"``: shape ``()``;
* ``"channel"``: ``(C, 1)`` with the tensor viewed as ``(C, -1)`` (channel axis moved first);
* ``"group"``: ``(C, G, 1)`` with the tensor viewed as ``(C, G, group_size)`` (groups of
  consecutive elements of each row, e.g. of a Linear weight's input dimension).

Example:
    >>> import torch
    >>> from torchslim.quantize.primitives import QScheme, quantize_tensor, dequantize
    >>> w = torch.randn(8, 16)
    >>> s = QScheme(bits=8, granularity="channel")
    >>> q, scale, zp = quantize_tensor(w, s)
    >>> q.dtype, tuple(scale.shape)
    (torch.int8, (8, 1))
    >>> bool(((dequantize(q, scale, zp, s, w.shape) - w).abs() <= scale / 2 + 1e-6).all())
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from torchslim.errors import ConfigError

__all__ = [
    "GRANULARITIES",
    "int8_blocks",
    "SCALE_RULES",
    "QScheme",
    "qrange",
    "view",
    "unview",
    "minmax",
    "choose_qparams",
    "quantize",
    "dequantize",
    "quantize_tensor",
    "fake_quantize",
    "round_ste",
    "sqnr",
    "pack_int4",
    "unpack_int4",
]

GRANULARITIES = ("tensor", "channel", "group")
#: how symmetric low-bit weight scales are chosen (:mod:`torchslim.quantize.scale_search`):
#: ``"absmax"`` (``max|w|`` over half the integer range) or ``"search"``
SCALE_RULES = ("absmax", "search")
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def check_bits(bits: Any, what: str = "bits") -> int:
    """Validate a bit width (2-8, or 16 as a near-identity) and return it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ConfigError(f"{what} must be an integer in 2..8 (or 16, a near-identity); got {bits!r}")
    return bits


@dataclass(frozen=True)
class QScheme:
    """How one tensor is quantized.

    Attributes:
        bits: 2..8 (or 16, numerically a near no-op).
        symmetric: zero point fixed at 0 (signed) / mid-range (unsigned) and range ``max|x|``.
        signed: integers in ``[-2^(b-1), 2^(b-1)-1]`` instead of ``[0, 2^b-1]``.
        granularity: ``"tensor"``, ``"channel"`` or ``"group"``.
        axis: the channel axis for ``"channel"`` (0 for weights).
        group_size: elements per group for ``"group"`` (along the flattened row).
        narrow: symmetric signed range without the most negative value (``[-127, 127]``).
        scale_rule: how a weight's scales are chosen where it is stored as integers
            (:class:`~torchslim.quantize.weight_only.QuantizedLinear`, GPTQ): ``"absmax"``
            (min-max) or ``"search"`` (symmetric signed schemes of at most 4 bits: a per-group
            search, :mod:`torchslim.quantize.scale_search`; others use min-max).
    """

    bits: int = 8
    symmetric: bool = True
    signed: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int = 128
    narrow: bool = False
    scale_rule: str = "absmax"

    def __post_init__(self) -> None:
        check_bits(self.bits, "QScheme.bits")
        if not isinstance(self.scale_rule, str) or self.scale_rule not in SCALE_RULES:
            raise ConfigError(f"QScheme.scale_rule must be one of {', '.join(SCALE_RULES)}; got {self.scale_rule!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"QScheme.granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"QScheme.group_size must be a positive integer; got {self.group_size!r}")
        if not isinstance(self.axis, int):
            raise ConfigError(f"QScheme.axis must be an integer; got {self.axis!r}")

    @property
    def qmin(self) -> int:
        return qrange(self)[0]

    @property
    def qmax(self) -> int:
        return qrange(self)[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QScheme:
        return cls(**d)


def qrange(scheme: QScheme) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a scheme."""
    b = scheme.bits
    if scheme.signed:
        lo, hi = -(2 ** (b - 1)), 2 ** (b - 1) - 1
        return (lo + 1 if scheme.narrow and scheme.symmetric else lo), hi
    return 0, 2**b - 1


def view(x: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """``x`` reshaped so that reducing its last dim gives one value per scale (see module doc)."""
    if scheme.granularity == "tensor":
        return x.reshape(1, -1)
    c = x.movedim(scheme.axis, 0) if scheme.granularity == "channel" else x
    rows = c.reshape(c.shape[0], -1)
    if scheme.granularity == "channel":
        return rows
    if rows.shape[1] % scheme.group_size:
        raise ConfigError(
            f"group_size={scheme.group_size} does not divide the row length {rows.shape[1]} of a tensor of shape {tuple(x.shape)}"
        )
    return rows.reshape(rows.shape[0], -1, scheme.group_size)


def unview(v: torch.Tensor, shape: torch.Size | tuple[int, ...], scheme: QScheme) -> torch.Tensor:
    """Inverse of :func:`view` for a tensor of original shape ``shape``."""
    if scheme.granularity == "channel":
        moved = list(shape)
        moved.insert(0, moved.pop(scheme.axis))
        return v.reshape(moved).movedim(0, scheme.axis)
    return v.reshape(shape)


def _qparam_shape(v: torch.Tensor, scheme: QScheme) -> tuple[int, ...]:
    return () if scheme.granularity == "tensor" else (*v.shape[:-1], 1)


def minmax(x: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale minimum and maximum of ``x`` (view shape, see module doc)."""
    v = view(x.detach(), scheme)
    lo, hi = v.amin(dim=-1, keepdim=True), v.amax(dim=-1, keepdim=True)
    shape = _qparam_shape(v, scheme)
    return lo.reshape(shape), hi.reshape(shape)


def choose_qparams(lo: torch.Tensor, hi: torch.Tensor, scheme: QScheme, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[lo, hi]`` (always widened to include 0) onto the integer range."""
    qmin, qmax = qrange(scheme)
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if scheme.symmetric:
        amax = torch.maximum(-lo, hi)
        half = (qmax - qmin) / 2
        scale = torch.clamp(amax / half, min=eps)
        zp = torch.full_like(scale, 0.0 if scheme.signed else float(round((qmin + qmax + 1) / 2)))
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zp


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` with the straight-through gradient 1."""
    return x + (torch.round(x) - x).detach()


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Integers ``clamp(round(x / scale) + zp)`` in the view shape, as int8 (bits <= 8) or int32."""
    qmin, qmax = qrange(scheme)
    v = view(x, scheme)
    q = torch.clamp(torch.round(v / scale) + zero_point, qmin, qmax)
    dtype = torch.int8 if scheme.bits <= 8 and scheme.signed else torch.uint8 if scheme.bits <= 8 else torch.int32
    return q.to(dtype)


def int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` rounded to int8 per block of ``block`` consecutive values of its last axis, in float.

    Each block's scale is ``max|x| / 127`` (symmetric), values round half to even: the numerics of
    ONNX Runtime's ``MatMulNBits`` at ``accuracy_level=4``, which quantizes its input rows this way
    (blocks of the weight's ``block_size``) before its integer dot products, so a layer that rounds
    its input with this computes what that kernel computes, to float rounding. The gradient passes
    straight through.

    Example:
        >>> x = torch.tensor([[0.5, -1.0, 0.01, 0.0, 2.0, 2.0, 2.0, 2.0]])
        >>> int8_blocks(x, 4)[0, :3].tolist()
        [0.5039370059967041, -1.0, 0.007874015718698502]
    """
    v = x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = v.abs().amax(-1, keepdim=True)
    # 127 / max as one correctly rounded division, as the kernel (torch's ``127.0 / t`` is
    # ``t.reciprocal() * 127``: two roundings, a different int8 at some ties)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = (torch.round(v * inverse) * (amax / 127.0)).reshape(x.shape).to(x.dtype)
    return x + (q - x).detach() if x.requires_grad else q


def nearest_ints(x: torch.Tensor, scale: torch.Tensor, zero_point: Any, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale) + zp)`` in ``x``'s dtype, 0 where ``scale`` is 0 (a group of zeros
    stores a zero step and zero integers)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(x / safe) + zero_point, qmin, qmax) * (scale != 0)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme, shape: torch.Size | tuple[int, ...]
) -> torch.Tensor:
    """Back to float in the original ``shape``: ``(q - zp) * scale``."""
    return unview((q.to(scale.dtype) - zero_point.to(scale.dtype)) * scale, shape, scheme)


def quantize_tensor(x: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantize ``x``: returns ``(q, scale, zero_point)`` (``q`` in the view shape)."""
    lo, hi = minmax(x, scheme)
    scale, zp = choose_qparams(lo, hi, scheme)
    return quantize(x, scale, zp, scheme), scale, zp


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Quantize then dequantize in float, differentiable with the straight-through estimator.

    The gradient w.r.t. ``x`` is 1 inside the representable range and 0 where ``x`` is clipped.
    """
    qmin, qmax = qrange(scheme)
    v = view(x, scheme)
    scale = scale.to(v.dtype)
    zero_point = zero_point.to(v.dtype)
    q = torch.clamp(round_ste(v / scale) + zero_point, qmin, qmax)
    return unview((q - zero_point) * scale, x.shape, scheme)


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit integers (int8 tensor with values in [-8, 7]) two per byte (uint8, flat)."""
    flat = (q.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``numel`` signed 4-bit values as int8."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    both = torch.stack([lo, hi], dim=1).reshape(-1)[:numel]
    return torch.where(both > 7, both - 16, both)
