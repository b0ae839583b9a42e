"""Which integer kernel runs a :class:`~torchslim.quantize.weight_only.QuantizedLinear`, in one place.

The module's stored form (int8, or int4 packed two per byte, fp16 scales) is what ``ts.save``
writes; a kernel may need its own layout, which is derived at the first call and cached on the
module (a plain attribute, never in the state dict), and rebuilt when a buffer changes.

Measured on this project's CPU (AMD EPYC with AVX-512 VNNI and BF16, torch 2.14.1, 1 thread;
``benchmarks/torch_int_kernels.py``), at MiniLM's layer shapes:

* ``"fbgemm_dynamic"`` -- ``torch.ops.quantized.linear_dynamic`` (x86/fbgemm engine) for dynamic
  int8 with float32 inputs: uint8 activations quantized per tensor (asymmetric, min-max: the
  numerics of the reference path), int8 weights per channel or per tensor, int32 accumulation,
  bias fused. 2-4x faster than fp32 ``F.linear`` at 16 and 4096 rows.
* ``"int8pack"`` -- ``aten._weight_int8pack_mm`` for weight-only int8 (signed symmetric, per
  channel or per tensor) with bfloat16 inputs of at most :data:`INT8PACK_MAX_ROWS` rows (1.9x
  faster than bf16 ``F.linear`` at 1 row, slower from 16 on), ``in_features % 16 == 0`` (other
  widths give wrong results or crash in this torch). With float32 or float16 inputs the kernel
  is 10-100x slower than fp32 ``F.linear``: never used for them.
* ``"int8_float_mm"`` -- weight-only signed symmetric int8 otherwise: ``F.linear(x, int8 weight
  cast to x's dtype)`` then the per-channel scale on the output (one cast of the weight instead
  of the reference's cast, subtract and multiply): as fast as fp32 ``F.linear`` for float32
  inputs (no integer kernel here is faster for them) and 0.8-1x bf16 ``F.linear`` for bfloat16.
* ``"int4pack"`` -- ``aten._weight_int4pack_mm_for_cpu`` for weight-only int4 per group (groups
  of 32, 64, 128 or 256; symmetric or not), ``out_features % 16 == 0``, with bfloat16 inputs of
  at most :data:`INT4PACK_MAX_ROWS` rows (2.3x faster than bf16 ``F.linear`` at 1 row, 0.6x at
  64). Needs its own packed copy of the weight (as many bytes as the stored one), cached. With
  float32 inputs the kernel is 30-100x slower than ``F.linear``; rounding them to bfloat16 for
  it would be faster at a few rows but breaks parity with exported files (1e-4), so not done.
* ``"unpacked_int4"`` -- every other 2..4-bit weight: the reference numerics bit for bit, with
  the unpacked integers cached (one byte per weight at run time, never saved), so a call pays
  the cast, subtract and multiply but not the unpacking (which made the reference 10-30x
  slower than fp32 ``F.linear`` at 16 rows).
* ``"reference"`` -- dequantize the weight and ``F.linear`` (fake-quantized input in dynamic
  mode): any device, dtype and shape, differentiable (straight-through); also whenever autograd
  needs the input's gradient, under ``torch.compile`` / ``torch.export`` / tracing / a Python
  dispatch mode (``ts.profile`` counts the reference's ops), and when forced with
  :func:`reference_kernels` or ``TORCHSLIM_QUANT_KERNELS=reference``.

Example:
    >>> import torch
    >>> from torchslim.quantize.weight_only import QuantizedLinear
    >>> from torchslim.quantize.primitives import QScheme
    >>> from torchslim.quantize.kernels import choose_kernel, reference_kernels
    >>> q = QuantizedLinear.from_float(torch.nn.Linear(64, 32), QScheme(bits=8, granularity="channel"), dynamic_act=True)
    >>> x = torch.randn(4, 64)
    >>> choose_kernel(q, x) in ("fbgemm_dynamic", "reference")
    True
    >>> with reference_kernels():
    ...     choose_kernel(q, x)
    'reference'
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.quantize.primitives import QScheme, qrange, unpack_int4, unview, view

__all__ = ["KERNELS", "choose_kernel", "run_kernel", "forget", "reference_kernels", "kernels_forced_off", "available_kernels"]

KERNELS = ("reference", "fbgemm_dynamic", "int8pack", "int4pack", "int8_float_mm", "unpacked_int4")
INT4_GROUPS = (32, 64, 128, 256)
# bfloat16 rows up to which the packed kernels beat casting the weight for bf16 F.linear (measured)
INT8PACK_MAX_ROWS = 16
INT4PACK_MAX_ROWS = 128

_forced = [os.environ.get("TORCHSLIM_QUANT_KERNELS", "").strip().lower() == "reference"]


@contextmanager
def reference_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block every QuantizedLinear runs the reference (dequantize) path (process-wide;
    restored on exit, exceptions included). ``enabled=False`` lifts a forcing instead."""
    was = _forced[0]
    _forced[0] = bool(enabled)
    try:
        yield
    finally:
        _forced[0] = was


def kernels_forced_off() -> bool:
    """Whether the reference path is forced (:func:`reference_kernels` or the environment)."""
    return _forced[0]


def _op(namespace: str, name: str) -> Any:
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def available_kernels() -> dict[str, bool]:
    """Which kernels this torch build has (not whether they are fast here)."""
    return {
        "reference": True,
        "int8_float_mm": True,
        "unpacked_int4": True,
        "fbgemm_dynamic": _op("quantized", "linear_dynamic") is not None and _op("quantized", "linear_prepack") is not None
        and any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm")),
        "int8pack": _op("aten", "_weight_int8pack_mm") is not None,
        "int4pack": _op("aten", "_convert_weight_to_int4pack_for_cpu") is not None
        and _op("aten", "_weight_int4pack_mm_for_cpu") is not None,
    }


_AVAILABLE: dict[str, bool] | None = None


def _has(kernel: str) -> bool:
    global _AVAILABLE
    if _AVAILABLE is None:
        found = available_kernels()
        found["fbgemm_dynamic"] = found["fbgemm_dynamic"] and _dynamic_is_exact()
        _AVAILABLE = found
    return _AVAILABLE[kernel]


@torch.no_grad()
def _dynamic_is_exact() -> bool:
    """Whether ``quantized::linear_dynamic`` accumulates uint8 x int8 without saturating here.

    Without VNNI, x86 kernels add pairs of products in int16 (255 * 127 * 2 > 32767), which is
    why PyTorch's x86 recipes reduce activations to 7 bits; this probe runs the worst case (every
    activation 255, every weight 127) once and keeps the kernel only if it is exact.
    """
    try:
        x = torch.ones(2, 64)
        x[:, 0] = 0.0  # range [0, 1]: every other activation quantizes to 255
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = torch._make_per_tensor_quantized_tensor(torch.full((16, 64), 127, dtype=torch.int8), 1.0 / 127, 0)
            out = torch.ops.quantized.linear_dynamic(x, torch.ops.quantized.linear_prepack(w, None), False)
        return bool(torch.allclose(out, torch.full_like(out, 63.0), rtol=1e-3))
    except (RuntimeError, TypeError, AttributeError):
        return False


_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


def _tracing() -> bool:
    """Compiling, exporting, jit-tracing, or under a Python dispatch mode (``ts.profile``'s op
    counter, FakeTensor tracers): those see the reference path, made of ops they know."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or _dispatch_modes() > 0


def choose_kernel(module: nn.Module, x: torch.Tensor) -> str:
    """The kernel (one of :data:`KERNELS`) that runs ``module`` (a QuantizedLinear) on ``x``.

    Decided by the scheme, the input's device, dtype and width and the module's shape (see the
    module doc); ``"reference"`` wherever no kernel is both correct and faster here, for tensor
    subclasses (fake / functional tensors of tracers) and when autograd needs ``x``'s gradient.
    The per-dtype decision is memoized on the module (the scheme and shape never change).
    """
    if (
        _forced[0] or type(x) is not torch.Tensor or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled())
        or x.dim() < 2 or x.numel() == 0 or _tracing()
    ):
        return "reference"
    memo = module.__dict__.setdefault("_kernel_choice", {})
    choice = memo.get(x.dtype)
    if choice is None:
        choice = memo[x.dtype] = _choice(module, x.dtype)
    small, max_rows, large = choice
    return small if max_rows is None or x.numel() <= max_rows * x.shape[-1] else large


def _choice(module: nn.Module, dtype: torch.dtype) -> tuple[str, int | None, str]:
    """``(kernel, max_rows, kernel beyond max_rows)`` for inputs of ``dtype`` (``max_rows``
    ``None``: no limit)."""
    s: QScheme = module.scheme
    k, n = module.in_features, module.out_features
    if module.dynamic_act:
        if dtype == torch.float32 and s.bits <= 8 and s.granularity in ("channel", "tensor") and _has("fbgemm_dynamic"):
            return "fbgemm_dynamic", None, "fbgemm_dynamic"
        return "reference", None, "reference"
    int8_sym = 4 < s.bits <= 8 and s.signed and s.symmetric and s.granularity in ("channel", "tensor")
    int8_any = "int8_float_mm" if int8_sym and dtype in (torch.float32, torch.float16, torch.bfloat16) else "reference"
    if dtype == torch.bfloat16 and int8_sym and k % 16 == 0 and _has("int8pack"):
        return "int8pack", INT8PACK_MAX_ROWS, "int8_float_mm"
    if s.bits <= 4:
        int4_ok = (
            dtype == torch.bfloat16 and s.bits == 4 and s.granularity == "group" and s.group_size in INT4_GROUPS
            and k % s.group_size == 0 and n % 16 == 0 and _has("int4pack")
        )
        return ("int4pack", INT4PACK_MAX_ROWS, "unpacked_int4") if int4_ok else ("unpacked_int4", None, "unpacked_int4")
    return int8_any, None, int8_any


def forget(module: nn.Module) -> None:
    """Drop ``module``'s derived layouts (rebuilt at the next call); QuantizedLinear calls this
    when it is moved, cast or loaded."""
    module.__dict__.pop("_kernel_cache", None)


# --- derived layouts -------------------------------------------------------------------------


def _version(t: torch.Tensor | None) -> int:
    if t is None:
        return -2
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def _zero_points(module: nn.Module) -> torch.Tensor:
    """Zero points in the integers' own domain, shaped like ``scale`` (float32)."""
    s = module.scheme
    if not s.symmetric:
        return module.zero_point.float().reshape(module.scale.shape)
    mid = 0.0 if s.signed else float(round((sum(qrange(s)) + 1) / 2))
    return torch.full(module.scale.shape, mid, device=module.scale.device)


def _int_values(module: nn.Module) -> torch.Tensor:
    """The stored integers as int16, shape ``(out, in)``, in the scheme's domain."""
    s = module.scheme
    n, k = module.out_features, module.in_features
    if s.bits <= 4:
        return (unpack_int4(module.qweight, n * k).to(torch.int16) + (0 if s.signed else 8)).reshape(n, k)
    return module.qweight.reshape(n, k).to(torch.int16)


def _per_row(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(-1).expand(n) if t.numel() == 1 else t.reshape(n)


@torch.no_grad()
def _build(module: nn.Module, kernel: str, dtype: torch.dtype) -> Any:
    n, k = module.out_features, module.in_features
    if kernel == "fbgemm_dynamic":
        ints, zp = _int_values(module), _zero_points(module).round()
        scale = module.scale.double()
        if not module.scheme.signed:  # uint8 -> int8: the same products after the shift
            ints, zp = ints - 128, zp - 128
        w = ints.to(torch.int8)
        bias = None if module.bias is None else module.bias.detach().float().contiguous()
        with warnings.catch_warnings():  # torch flags quantized tensors as deprecated; the op is what we want
            warnings.simplefilter("ignore")
            if module.scheme.granularity == "tensor":
                qw = torch._make_per_tensor_quantized_tensor(w, float(scale), int(zp))
            else:
                qw = torch._make_per_channel_quantized_tensor(w, _per_row(scale, n).contiguous(), _per_row(zp, n).long().contiguous(), 0)
            return torch.ops.quantized.linear_prepack(qw, bias)
    if kernel in ("int8pack", "int8_float_mm"):
        return _per_row(module.scale, n).to(dtype).contiguous()
    if kernel == "unpacked_int4":
        return _unpacked(module)
    if kernel == "int4pack":
        g = module.scheme.group_size
        ints, zp = _int_values(module), _zero_points(module).reshape(n, k // g)
        c = 0 if module.scheme.signed else 8
        u4 = (ints - c + 8).to(torch.int32).contiguous()  # 0..15; w = (u4 - 8) * scale + zero
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u4, 1)
        scale = module.scale.float().reshape(n, k // g)
        zero = (c - zp) * scale
        scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()  # (k // g, n, 2)
        return packed, scales_zeros
    raise ValueError(f"no layout for kernel {kernel!r}")


def _unpacked(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ints, zero_point, scale)`` as :meth:`QuantizedLinear.dequantized_weight` computes with
    them, the integers unpacked once (int8, view shape)."""
    s = module.scheme
    n, k = module.out_features, module.in_features
    vshape = view(torch.empty(n, k, device="meta"), s).shape
    ints = (unpack_int4(module.qweight, n * k) + (0 if s.signed else 8)).reshape(vshape).to(torch.int8)
    if not s.symmetric:
        zp = module.zero_point.float()
    else:
        zp = torch.full((), 0.0 if s.signed else float(round((sum(qrange(s)) + 1) / 2)), device=module.scale.device)
    return ints, zp, module.scale.float()


def _layout(module: nn.Module, kernel: str, dtype: torch.dtype) -> Any:
    """The derived layout, rebuilt when the integer weight or the bias changed in place (their
    version counters) or was replaced; moves, casts and ``load_state_dict`` drop it (:func:`forget`)."""
    qweight, bias = module._buffers["qweight"], module._parameters.get("bias")
    key = (dtype, id(qweight), _version(qweight), id(bias), _version(bias))
    caches = module.__dict__.setdefault("_kernel_cache", {})  # one per kernel: fp32 and bf16 calls do not evict each other
    cache = caches.get(kernel)
    if cache is None or cache[0] != key:
        try:
            built = _build(module, kernel, dtype)
        except (RuntimeError, NotImplementedError, TypeError) as exc:  # e.g. an engine without this packing
            memo = module.__dict__.setdefault("_kernel_choice", {})
            for dt, choice in memo.items():
                memo[dt] = tuple("reference" if c == kernel else c for c in choice)
            warnings.warn(f"torchslim: {kernel} could not prepare {module.extra_repr()} ({exc}); it runs the reference path",
                          RuntimeWarning, stacklevel=4)
            raise _Unavailable from exc
        cache = caches[kernel] = (key, built)
    return cache[1]


class _Unavailable(Exception):
    """A kernel could not derive its layout for a module: run the reference path instead."""


_OPS: dict[str, Any] = {}


def _ops() -> dict[str, Any]:
    """The kernels' op overloads, looked up once (a ``torch.ops`` lookup costs microseconds)."""
    if not _OPS:
        for key, ns, name in (("dynamic", "quantized", "linear_dynamic"), ("int8pack", "aten", "_weight_int8pack_mm"),
                              ("int4pack", "aten", "_weight_int4pack_mm_for_cpu")):
            op = _op(ns, name)
            _OPS[key] = None if op is None else op.default
    return _OPS


def run_kernel(kernel: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` through ``kernel`` (as chosen by :func:`choose_kernel`, not ``"reference"``);
    the reference path (with a warning, once per module) if the kernel cannot take its weights."""
    try:
        return _run(kernel, module, x)
    except _Unavailable:
        return module.reference_forward(x)


def _run(kernel: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    bias = module._parameters.get("bias")
    if kernel == "fbgemm_dynamic":
        out = _ops()["dynamic"](x, _layout(module, kernel, x.dtype), False)
        if bias is not None and bias.requires_grad and torch.is_grad_enabled():
            out = out + (bias - bias.detach())  # numerically +0; lets the fused bias get its gradient
        return out
    n, k = module.out_features, module.in_features
    if kernel == "int8_float_mm":
        y = F.linear(x, module._buffers["qweight"].reshape(n, k).to(x.dtype))
        scale = _layout(module, kernel, x.dtype)
        return y * scale if bias is None else torch.addcmul(bias.to(y.dtype), y, scale)
    if kernel == "unpacked_int4":
        ints, zp, scale = _layout(module, kernel, torch.float32)
        centred = ints.to(scale.dtype)
        if not (module.scheme.signed and module.scheme.symmetric):  # else zp is 0: q - 0 is q, bit for bit
            centred = centred - zp
        w = unview(centred * scale, (n, k), module.scheme).to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2 = x.reshape(-1, k).contiguous()
    if kernel == "int8pack":
        out = _ops()["int8pack"](x2, module._buffers["qweight"].reshape(n, k), _layout(module, kernel, x.dtype))
    elif kernel == "int4pack":
        packed, scales_zeros = _layout(module, kernel, torch.bfloat16)
        out = _ops()["int4pack"](x2.to(torch.bfloat16), packed, module.scheme.group_size, scales_zeros).to(x.dtype)
    else:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS[1:])}; got {kernel!r}")
    out = out.reshape(*x.shape[:-1], n)
    return out if bias is None else out + bias.to(out.dtype)
