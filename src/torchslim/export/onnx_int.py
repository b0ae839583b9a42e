"""The one integer ONNX writer (int8 QDQ, dynamic int8, int4) and the registry that feeds it.

:func:`export_integer_onnx` writes two files for a quantized model: ``<name>.fp32.onnx`` (its
float twin: every quantized layer replaced by the float layer it stands for, with the
dequantized weights) and ``<name>.onnx``, with the integer kernels of ONNX Runtime:

* ``kind="dynamic"``: ``onnxruntime.quantization.quantize_dynamic`` on MatMul / Gemm / Gather /
  LSTM (int8 weights per channel, activations quantized at run time: ``MatMulInteger``); the
  weights it quantizes are the already-quantized ones dequantized. Convs stay float (ONNX
  Runtime's ``ConvInteger`` is slower than its fp32 conv);
* ``kind="int4"``: the stored integers of every eligible layer as ``MatMulNBits`` /
  ``GatherBlockQuantized`` (:mod:`torchslim.export.onnx_nbits`; nothing re-quantized);
* ``kind="static"``: ``onnxruntime.quantization.quantize_static`` in QDQ format, per-channel
  int8 weights, uint8 activations. The input of every quantized Conv / Gemm / MatMul gets the
  model's own calibrated scale and zero point (ORT ``TensorQuantOverrides``, matched through the
  weight initializer's name), and the weight of every layer the model stores as integers its own
  per-channel scales (so ONNX Runtime rounds the dequantized weight back to the very same
  integers); the other tensors ORT quantizes get ORT's calibration.

Every integer file then goes through
:func:`~torchslim.export.onnx_passes.avoid_skip_layernorm_fusion`.

This module knows no quantized module type. A family plugs in with two registrations, done at
its import:

* :func:`register_onnx_lowering` (per module type): the float module a quantized module stands
  for in the float twin, and its :class:`~torchslim.export.onnx_nbits.Int4Weight` (or why it has
  none);
* :func:`register_integer_scheme` (per model): which :class:`IntegerScheme` a model is written
  with (``None`` for a model the family did not quantize).

``ts.export(model, inputs, "m.onnx")`` of a model whose scheme is ``static`` writes this file
(format ``"onnx-int8"``, :mod:`torchslim.export.quantized`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._optional import require
from torchslim.errors import ConfigError
from torchslim.export._base import quiet
from torchslim.export.onnx import export_fp32
from torchslim.export.onnx_nbits import Int4Weight, write_nbits_onnx
from torchslim.export.onnx_passes import avoid_skip_layernorm_fusion

log = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "IntegerScheme",
    "OnnxLowering",
    "register_onnx_lowering",
    "register_integer_scheme",
    "onnx_lowering",
    "integer_scheme",
    "float_twin",
    "int4_weights",
    "write_int4_onnx",
    "activation_overrides",
    "weight_overrides",
    "export_integer_onnx",
    "quiet_quantizer",
]

KINDS = ("static", "dynamic", "int4")
_PASS_THROUGH = {"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}
_ORT_METHODS = ("MinMax", "Percentile", "Entropy")


@dataclass(frozen=True)
class IntegerScheme:
    """How a quantized model is written as integer ONNX.

    Attributes:
        mode: the family's name for what was applied (reported, e.g. ``"static"``, ``"qat"``).
        kind: ``"static"`` (QDQ, calibrated activations), ``"dynamic"`` (int8 weights,
            activations quantized at run time) or ``"int4"`` (MatMulNBits / GatherBlockQuantized).
        calibration_method: ONNX Runtime's ``CalibrationMethod`` name for the tensors the model
            leaves in float (``static``): ``"MinMax"``, ``"Percentile"`` or ``"Entropy"``.
        calibration_batches: how many calibration batches ONNX Runtime reads (``None``: 16).
        input_ranges: layer name -> ``(scale, zero_point)`` of the layer's calibrated uint8
            input, given to ONNX Runtime as is (``static``).
        weight_scales: layer name -> its per-output-channel int8 weight scales (symmetric), for
            layers whose weights the model holds as integers (``static``): ONNX Runtime
            quantizes their (dequantized) weights with exactly these.
    """

    mode: str
    kind: str
    calibration_method: str = "MinMax"
    calibration_batches: int | None = None
    input_ranges: Mapping[str, tuple[float, int]] = field(default_factory=dict)
    weight_scales: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"IntegerScheme kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.calibration_method not in _ORT_METHODS:
            raise ConfigError(f"IntegerScheme calibration_method must be one of {', '.join(_ORT_METHODS)}; "
                              f"got {self.calibration_method!r}")


@dataclass(frozen=True)
class OnnxLowering:
    """How modules of one type are written as ONNX.

    Attributes:
        float_module: ``float_module(module) -> nn.Module | None``: the float module that takes
            its place in the float twin (called on the twin's copy), or ``None`` when it was
            switched to float in place (e.g. a fake-quant module disabled).
        int4_weight: ``int4_weight(module) -> Int4Weight | str``: its weight as stored 4-bit
            integers, or why it has none (reported as the reason it stayed float). Modules whose
            lowering has one are the quantized layers of an ``int4`` file.
    """

    float_module: Callable[[nn.Module], nn.Module | None] | None = None
    int4_weight: Callable[[nn.Module], Int4Weight | str] | None = None


_LOWERINGS: dict[type, OnnxLowering] = {}
_SCHEMES: list[Callable[[nn.Module], IntegerScheme | None]] = []


def register_onnx_lowering(module_type: type, lowering: OnnxLowering) -> OnnxLowering:
    """Write modules of ``module_type`` (and its subclasses) as ``lowering`` says.

    Registering a type again replaces its lowering (a module reloaded in a session).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ConfigError(f"register_onnx_lowering needs an nn.Module subclass; got {module_type!r}")
    _LOWERINGS[module_type] = lowering
    return lowering


def register_integer_scheme(reader: Callable[[nn.Module], IntegerScheme | None]) -> None:
    """Add ``reader(model) -> IntegerScheme | None``; the first reader giving a scheme decides."""
    if reader not in _SCHEMES:
        _SCHEMES.append(reader)


def onnx_lowering(module: nn.Module) -> OnnxLowering | None:
    """The lowering registered for ``module``'s type (or its nearest registered base class)."""
    for cls in type(module).__mro__:
        if cls in _LOWERINGS:
            return _LOWERINGS[cls]
    return None


def integer_scheme(model: nn.Module) -> IntegerScheme | None:
    """The :class:`IntegerScheme` ``model`` is written with (``None``: not a quantized model)."""
    for reader in _SCHEMES:
        scheme = reader(model)
        if scheme is not None:
            return scheme
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def float_twin(model: nn.Module) -> nn.Module:
    """A float copy of a quantized model, in eval mode: every module with a registered
    ``float_module`` lowering replaced by (or switched to) the float module it stands for."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        lowering = onnx_lowering(m)
        if lowering is None or lowering.float_module is None:
            continue
        new = lowering.float_module(m)
        if new is not None and new is not m:
            _replace(twin, name, new)
    return twin.eval()


@torch.no_grad()
def int4_weights(model: nn.Module) -> list[tuple[str, Int4Weight | str]]:
    """``(name, Int4Weight or why not)`` of every module with an ``int4_weight`` lowering, in module order."""
    out: list[tuple[str, Int4Weight | str]] = []
    for name, m in model.named_modules():
        lowering = onnx_lowering(m)
        if lowering is not None and lowering.int4_weight is not None:
            out.append((name, lowering.int4_weight(m)))
    return out


def write_int4_onnx(
    model: nn.Module, fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
    accuracy_level: int | None = None,
) -> dict[str, Any]:
    """Write ``out_path``: the float ONNX ``fp32_path`` of ``model``'s float twin with the int4
    layers of ``model`` as ONNX Runtime int4 ops (:func:`~torchslim.export.onnx_nbits.write_nbits_onnx`
    on :func:`int4_weights`; names as in ``model.named_modules()``). ``accuracy_level=None``: each
    layer's own (4 where it computes with int8 activations, else 0)."""
    return write_nbits_onnx(fp32_path, out_path, int4_weights(model), accuracy_level=accuracy_level)


def activation_overrides(
    fp32_path: str | os.PathLike[str], input_ranges: Mapping[str, tuple[float, int]]
) -> dict[str, list[dict[str, Any]]]:
    """ORT ``TensorQuantOverrides`` giving the input tensor of each layer in ``input_ranges`` its
    ``(scale, zero_point)`` (the layer found through its weight initializer's name)."""
    import numpy as np

    onnx = require("onnx", "int8 ONNX export")
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = node.input[1]
        for suffix in (".parametrizations.weight.original", ".weight"):
            if w.endswith(suffix) and w[: -len(suffix)] in input_ranges and node.input[0] not in overrides:
                scale, zp = input_ranges[w[: -len(suffix)]]
                value = [{"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(zp, dtype=np.uint8)}]
                # ORT shares one scale through pooling / reshapes: set it on the whole chain up to the producer
                t = node.input[0]
                while True:
                    overrides.setdefault(t, value)
                    prev = producer.get(t)
                    if prev is None or prev.op_type not in _PASS_THROUGH:
                        break
                    t = prev.input[0]
                break
    return overrides


def weight_overrides(
    fp32_path: str | os.PathLike[str], weight_scales: Mapping[str, tuple[float, ...]]
) -> dict[str, list[dict[str, Any]]]:
    """ORT per-channel ``TensorQuantOverrides`` giving the weight initializer of each layer in
    ``weight_scales`` (a Conv's, or a Gemm's with ``transB=1``: channels on axis 0) its scales and
    zero points 0. Layers found otherwise (a MatMul on a transposed copy) keep ORT's own scales."""
    import numpy as np

    onnx = require("onnx", "int8 ONNX export")
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            continue
        w = node.input[1]
        for suffix in (".parametrizations.weight.original", ".weight"):
            layer = w[: -len(suffix)] if w.endswith(suffix) else None
            scales = weight_scales.get(layer) if layer is not None else None
            if scales is None or w not in shapes or not shapes[w] or shapes[w][0] != len(scales):
                continue
            overrides[w] = [
                {**({"axis": 0} if i == 0 else {}), "scale": np.array(s, dtype=np.float32), "zero_point": np.array(0, dtype=np.int8)}
                for i, s in enumerate(scales)
            ]
            break
    return overrides


class _Reader:
    """ONNX Runtime's calibration data reader over a list of batches fed to one input."""

    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.name = name
        self.it = iter(batches)

    def get_next(self) -> dict[str, Any] | None:
        x = next(self.it, None)
        return None if x is None else {self.name: x.detach().cpu().numpy()}


def _first_batches(calibration: Iterable[Any], n: int) -> list[Any]:
    batches = []
    for b in calibration:
        if len(batches) >= n:
            break
        batches.append(b[0] if isinstance(b, (tuple, list)) else b)
    return batches


def export_integer_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    calibration: Iterable[Any] | None = None,
    calibration_batches: int | None = None,
    scheme: IntegerScheme | None = None,
) -> dict[str, str]:
    """Write ``<path stem>.fp32.onnx`` and the integer ``path``; return ``{"onnx_fp32", "onnx"}``.

    Args:
        model: a quantized model (one for which a registered reader gives an
            :class:`IntegerScheme`, e.g. any model quantized by ``ts.quantize_``).
        example_inputs: a tensor or a tuple of positional tensors (the float export's example).
        path: the integer file; the float twin is written beside it.
        calibration: batches (tensors or ``(input, target)`` pairs) ONNX Runtime calibrates the
            float tensors of a ``static`` model on; not used by the other kinds.
        calibration_batches: how many of them (default: the scheme's, else 16).
        scheme: the model's :func:`integer_scheme`, when the caller has it already.

    Raises:
        ConfigError: no scheme for the model (not quantized), or a ``static`` model without
            calibration batches.
        MissingDependencyError: ``onnx`` or ``onnxruntime`` is not installed.
    """
    ortq = require("onnxruntime.quantization", "int8 ONNX Runtime export")
    scheme = scheme or integer_scheme(model)
    if scheme is None:
        raise ConfigError(f"integer ONNX export needs a quantized model (e.g. by quantize_); {type(model).__name__} "
                          "has no integer scheme (no 'quantize' plan recorded)")
    example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    path = Path(path)
    fp32 = path.with_name(path.stem + ".fp32.onnx")
    export_fp32(float_twin(model), example, fp32)
    if scheme.kind == "int4":
        # the 4-bit integers of every eligible layer / table become ONNX Runtime's MatMulNBits /
        # GatherBlockQuantized inputs as they are (no re-quantization)
        # each layer at the compute type it has in torch: int8 activations (compute="int8", the
        # default of group-wise weights) -> accuracy_level 4, ORT's fast integer CPU kernels
        report = write_int4_onnx(model, fp32, path)
        if report["left_float"]:
            log.warning("int4 ONNX: %d quantized layer(s) shipped as float: %s", len(report["left_float"]),
                        "; ".join(f"{k}: {v}" for k, v in report.get("why_float", {}).items()) or report["left_float"])
    elif scheme.kind == "dynamic":
        # Linear -> MatMul / Gemm, embedding tables (Gather on a weight initializer: a third of a
        # BERT's bytes), LSTM / GRU; convs stay float
        ortq.quantize_dynamic(
            str(fp32), str(path), per_channel=True, weight_type=ortq.QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Gather", "LSTM"],
        )
    else:
        if calibration is None:
            raise ConfigError(f"mode={scheme.mode!r} ONNX export needs calibration batches for ONNX Runtime's QDQ calibration")
        batches = _first_batches(calibration, calibration_batches or scheme.calibration_batches or 16)
        if not batches:
            raise ConfigError("the calibration loader gave no batches")
        overrides = activation_overrides(fp32, scheme.input_ranges) if scheme.input_ranges else {}
        if scheme.weight_scales:
            overrides.update(weight_overrides(fp32, scheme.weight_scales))
        ortq.quantize_static(
            str(fp32), str(path), _Reader("input", batches), quant_format=ortq.QuantFormat.QDQ, per_channel=True,
            activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8,
            calibrate_method=getattr(ortq.CalibrationMethod, scheme.calibration_method),
            extra_options={"TensorQuantOverrides": overrides} if overrides else None,
        )
    avoid_skip_layernorm_fusion(path)
    return {"onnx_fp32": str(fp32), "onnx": str(path)}


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantization tools log advice on the root logger; keep it off the console
    (and the exporters' prints, see :func:`~torchslim.export._base.quiet`)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with quiet():
            yield
    finally:
        root.setLevel(level)
