"""Static int8 that is real in PyTorch: integer Conv / Linear modules and the compiled fast path.

After calibration (``quantize_(mode="static")``) or at the end of QAT (``ts.finalize_``), every
quantized Conv1d/2d/3d and Linear whose quantizers are int8-shaped becomes an :class:`Int8Conv` or
:class:`Int8Linear`. It holds

* ``qweight``: the weight as ``int8`` (symmetric, per output channel; a per-tensor scale is
  stored once per channel), ``weight_scale`` (fp32, one per output channel);
* ``input_scale`` / ``input_zero_point``: the calibrated uint8 range of its input (per tensor);
* ``output_scale`` / ``output_zero_point``: the calibrated uint8 range of its output (scale 0
  where none was calibrated, e.g. after QAT); only :func:`compile` reads it (below);
* ``bias``: the float bias (BN folded in, bias correction applied),

so its state dict, and the ``model.safetensors`` ``ts.save`` writes, holds one byte per weight.

The forward has the numerics of int8 and is written with the decomposed quantization ops torch
ships, in the very pattern PyTorch 2 export quantization produces::

    x  -> quantize_per_tensor(uint8) -> dequantize_per_tensor
    qw -> dequantize_per_channel(int8)
    y  =  conv / linear(x, w, bias)

Eager, that is simulation (slower than fp32). :func:`torchslim.quantize.int8_compile.compile`
(``ts.quantize.compile``) runs it on oneDNN int8 kernels.

Layers that stay fake-quant (:func:`int8_blocker` says why): weight bits other than 8 (mixed
precision: an integer kernel exists for int8 only), asymmetric weights (oneDNN needs weight zero
points of 0), activations other than 8-bit, a conv with ``padding_mode`` other than zeros.

Example:
    >>> import torch
    >>> from torchslim.quantize import QuantConfig, quantize_
    >>> from torchslim.quantize.int8 import Int8Linear
    >>> _ = torch.manual_seed(0)
    >>> m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> plan = quantize_(m, QuantConfig(mode="static"), calibration=[torch.randn(8, 16) for _ in range(2)])
    >>> isinstance(m[0], Int8Linear), m[0].qweight.dtype, plan.integer
    (True, torch.int8, ['0', '2'])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines torch.ops.quantized_decomposed; no torch.ao flow is used)
from torch import nn
from torch.nn import functional as F

from torchslim.errors import ConfigError
from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize
from torchslim.quantize.primitives import QScheme, qrange

__all__ = ["Int8Linear", "Int8Conv", "INT8_TYPES", "int8_blocker", "to_int8_", "empty_int8_"]

_W_MIN, _W_MAX = -128, 127
_A_MIN, _A_MAX = 0, 255

_QD = torch.ops.quantized_decomposed

# set by int8_compile.compile() around its calls: Int8 layers then mark their calibrated output range in the
# traced graph (dynamo guards on it, so plain torch.compile traces no marker)
_MARK_OUTPUTS = False


@torch.library.custom_op("torchslim::int8_output_range", mutates_args=())
def _int8_output_range(y: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """A copy of ``y`` that carries ``y``'s calibrated uint8 grid into the traced graph."""
    return y.clone()


@_int8_output_range.register_fake
def _(y: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.empty_like(y)



class _Int8Base(nn.Module):
    """Buffers and the input quantization shared by :class:`Int8Linear` and :class:`Int8Conv`."""

    def _init_int8(self, weight_shape: tuple[int, ...], bias: bool, device: Any = None) -> None:
        out = weight_shape[0]
        self.register_buffer("qweight", torch.zeros(weight_shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out, dtype=torch.float32, device=device))
        # oneDNN takes symmetric weights only: the zero points are all 0, not worth saving
        self.register_buffer("weight_zero_point", torch.zeros(out, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32, device=device))
        # the calibrated uint8 range of the output (scale 0: not calibrated); read by compile() only
        self.register_buffer("output_scale", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("output_zero_point", torch.zeros((), dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out, device=device)) if bias else None
        self._sync_qparams()

    def _sync_qparams(self) -> None:
        # python numbers: the ops' .default overloads (what the inductor patterns match) take scalars
        if self.input_scale.is_meta:
            self._in_scale, self._in_zp, self._out_scale, self._out_zp = 1.0, 0, 0.0, 0
            return
        self._in_scale = float(self.input_scale)
        self._in_zp = int(self.input_zero_point)
        self._out_scale = float(self.output_scale)
        self._out_zp = int(self.output_zero_point)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        for k in ("output_scale", "output_zero_point"):  # files written before output ranges were kept
            if prefix + k in missing_keys:
                missing_keys.remove(prefix + k)
                getattr(self, k).zero_()
        self._sync_qparams()

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)
        if self.input_scale.is_floating_point():
            self._sync_qparams()
        return out

    @torch.no_grad()
    def set_qparams(self, weight_int: torch.Tensor, weight_scale: torch.Tensor, input_scale: float, input_zero_point: int) -> None:
        """Store integer weights (any shape with the weight's elements), per-channel (or one) scales
        and the input's uint8 scale and zero point."""
        self.qweight.copy_(weight_int.reshape(self.qweight.shape).to(torch.int8))
        self.weight_scale.copy_(weight_scale.float().reshape(-1).expand(self.weight_scale.shape))
        self.input_scale.fill_(float(input_scale))
        self.input_zero_point.fill_(int(input_zero_point))
        self._sync_qparams()

    @torch.no_grad()
    def set_output_range(self, low: float, high: float) -> None:
        """Store the calibrated output range ``[low, high]`` as a uint8 scale and zero point (the
        range is widened to hold 0). :func:`compile` quantizes an output on this grid where it
        feeds a residual add, so the add runs inside the next conv's int8 kernel."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        scale = (high - low) / (_A_MAX - _A_MIN)
        if not scale > 0 or scale != scale or scale == float("inf"):
            self.output_scale.zero_()
            self.output_zero_point.zero_()
        else:
            self.output_scale.fill_(scale)
            self.output_zero_point.fill_(int(min(max(round(_A_MIN - low / scale), _A_MIN), _A_MAX)))
        self._sync_qparams()

    def _mark_output(self, y: torch.Tensor) -> torch.Tensor:
        # only while compile() traces: a marker its graph pass reads (and removes)
        if _MARK_OUTPUTS and self._out_scale > 0 and torch.compiler.is_compiling():
            return torch.ops.torchslim.int8_output_range(y, self._out_scale, self._out_zp)
        return y

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the integers stand for."""
        shape = [-1] + [1] * (self.qweight.dim() - 1)
        return self.qweight.float() * self.weight_scale.reshape(shape)

    def _qdq_input(self, x: torch.Tensor) -> torch.Tensor:
        q = _QD.quantize_per_tensor(x, self._in_scale, self._in_zp, _A_MIN, _A_MAX, torch.uint8)
        return _QD.dequantize_per_tensor(q, self._in_scale, self._in_zp, _A_MIN, _A_MAX, torch.uint8)

    def _weight(self) -> torch.Tensor:
        return _QD.dequantize_per_channel(
            self.qweight, self.weight_scale, self.weight_zero_point, 0, _W_MIN, _W_MAX, torch.int8
        )

    def _float_in(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == torch.float32 else x.float()


class Int8Linear(_Int8Base):
    """A Linear layer with int8 weights and a calibrated uint8 input (see module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_int8((out_features, in_features), bias, device)

    @classmethod
    def like(cls, layer: nn.Module) -> Int8Linear:
        return cls(layer.in_features, layer.out_features, layer.bias is not None, device=_device_of(layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = self._mark_output(F.linear(self._qdq_input(self._float_in(x)), self._weight(), self.bias))
        return y if y.dtype == dtype else y.to(dtype)

    def to_float(self) -> nn.Linear:
        """The ``nn.Linear`` with the dequantized weight (what ONNX export re-quantizes)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.qweight.device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights per channel, uint8 input"


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Int8Conv(_Int8Base):
    """A Conv1d/2d/3d with int8 weights and a calibrated uint8 input (see module doc)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...], stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0, dilation: int | tuple[int, ...] = 1, groups: int = 1, bias: bool = True,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.dims = len(kernel_size)
        if self.dims not in _CONV:
            raise ConfigError(f"Int8Conv supports 1-D, 2-D and 3-D kernels; got kernel_size={kernel_size}")

        def dims(v: int | tuple[int, ...]) -> tuple[int, ...]:
            return (v,) * self.dims if isinstance(v, int) else tuple(v)

        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, tuple(kernel_size)
        self.stride, self.dilation, self.groups = dims(stride), dims(dilation), groups
        self.padding = padding if isinstance(padding, str) else dims(padding)
        self._init_int8((out_channels, in_channels // groups, *kernel_size), bias, device)

    @classmethod
    def like(cls, conv: nn.Module) -> Int8Conv:
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.bias is not None, device=_device_of(conv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = _CONV_FN[self.dims](self._qdq_input(self._float_in(x)), self._weight(), self.bias, self.stride,
                                self.padding, self.dilation, self.groups)
        y = self._mark_output(y)
        return y if y.dtype == dtype else y.to(dtype)

    def to_float(self) -> nn.Module:
        """The float conv with the dequantized weight (what ONNX export re-quantizes)."""
        conv = _CONV[self.dims](self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                                self.dilation, self.groups, self.bias is not None, device=self.qweight.device)
        with torch.no_grad():
            conv.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, int8 weights per channel, uint8 input")


INT8_TYPES = (Int8Linear, Int8Conv)


def _device_of(module: nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    return t.device if t is not None else torch.device("cpu")


# --------------------------------------------------------------------------- conversion


def _weight_quantizer(module: nn.Module) -> nn.Module | None:
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return None
    return next((p for p in plist if isinstance(p, (FakeQuantize, LSQFakeQuantize))), None)


def _is_int8_weight(s: QScheme) -> bool:
    return s.bits == 8 and s.symmetric and s.signed and s.granularity in ("tensor", "channel") and s.axis == 0 \
        and qrange(s) == (_W_MIN, _W_MAX)


def int8_blocker(module: nn.Module) -> str | None:
    """Why a fake-quantized Conv/Linear cannot become an integer module, or ``None`` when it can."""
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"{type(module).__name__} is not a Linear or Conv1d/2d/3d"
    wq, iq = _weight_quantizer(module), getattr(module, "input_quant", None)
    if wq is None or iq is None:
        return "it has no weight and input quantizers"
    ws, as_ = wq.scheme, iq.scheme
    if not _is_int8_weight(ws):
        return (f"int{ws.bits} {'symmetric' if ws.symmetric else 'asymmetric'} weights: the integer kernels take "
                "8-bit symmetric weights (it stays fake-quant)")
    if as_.bits != 8 or as_.signed or as_.granularity != "tensor":
        return f"{as_.bits}-bit activations: the integer kernels take 8-bit unsigned per-tensor inputs (it stays fake-quant)"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: only zero padding has an integer form (it stays fake-quant)"
    return None


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _qparams(fq: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(fq, LSQFakeQuantize):
        return fq.qparams()
    return fq.scale.detach(), fq.zero_point.detach()


def _empty_like(layer: nn.Module) -> _Int8Base:
    return Int8Linear.like(layer) if isinstance(layer, nn.Linear) else Int8Conv.like(layer)


def _carry_smoothing(old: nn.Module, new: nn.Module) -> None:
    if hasattr(old, "smooth_scale"):  # SmoothQuant's input division travels with the layer
        from torchslim.quantize.smoothquant import attach_smoothing_

        attach_smoothing_(new, old.smooth_scale.detach().clone())


@torch.no_grad()
def _convert_one(layer: nn.Module) -> _Int8Base:
    wq, iq = _weight_quantizer(layer), layer.input_quant
    # the float weight the quantizer sees: the output of the parametrizations before it (a
    # cluster codebook, a pruning mask), read with the quantizer switched off
    wq.enabled = False
    try:
        w = layer.weight.detach().float()
    finally:
        wq.enabled = True
    scale, _ = _qparams(wq)
    scale = scale.float().reshape(-1)
    per = scale if scale.numel() > 1 else scale.expand(w.shape[0])
    shape = [-1] + [1] * (w.dim() - 1)
    ints = torch.clamp(torch.round(w / per.reshape(shape)), _W_MIN, _W_MAX)
    a_scale, a_zp = _qparams(iq)
    new = _empty_like(layer)
    new.set_qparams(ints, per, float(a_scale.reshape(-1)[0]), int(torch.clamp(a_zp.reshape(-1)[0].round(), _A_MIN, _A_MAX)))
    if layer.bias is not None:
        new.bias.data = layer.bias.detach().clone()
    out_range = getattr(layer, "_ts_output_range", None)  # recorded by ptq.calibrate_
    if out_range is not None:
        from torchslim.quantize.ptq import weight_fingerprint

        if out_range[2] == weight_fingerprint(layer):  # not trained since (QAT): the range holds
            new.set_output_range(out_range[0], out_range[1])
    new.train(layer.training)
    return new


def _other_edits(layer: nn.Module) -> list[str]:
    plist = getattr(getattr(layer, "parametrizations", None), "weight", None)
    return [type(p).__name__ for p in (plist or ()) if not isinstance(p, (FakeQuantize, LSQFakeQuantize))]


def to_int8_(model: nn.Module, names: Iterable[str], *, bake_other_edits: bool = True) -> tuple[list[str], dict[str, str]]:
    """Replace each named fake-quantized layer that has an integer form by its integer module.

    The integers are the fake-quant's own (same scales, same rounding), so the model computes
    what it did, now from int8 weights. Other reversible edits on a weight (a pruning mask, a
    cluster codebook) are baked into the integers, or with ``bake_other_edits=False`` the layer
    stays fake-quant (``ts.finalize_(model, kinds=["qat"])`` leaves masks as they are).

    Returns:
        ``(converted names, {name: why it stays fake-quant})``.
    """
    done: list[str] = []
    kept: dict[str, str] = {}
    for n in names:
        layer = model.get_submodule(n)
        why = int8_blocker(layer)
        others = _other_edits(layer) if why is None and not bake_other_edits else []
        if others:
            why = (f"its weight has other reversible edits ({', '.join(others)}): make them permanent first "
                   "(ts.finalize_), then finalize QAT (it stays fake-quant)")
        if why is not None:
            kept[n] = why
            continue
        new = _convert_one(layer)
        _carry_smoothing(layer, new)
        _set(model, n, new)
        done.append(n)
    return done, kept


def empty_int8_(model: nn.Module, names: Iterable[str]) -> None:
    """Structure only (``ts.load`` replay): replace the named layers (float, or fake-quantized) by
    integer modules of the same shapes, to be filled by the state dict."""
    for n in names:
        layer = model.get_submodule(n)
        new = _empty_like(layer)
        if hasattr(layer, "smooth_scale"):
            from torchslim.quantize.smoothquant import attach_smoothing_

            attach_smoothing_(new)
        _set(model, n, new)
