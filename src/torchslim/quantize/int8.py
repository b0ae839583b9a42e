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

Eager, that is simulation (slower than fp32). :func:`compile` hands the model to
``torch.compile`` with inductor's freezing on and torchao's x86 inductor passes registered: they
recognise the pattern and run oneDNN int8 kernels (``onednn.qconv_pointwise`` /
``onednn.qlinear_pointwise``), fusing the ReLU that follows and the next layer's input
quantization into the kernel. Conv3d layers keep the float kernel (oneDNN's int8 conv is
lowered for 1-D and 2-D only), with the same numerics.

Before those passes, :func:`compile` rewrites inductor's aten graph the way PyTorch 2 export's
``X86InductorQuantizer`` annotates a model, with torchslim's own calibrated ranges:

* a residual ``add(conv(...), t)`` (ResNet's ``out += identity``, MobileNetV2's ``x + conv(x)``)
  reads ``t`` as ``dequantize(quantize(t))``, on the grid of the Int8 layer that already reads
  ``t`` or else on ``t``'s own calibrated output range (a ResNet downsample conv): the add then
  runs inside the conv's int8 kernel (oneDNN's "sum" post-op, ``qconv2d_pointwise.binary``),
  and whatever produced ``t`` writes uint8 instead of float;
* the quantize nodes of one tensor on one grid merge (two layers reading the same tensor), so
  a producer read only through them writes uint8;
* a max pool read only through a quantize pools the uint8 tensor (the same bits: max commutes
  with the monotone rounding);
* a global average pool (``mean``) of an Int8 layer's output, read only through a quantize,
  reads that output on the layer's calibrated output grid, so the conv writes uint8.

Only the residual operand and the pooled output are new rounding: the compiled model differs
from the eager one by at most half a quantization step on each (tested); the eager forward is
unchanged.

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

import contextlib
import functools
import operator
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines torch.ops.quantized_decomposed; no torch.ao flow is used)
from torch import nn
from torch.nn import functional as F

from torchslim._registry import register
from torchslim.errors import ConfigError
from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize
from torchslim.quantize.primitives import QScheme, qrange

__all__ = ["Int8Linear", "Int8Conv", "INT8_TYPES", "int8_blocker", "to_int8_", "empty_int8_", "compile", "int8_kernels"]

_W_MIN, _W_MAX = -128, 127
_A_MIN, _A_MAX = 0, 255

_QD = torch.ops.quantized_decomposed

# set by compile() around its calls: Int8 layers then mark their calibrated output range in the
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


# --------------------------------------------------------------------------- compiled fast path


_AT = torch.ops.aten


def _is_q(node: Any) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target == _QD.quantize_per_tensor.default


def _is_uint8_q(node: Any) -> bool:
    """A ``quantize_per_tensor`` to uint8 with positional arguments (what the Int8 layers trace)."""
    return _is_q(node) and len(node.args) == 6 and not node.kwargs and node.args[5] == torch.uint8


def _is_dq(node: Any) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target == _QD.dequantize_per_tensor.default


def _float_tensor(node: Any) -> bool:
    val = getattr(node, "meta", {}).get("val")
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def _merge_same_quantize(graph: torch.fx.Graph) -> int:
    """One ``quantize_per_tensor`` per (tensor, scale, zero point): every Int8 layer quantizes its
    own input, so a tensor read by two layers calibrated alike is quantized twice."""
    seen: dict[tuple[Any, ...], Any] = {}
    merged = 0
    for node in list(graph.nodes):
        if not _is_q(node):
            continue
        key = (node.args, tuple(sorted(node.kwargs.items())))
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            merged += 1
    return merged


def _quantized_view(graph: torch.fx.Graph, q: Any, before: Any) -> Any:
    """A new ``dequantize_per_tensor`` of the quantize node ``q`` (same scale, zero point, range),
    placed before ``before``."""
    with graph.inserting_before(before):
        dq = graph.call_function(_QD.dequantize_per_tensor.default, (q, *q.args[1:]), dict(q.kwargs))
    if "val" in q.args[0].meta:  # the pattern checks read shapes and dtypes from here
        dq.meta["val"] = q.args[0].meta["val"]
    return dq


def _new_quantize(graph: torch.fx.Graph, y: Any, scale: float, zero_point: int, before: Any) -> Any:
    with graph.inserting_before(before):
        q = graph.call_function(_QD.quantize_per_tensor.default, (y, scale, zero_point, _A_MIN, _A_MAX, torch.uint8))
    if "val" in y.meta:
        q.meta["val"] = y.meta["val"].to(torch.uint8)
    return q


def _strip_output_marks(graph: torch.fx.Graph) -> dict[Any, tuple[float, int]]:
    """Remove the Int8 layers' output markers; return ``{output node: (scale, zero point)}``."""
    ranges: dict[Any, tuple[float, int]] = {}
    mark = torch.ops.torchslim.int8_output_range.default
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == mark:
            y, scale, zp = node.args
            ranges[y] = (float(scale), int(zp))
            node.replace_all_uses_with(y)
            graph.erase_node(node)
    return ranges


def _quantize_residual_operands(graph: torch.fx.Graph, ranges: dict[Any, tuple[float, int]]) -> int:
    """``add(conv_out, t)``: read ``t`` as ``dequantize(quantize(t))`` so the add runs as oneDNN's
    "sum" post-op of the conv and ``t``'s producer can write uint8. The grid of ``t`` is the one
    an Int8 layer reading ``t`` already quantizes it on, else ``t``'s own calibrated output range
    (``t`` is an Int8 layer's output, e.g. a ResNet downsample). Either is at most half a step
    off the float ``t``; an operand with neither stays float (and the add unfused)."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != _AT.add.Tensor or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        if not all(isinstance(t, torch.fx.Node) and _float_tensor(t) and not _is_dq(t) for t in (a, b)):
            continue
        if a.meta["val"].shape != b.meta["val"].shape:
            continue

        def read_by_layer(t: Any) -> Any:
            qs = [u for u in t.users if _is_uint8_q(u)]
            return qs[0] if len(qs) == 1 else None

        choice = None
        for i in (1, 0):  # the second operand first: ``out += identity``
            t, other = node.args[i], node.args[1 - i]
            if other.target == _AT.convolution.default and read_by_layer(t) is not None:
                choice = (i, read_by_layer(t))
                break
        if choice is None:
            for i in (1, 0):
                t, other = node.args[i], node.args[1 - i]
                if other.target == _AT.convolution.default and t in ranges:
                    choice = (i, _new_quantize(graph, t, *ranges[t], node))
                    break
        if choice is None:
            continue
        args = list(node.args)
        args[choice[0]] = _quantized_view(graph, choice[1], node)
        node.args = tuple(args)
        done += 1
    return done


_VIEWS = (_AT.view.default, _AT._unsafe_view.default, _AT.reshape.default, _AT.flatten.using_ints,
          _AT.squeeze.dim, _AT.squeeze.dims, _AT.unsqueeze.default, _AT.clone.default)


def _int8_max_pool(graph: torch.fx.Graph) -> int:
    """``maxpool(y)`` read only through one quantize (directly or through reshapes, as in
    ``pool -> flatten -> linear``): quantize ``y`` on that grid first and pool the uint8
    tensor; the same bits, as max commutes with the monotone rounding and re-quantizing a
    dequantized value on its own grid gives it back."""
    done = 0
    pools = (_AT.max_pool2d_with_indices.default, torch.ops.prims._low_memory_max_pool_with_offsets.default)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in pools or not _float_tensor(node.args[0]) \
                or _is_dq(node.args[0]):
            continue
        outs = list(node.users)
        if len(outs) != 1 or outs[0].target is not operator.getitem or outs[0].args[1] != 0:
            continue
        pooled = last = outs[0]
        while len(last.users) == 1 and next(iter(last.users)).target in _VIEWS:
            last = next(iter(last.users))
        qs = list(last.users)
        if len(qs) != 1 or not _is_uint8_q(qs[0]):
            continue
        q_out = qs[0]
        y = node.args[0]
        q_in = _new_quantize(graph, y, q_out.args[1], q_out.args[2], node)
        node.replace_input_with(y, _quantized_view(graph, q_in, node))
        if last is not pooled:  # pool -> quantize -> dequantize -> reshapes -> quantize
            reader = next(iter(pooled.users))
            q_mid = _new_quantize(graph, pooled, q_out.args[1], q_out.args[2], reader)
            reader.replace_input_with(pooled, _quantized_view(graph, q_mid, reader))
        done += 1
    return done


_ACTIVATIONS = (_AT.relu.default, _AT.clamp_min.default, _AT.clamp_max.default, _AT.clamp.default, _AT.hardtanh.default)


def _int8_mean(graph: torch.fx.Graph, ranges: dict[Any, tuple[float, int]]) -> int:
    """A global average pool (``mean`` over the spatial dims, as in MobileNetV2's head) read only
    through one quantize, of an Int8 layer's output (after its ReLU / ReLU6): quantize that output
    on the layer's calibrated output range, so the conv writes uint8 (its activation fused) and
    the mean reads bytes, as X86InductorQuantizer shares an average pool's grid with its input.
    The new rounding is at most half a step of the layer's range before the mean."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != _AT.mean.dim or not _float_tensor(node.args[0]) \
                or _is_dq(node.args[0]):
            continue
        last = node
        while len(last.users) == 1 and next(iter(last.users)).target in _VIEWS:
            last = next(iter(last.users))
        if len(last.users) != 1 or not _is_uint8_q(next(iter(last.users))):
            continue
        y = src = node.args[0]
        while src not in ranges and getattr(src, "target", None) in _ACTIVATIONS and len(src.users) == 1:
            src = src.args[0]
        if src not in ranges or len(y.users) != 1:
            continue
        q_in = _new_quantize(graph, y, *ranges[src], node)
        node.replace_input_with(y, _quantized_view(graph, q_in, node))
        done += 1
    return done


def _int8_graph_pass(graph: torch.fx.Graph) -> None:
    """Rewrites on inductor's functional aten graph, before freezing lowers the quantization
    patterns: the Int8 layers' output markers go (their ranges kept aside), residual adds read
    their second operand through a quantize, quantize nodes of the same tensor and grid merge,
    max pooling and a global average pool's input run on uint8. What X86InductorQuantizer annotates in a model, here from
    torchslim's own calibrated ranges (see the module doc)."""
    ranges = _strip_output_marks(graph)
    _merge_same_quantize(graph)
    if _quantize_residual_operands(graph, ranges):
        _merge_same_quantize(graph)
    _int8_max_pool(graph)
    _int8_mean(graph, ranges)
    graph.lint()


def _graph_pass() -> Any:
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class Int8GraphPass(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            _int8_graph_pass(graph)

        def uuid(self) -> Any:
            return get_hash_for_files((__file__,))

    return Int8GraphPass()


def _register_x86_passes() -> None:
    from torchslim._optional import require

    # importing the quantizer registers the passes that turn dequant -> conv/linear into oneDNN int8 kernels
    require("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "int8 kernels under torch.compile")


def _call_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What the compiled code depends on in a call: shapes, dtypes, devices and strides of the tensors."""
    from torchslim._compile import _shape_key

    strides = tuple(tuple(a.stride()) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    return (_shape_key(args, kwargs), strides)


def compile(model: nn.Module, *, cpp_wrapper: bool = True, **compile_kwargs: Any) -> Any:
    """``torch.compile`` a static-int8 model so it runs oneDNN int8 kernels on x86 CPUs.

    Turns on inductor's freezing while the model runs (``torch._inductor.config.freezing``,
    patched around each call, so other compiled code is not affected: weights become constants,
    which the int8 weight prepacking needs), registers torchao's x86 inductor
    quantization passes, and returns a callable that runs the compiled model in eval mode under
    ``torch.no_grad()`` (freezing applies to inference only). A float model compiles the same way
    (useful as the fp32 baseline). The first call compiles (seconds to a minute).

    The callable is for inference on the model as it is now: freezing bakes the weights into the
    compiled code, and a call at input shapes, dtypes and strides already compiled skips dynamo's
    guards (``skip_guard_eval_unsafe``: the checks of ~every parameter's metadata, about 0.4 ms
    per call on MobileNetV2). A call at new ones compiles with all guards. Compile again after
    changing the model.

    Args:
        model: the model (its mode is switched to eval).
        cpp_wrapper: inductor writes the code that calls the kernels in C++ instead of Python
            (``torch._inductor.config.cpp_wrapper``): a compiled MobileNetV2 makes ~60 kernel calls,
            and at batch 1 the Python wrapper costs about 1 ms of them. Compiling takes a few
            seconds longer. Where the C++ wrapper fails to build, the Python one is used.
        compile_kwargs: more ``torch.compile`` arguments (``dynamic=``, ``mode=``, ``options=``...).
            Shapes are static unless ``dynamic=`` says otherwise: each new input shape compiles
            once (the int8 lowering does not take symbolic shapes).

    Raises:
        MissingDependencyError: torchao is not installed (``pip install torchslim[executorch]``).
    """
    _register_x86_passes()
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor import config as inductor_config

    with contextlib.suppress(NotImplementedError):  # an exported program's module has no train/eval
        model.eval()
    compile_kwargs.setdefault("dynamic", False)
    compiled = torch.compile(model, **compile_kwargs)
    graph_pass = _graph_pass()
    compiled_keys: set[Any] = set()
    wrapper = {"cpp": bool(cpp_wrapper)}

    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # compilation happens on a call (the first, or a recompile): freezing on there, nowhere else
        global _MARK_OUTPUTS
        marking, _MARK_OUTPUTS = _MARK_OUTPUTS, True
        try:
            with inductor_config.patch(freezing=True, joint_custom_pre_pass=graph_pass, cpp_wrapper=wrapper["cpp"]), \
                    torch.no_grad():
                return compiled(*args, **kwargs)
        finally:
            _MARK_OUTPUTS = marking

    @functools.wraps(model.forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        key = _call_key(args, kwargs)
        if key in compiled_keys:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return call(args, kwargs)
        try:
            out = call(args, kwargs)
        except BackendCompilerFailed:
            if not wrapper["cpp"]:
                raise
            wrapper["cpp"] = False  # the C++ wrapper did not build here: the Python one
            run.cpp_wrapper = False  # type: ignore[attr-defined]
            out = call(args, kwargs)
        compiled_keys.add(key)
        return out

    run.compiled = compiled  # type: ignore[attr-defined]
    run.model = model  # type: ignore[attr-defined]
    run.cpp_wrapper = wrapper["cpp"]  # type: ignore[attr-defined]
    return run


def _holds_int8(model: nn.Module) -> bool:
    return any(isinstance(m, _Int8Base) for m in model.modules())


# every runtime that compiles (bench's compile rows, Budget(runtime="compile"), the recipes' deploy
# check) runs a static-int8 model on the oneDNN int8 kernels: ``torchslim._compile.compile_model``
register("compiler", "int8", compile, family="quantize", takes=_holds_int8,
         description="static / QAT int8 layers on oneDNN int8 kernels (inductor freezing + x86 passes)")


@contextlib.contextmanager
def _capture_output_code() -> Iterator[list[str]]:
    """Collect the Python source inductor writes for each compiled graph."""
    from torch._inductor import graph as inductor_graph

    sources: list[str] = []
    original = inductor_graph.GraphLowering.compile_to_module

    def capture(self: Any, *args: Any, **kwargs: Any) -> Any:
        mod = original(self, *args, **kwargs)
        path = getattr(mod, "__file__", None)
        if path:
            with open(path) as f:
                sources.append(f.read())
        return mod

    inductor_graph.GraphLowering.compile_to_module = capture  # type: ignore[method-assign]
    try:
        yield sources
    finally:
        inductor_graph.GraphLowering.compile_to_module = original  # type: ignore[method-assign]


def int8_kernels(model: nn.Module, *example_inputs: Any) -> dict[str, int]:
    """Compile ``model`` with :func:`compile`, run it once and count the oneDNN kernels in the code
    inductor generated: ``{"qconv": n, "qlinear": n, "float_conv": n, "float_linear": n, "qconv_add": n,
    "qmaxpool": n, "float_out": n}`` (``qconv_add``: the int8 convs with a residual add fused in,
    counted in ``qconv`` too; ``qmaxpool``: max pools run on uint8; ``float_out``: int8 kernels
    that write float instead of uint8, e.g. the last linear).

    A check that the int8 kernels are really used (compiles afresh: seconds to a minute).
    """
    torch._dynamo.reset()
    with _capture_output_code() as sources:
        compile(model, cpp_wrapper=False)(*example_inputs)  # the kernels are named in the Python wrapper
    code = "\n".join(sources)
    calls = [line for line in code.splitlines() if "= torch.ops.onednn.q" in line]
    return {
        "qconv": code.count("onednn.qconv_pointwise") + code.count("onednn.qconv2d_pointwise"),
        "qlinear": code.count("onednn.qlinear_pointwise"),
        "float_conv": code.count("mkldnn._convolution_pointwise") + code.count("aten.convolution("),
        "float_linear": code.count("mkldnn._linear_pointwise") + code.count("extern_kernels.mm(")
        + code.count("extern_kernels.addmm("),
        "qconv_add": code.count("onednn.qconv2d_pointwise.binary") + code.count("onednn.qconv_pointwise.binary"),
        "qmaxpool": code.count("quantized.max_pool2d"),
        "float_out": sum("torch.float32" in line for line in calls),
    }
