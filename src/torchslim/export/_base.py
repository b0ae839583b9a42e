"""What every export format shares: the error type, the format registry, staging, inputs/outputs.

A format is a :class:`Format`: a name, the file suffixes it owns, a function that writes the
artifact, a function that loads it back into something callable (for the parity check) and a
default :class:`~torchslim.export.parity.Tolerance`. ONNX, TorchScript and ``torch.export``
(``pt2``) register themselves here; another family (quantized QDQ ONNX, issue 5) adds its own
with :func:`register_format` instead of editing this package.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._registry import entries, register
from torchslim.errors import ConfigError, TorchslimError
from torchslim.graph.inputs import Inputs

__all__ = [
    "ExportError",
    "Format",
    "register_format",
    "get_format",
    "list_formats",
    "format_for_path",
    "staging",
    "tensor_leaves",
    "batched",
    "batch_dynamic_shapes",
    "failure_reason",
    "quiet",
]


class ExportError(TorchslimError, RuntimeError):
    """A model could not be written in the requested format; the message names format and reason."""

    def __init__(self, message: str, *, format: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.format = format
        self.reason = reason


@dataclass(frozen=True)
class Format:
    """One export format.

    Attributes:
        name: what users pass as ``format=`` (``"onnx"``).
        suffixes: file suffixes that select this format when ``format`` is not given.
        write: ``write(model, inputs, path, **options) -> info``: writes the artifact at ``path``
            (a staging path; sidecar files go beside it) and returns JSON-able facts about how
            (exporter, opset, dynamic batch...). Raises :class:`ExportError` when it cannot. A
            writer that quantizes the model itself (``pte-int8``) may add ``info["_reference"]``:
            the quantized module it lowered, which the parity check then compares the file with
            (the key is removed from the facts).
        load: ``load(path, device) -> callable`` running the artifact on an :class:`Inputs`
            and returning a list of output tensors (the parity check calls it).
        tolerance: default ``(atol, rtol)`` or ``(atol, rtol, steps)`` of the parity check.
        dynamic_batch: whether ``write`` makes the batch dimension dynamic by default, so
            the parity check also runs a batch size other than the example's.
        retry_options: option sets (passed to ``write`` as keywords) to export again with, in
            order, when the artifact fails its parity check (ONNX: without graph optimization).
        calibrated: ``write`` takes ``calibration=`` (batches for int8 calibration) and ``seed=``
            (int8 formats such as ``pte-int8``).
    """

    name: str
    suffixes: tuple[str, ...]
    write: Callable[..., dict[str, Any]]
    load: Callable[[Path, torch.device], Callable[[Inputs], list[torch.Tensor]]]
    tolerance: tuple[float, ...]
    dynamic_batch: bool = False
    retry_options: tuple[dict[str, Any], ...] = ()
    calibrated: bool = False


def register_format(fmt: Format, *, replace: bool = False) -> Format:
    """Make ``fmt`` available to ``ts.export(..., format=fmt.name)`` and ``torchslim export``.

    The format becomes an ``"export_format"`` entry of the one registry (``torchslim._registry``);
    this is the extension point for formats built elsewhere (e.g. a QDQ ONNX writer for quantized
    models registers ``Format("onnx-qdq", ...)`` with its own loader and a tolerance in
    quantization steps).

    Raises:
        ConfigError: the name is taken (pass ``replace=True`` to override on purpose).
    """
    register("export_format", fmt.name, fmt, family="export", description=f"{fmt.name} ({', '.join(fmt.suffixes)})",
             replace=replace)
    return fmt


def _formats() -> dict[str, Format]:
    # the built-in formats register when their modules are imported (by ``torchslim.export``)
    return {e.name: e.obj for e in entries("export_format")}


def list_formats() -> list[str]:
    """Names of the registered formats."""
    return sorted(_formats())


def get_format(name: str) -> Format:
    """The registered :class:`Format` called ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    formats = _formats()
    if not isinstance(name, str) or name not in formats:
        raise ConfigError(f"export format {name!r} is not supported; allowed: {', '.join(sorted(formats))}")
    return formats[name]


def format_for_path(path: Path) -> str | None:
    """The format whose suffix ``path`` ends with (None when no format claims it)."""
    suffix = path.suffix.lower()
    for fmt in _formats().values():
        if suffix in fmt.suffixes:
            return fmt.name
    return None


@contextlib.contextmanager
def staging(path: Path) -> Iterator[Path]:
    """Yield a path with ``path``'s name inside a fresh hidden directory beside it.

    When the block succeeds, every file written in that directory is moved beside ``path``
    (sidecar files first, ``path`` itself last, each by an atomic rename); when it raises,
    nothing is moved. The directory is removed either way, so a failed export leaves no file.
    """
    tmp_dir = path.parent / f".{path.name}.export-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    try:
        staged = tmp_dir / path.name
        yield staged
        if not staged.exists():
            raise ExportError(f"the exporter wrote no file at {staged}", reason="no file written")
        for item in sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name):
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output, in pytree order (dicts and ModelOutputs included)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple") and callable(value.to_tuple):  # transformers ModelOutput
        value = value.to_tuple()
    return [x for x in torch.utils._pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]


def batched(inputs: Inputs, batch: int) -> Inputs:
    """``inputs`` with every tensor's first dimension repeated/cut to ``batch`` (scalars kept)."""

    def grow(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            reps = -(-batch // x.shape[0])
            return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch].contiguous()
        return x

    args, kwargs = torch.utils._pytree.tree_map(grow, (inputs.args, inputs.kwargs))
    return Inputs(tuple(args), dict(kwargs))


def batch_dynamic_shapes(model: nn.Module, inputs: Inputs) -> dict[str, Any]:
    """``dynamic_shapes`` for ``torch.export``: dimension 0 of every tensor input is one ``batch`` Dim."""
    batch = torch.export.Dim("batch", min=1)
    try:
        bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
    except TypeError as exc:
        raise ExportError(f"the example inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    params = inspect.signature(model.forward).parameters

    def spec(x: Any) -> Any:
        return {0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if params[name].kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(torch.utils._pytree.tree_map(spec, v) for v in value)
        elif params[name].kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: torch.utils._pytree.tree_map(spec, v) for k, v in value.items()}
        else:
            shapes[name] = torch.utils._pytree.tree_map(spec, value)
    return shapes


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence exporters: progress prints, warnings, torch loggers, and C++ writes to stdout.

    Exporters print on stdout, some from C++ (``std::cout``), which would corrupt ``--json``
    output; file descriptor 1 is pointed at a scratch file for the block (stderr is left alone
    apart from the Python loggers and warnings silenced here).
    """
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "torch._export", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced by an object without a descriptor
        fd = None
    saved = os.dup(fd) if fd is not None else None
    sink = tempfile.TemporaryFile()
    try:
        if fd is not None:
            os.dup2(sink.fileno(), fd)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if fd is not None and saved is not None:
            sys.stdout.flush()
            os.dup2(saved, fd)
            os.close(saved)
        sink.close()
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP = re.compile(r"\b(aten[.:]{1,2}[A-Za-z_][\w.]*|torch\.ops\.[\w.]+)")


def failure_reason(exc: BaseException, limit: int = 400) -> str:
    """A one-line reason from an exporter's (often very long) exception, naming the op if it can."""
    text = _ANSI.sub("", str(exc)).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = f"{type(exc).__name__}: {lines[0] if lines else text}"
    op = _OP.search(text)
    if op and op.group(1) not in first:
        first += f" (failing op: {op.group(1).rstrip('.')})"
    return first if len(first) <= limit else first[: limit - 3] + "..."
