"""Quantized models to ONNX with integer kernels: what ``ts.export(..., "m.onnx")`` does for them.

A model quantized by ``ts.quantize_`` in ``static`` mode (or QAT, finalized or not) computes
with int8 numerics in PyTorch through quantize / dequantize ops (integer modules, or fake-quant
modules for other bit widths and unfinished QAT); a plain ONNX export would run those in float,
as slow as the original. ``ts.export`` therefore routes a model whose registered
:class:`~torchslim.export.onnx_int.IntegerScheme` is ``static``, when the format is ``onnx``, to
the format ``"onnx-int8"``, which writes the file with the one integer writer
(:func:`torchslim.export.onnx_int.export_integer_onnx`: the float twin exported, then ONNX
Runtime's QDQ quantization with the model's calibrated input ranges for every quantized layer
and, for its integer layers, their own per-channel weight scales: the file holds the very
integers the model holds, and ONNX Runtime runs integer kernels). Dynamic and weight-only models can be exported this way
by passing ``format="onnx-int8"`` (dynamic int8 MatMul / Gemm, or int4 MatMulNBits).

Tensors torchslim leaves in float (layer outputs, residual adds) are quantized by ONNX Runtime
from calibration batches: ``calibration=`` passed to ``ts.export`` (an iterable of input
tensors or ``(input, target)`` pairs), or by default a few random batches shaped like the
example inputs, with their mean and spread. The parity check compares the int8 file with the
quantized PyTorch model in quantization steps of the output (default tolerance: 16 steps of an
8-bit output range), and reports SQNR and top-1 agreement per input set.

Example:
    >>> import torch, tempfile, os, torchslim as ts
    >>> _ = torch.manual_seed(0)
    >>> model = ts.create_model("zoo:lenet5")
    >>> calib = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    >>> _ = ts.quantize_(model, ts.QuantConfig(mode="static"), calibration=calib)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     r = ts.export(model, calib[0][:1], os.path.join(d, "m.onnx"), calibration=calib)
    >>> r.format, r.info["quantized"], r.parity.ok
    ('onnx-int8', 'static', True)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.export._base import ExportError, Format, register_format
from torchslim.export.onnx import load_onnx
from torchslim.export.onnx_int import export_integer_onnx, integer_scheme, quiet_quantizer
from torchslim.graph.inputs import Inputs

__all__ = ["QUANTIZED_ONNX", "route", "export_quantized_onnx", "quiet_quantizer"]

QUANTIZED_ONNX = "onnx-int8"
_RANDOM_BATCHES, _RANDOM_BATCH_SIZE = 4, 8


def route(format: str, model: nn.Module) -> str:
    """The format to write: ``"onnx-int8"`` for ``"onnx"`` and a model whose integer scheme is
    ``static`` (a static / QAT quantized model, whose plain ONNX would simulate int8 in float)."""
    if format == "onnx":
        scheme = integer_scheme(model)
        if scheme is not None and scheme.kind == "static":
            return QUANTIZED_ONNX
    return format


def _calibration(inputs: Inputs, calibration: Iterable[Any] | None, seed: int) -> list[Any]:
    if calibration is not None:
        return list(calibration) if not isinstance(calibration, list) else calibration
    from torchslim.export.parity import random_inputs

    return [random_inputs(inputs, batch=_RANDOM_BATCH_SIZE, seed=seed + 1000 + k).args[0].cpu()
            for k in range(_RANDOM_BATCHES)]


def export_quantized_onnx(
    model: nn.Module, inputs: Inputs, path: Path, *, calibration: Iterable[Any] | None = None, seed: int = 0, **_: Any
) -> dict[str, Any]:
    """Write a quantized ``model`` as integer ONNX at ``path`` through :func:`export_integer_onnx`.

    The float twin the writer puts beside ``path`` (``<stem>.fp32.onnx``) is removed; call the
    writer directly to keep it.

    Returns:
        ``{"exporter": "onnxruntime.quantization", "quantized": mode, "dynamic_batch": True,
        "calibration": "given" | "random"}``.

    Raises:
        ExportError: the model was not quantized, or has other than one positional tensor input
            (calibration feeds one input), or the writer failed.
    """
    scheme = integer_scheme(model)
    if scheme is None:
        raise ExportError(f"{QUANTIZED_ONNX} export needs a model quantized with ts.quantize_; "
                          f"{type(model).__name__} was not (use format='onnx')", format=QUANTIZED_ONNX,
                          reason="not quantized")
    tensors = inputs.tensors()
    if inputs.kwargs or len(inputs.args) != 1 or len(tensors) != 1:
        raise ExportError(f"{QUANTIZED_ONNX} export supports models with one positional tensor input; got "
                          f"{inputs.describe()}", format=QUANTIZED_ONNX, reason="several inputs")
    batches = _calibration(inputs, calibration, seed) if scheme.kind == "static" else None
    try:
        with quiet_quantizer(), torch.no_grad():
            files = export_integer_onnx(model, (tensors[0].detach().cpu(),), path, calibration=batches, scheme=scheme)
    except TorchslimError as exc:
        raise ExportError(f"{QUANTIZED_ONNX} export of {type(model).__name__} failed: {exc}", format=QUANTIZED_ONNX,
                          reason=str(exc)) from exc
    Path(files["onnx_fp32"]).unlink(missing_ok=True)
    info: dict[str, Any] = {"exporter": "onnxruntime.quantization", "quantized": scheme.mode, "dynamic_batch": True}
    if batches is not None:
        info["calibration"] = "random" if calibration is None else "given"
        info["qdq"] = True
    return info


QUANTIZED = register_format(
    Format(
        name=QUANTIZED_ONNX,
        suffixes=(),  # chosen by route() for ".onnx" paths, or by name
        write=export_quantized_onnx,
        load=load_onnx,
        tolerance=(0.0, 0.0, 16.0),
        dynamic_batch=True,
    )
)
