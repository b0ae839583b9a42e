"""Weight-only quantization with real packed storage: int8 per-channel, int4 per-group (two per byte).

:class:`QuantizedLinear` replaces an ``nn.Linear``: it stores the integer weight (``int8``, or
``uint8`` holding two 4-bit values for ``bits <= 4``), fp16 scales (and zero points when
asymmetric) and the fp32 bias. Its state dict is what ``ts.save`` writes, so the file on disk
really is ~4x (int8) or ~8x (int4) smaller than fp32. With ``dynamic_act=True`` the input is also
quantized per tensor at run time (8-bit asymmetric, the numerics of dynamic quantization). With
``act_block=B`` (weight-only ``compute="int8"``) the input is rounded to int8 per block of ``B``
inputs first (:func:`~torchslim.quantize.primitives.int8_blocks`): what ONNX Runtime's
``MatMulNBits`` computes at ``accuracy_level=4``, so the exported layer equals this one.

``forward`` runs an integer kernel where one is correct and faster on the input's device,
dtype and row count (dynamic int8 on CPU: ``quantized::linear_dynamic``; weight-only int8 / int4
with a few bfloat16 rows: ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``) or a
cheaper dequantization (the int8 weight cast, scales on the output; int4 unpacked once and
cached), chosen in :mod:`torchslim.quantize.kernels`; everywhere else it dequantizes the weight
and calls ``F.linear`` (:meth:`QuantizedLinear.reference_forward`, also what autograd,
``torch.compile``, export and ``ts.profile``'s tracer see).
Casting the module (``.to(torch.bfloat16)``, ``.half()``) leaves the fp16 scales and zero points
as stored.

Example:
    >>> import torch
    >>> from torchslim.quantize.weight_only import QuantizedLinear
    >>> from torchslim.quantize.primitives import QScheme
    >>> lin = torch.nn.Linear(64, 8)
    >>> q = QuantizedLinear.from_float(lin, QScheme(bits=4, granularity="group", group_size=32))
    >>> q.qweight.dtype, q.qweight.numel()
    (torch.uint8, 256)
    >>> x = torch.randn(2, 64)
    >>> float((q(x) - lin(x)).abs().max()) < 0.5
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.quantize import kernels
from torchslim.quantize.primitives import (
    QScheme,
    _qparam_shape,
    choose_qparams,
    dequantize,
    fake_quantize,
    int8_blocks,
    minmax,
    nearest_ints,
    pack_int4,
    qrange,
    quantize,
    unpack_int4,
    view,
)

__all__ = ["QuantizedLinear", "storage_shapes"]

_ACT = QScheme(bits=8, symmetric=False, signed=False)


def storage_shapes(scheme: QScheme, out_features: int, in_features: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(qweight, scale, zero_point)`` shapes of a ``(out, in)`` weight under ``scheme``."""
    v = view(torch.empty(out_features, in_features, device="meta"), scheme)
    pshape = () if scheme.granularity == "tensor" else (*v.shape[:-1], 1)
    n = out_features * in_features
    qshape = (math.ceil(n / 2),) if scheme.bits <= 4 else tuple(v.shape)
    return qshape, pshape, pshape if not scheme.symmetric else (0,)


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is stored as integers (see module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QScheme, dynamic_act: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.dynamic_act = dynamic_act
        self.act_block = 0  # > 0: inputs rounded to int8 per block of this many (weight-only compute="int8")
        qshape, pshape, zshape = storage_shapes(scheme, out_features, in_features)
        if scheme.bits <= 4 or (scheme.bits <= 8 and not scheme.signed):
            dtype = torch.uint8
        else:
            dtype = torch.int8 if scheme.bits <= 8 else torch.int32
        self.register_buffer("qweight", torch.zeros(qshape, dtype=dtype))
        self.register_buffer("scale", torch.ones(pshape, dtype=torch.float16))
        self.register_buffer("zero_point", torch.zeros(zshape, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, scheme: QScheme, dynamic_act: bool = False) -> QuantizedLinear:
        """Round-to-nearest quantization of ``linear``'s weight (min-max range per scale, or the
        searched scales of ``scheme.scale_rule="search"``, :mod:`torchslim.quantize.scale_search`)."""
        from torchslim.quantize.scale_search import searches, weight_qparams

        w = linear.weight.detach().float()
        if searches(scheme):
            scale, zp = weight_qparams(view(w, scheme), scheme)
            v = view(w, scheme)
            scale = scale.reshape(_qparam_shape(v, scheme))
            qmin, qmax = qrange(scheme)
            return cls.from_ints(linear, nearest_ints(v, scale, zp, qmin, qmax), scale, zp, scheme, dynamic_act)
        lo, hi = minmax(w, scheme)
        scale, zp = choose_qparams(lo, hi, scheme)
        scale = scale.half().float()  # quantize against the scale actually stored
        return cls.from_ints(linear, quantize(w, scale, zp, scheme), scale, zp, scheme, dynamic_act)

    @classmethod
    @torch.no_grad()
    def from_ints(
        cls, linear: nn.Linear, ints: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme,
        dynamic_act: bool = False,
    ) -> QuantizedLinear:
        """Store given integers (in the scheme's range; any shape with ``out * in`` elements), their
        scales and zero points for ``linear`` (whose bias is copied), packing 4-bit values."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, dynamic_act).to(linear.weight.device)
        if scheme.bits <= 4:
            packed_src = ints.to(torch.int16) - (0 if scheme.signed else 8)  # unsigned 0..15 -> -8..7
            q.qweight.copy_(pack_int4(packed_src.to(torch.int8)))
        else:
            q.qweight.copy_(ints.reshape(q.qweight.shape).to(q.qweight.dtype))
        q.scale.copy_(scale.reshape(q.scale.shape).half())
        if not scheme.symmetric:
            q.zero_point.copy_(zero_point.reshape(q.zero_point.shape).half())
        if linear.bias is not None:
            q.bias.data = linear.bias.detach().clone()
        return q

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the integers stand for."""
        s = self.scheme
        vshape = view(torch.empty(self.out_features, self.in_features, device="meta"), s).shape
        if s.bits <= 4:
            ints = unpack_int4(self.qweight, self.out_features * self.in_features).to(torch.int16)
            ints = (ints + (0 if s.signed else 8)).reshape(vshape)
        else:
            ints = self.qweight.reshape(vshape)
        if not s.symmetric:
            zp = self.zero_point.float()
        else:  # symmetric: the zero point is implied (0 signed, the range's middle unsigned)
            zp = torch.full((), 0.0 if s.signed else float(round((sum(qrange(s)) + 1) / 2)), device=self.scale.device)
        return dequantize(ints, self.scale.float(), zp, s, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_block and x.numel():
            x = int8_blocks(x, self.act_block)
        kernel = kernels.choose_kernel(self, x)
        if kernel != "reference":
            return kernels.run_kernel(kernel, self, x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize the weight (fake-quantize ``x`` when dynamic) and ``F.linear``: the numerics
        every kernel is checked against, differentiable with the straight-through estimator.
        ``act_block`` rounding happens in :meth:`forward`, before either path."""
        if self.dynamic_act and x.numel():
            lo, hi = minmax(x.detach(), _ACT)
            scale, zp = choose_qparams(lo, hi, _ACT)
            x = fake_quantize(x, scale, zp, _ACT)
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """Moves follow the module; dtype casts leave the stored fp16 scales / zero points alone
        (a bfloat16 model must not round its scales), and derived kernel layouts are dropped."""
        kept = {k: self._buffers[k] for k in ("scale", "zero_point")}
        out = super()._apply(fn, recurse)
        for k, old in kept.items():
            new = self._buffers[k]
            if new is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        kernels.forget(self)
        return out

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        kernels.forget(self)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_kernel_cache", None)  # derived at the next call; packed kernel objects stay out of copies
        return state

    def extra_repr(self) -> str:
        s = self.scheme
        return (
            f"in={self.in_features}, out={self.out_features}, int{s.bits} {s.granularity}"
            + (f"(group={s.group_size})" if s.granularity == "group" else "")
            + (", dynamic activations" if self.dynamic_act else "")
            + (f", int8 activations per {self.act_block}" if self.act_block else "")
        )
