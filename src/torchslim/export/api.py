"""``ts.export``: write a model as ONNX, TorchScript or a ``torch.export`` program, and prove it.

Every export is written to a hidden staging directory, loaded back by its own runtime and run
on the example inputs and on random ones (:mod:`torchslim.export.parity`); only when that
succeeds is the file renamed into place. When the check fails, formats that have safer
settings export again with them (ONNX: without onnxscript's graph optimizer), and the result's
``info["parity_retries"]`` records the attempts that did not match. A failed export, or one whose parity check fails with
``strict=True``, leaves no file behind.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from torchslim._utils import evaluating, is_int, model_device
from torchslim.errors import ConfigError, TorchslimError, type_error
from torchslim.export._base import (
    ExportError,
    Format,
    failure_reason,
    format_for_path,
    get_format,
    list_formats,
    staging,
    tensor_leaves,
)
from torchslim.export.parity import ParityError, ParityReport, Tolerance, check_parity
from torchslim.graph.inputs import Inputs, as_inputs, call_model

__all__ = ["ExportResult", "export"]

_OTHER_BATCH = 3  # batch size of the extra parity case for formats with a dynamic batch axis


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and how well it matches the model.

    Attributes:
        path: the artifact.
        format: ``"onnx"``, ``"torchscript"``, ``"pt2"`` (or a registered extension).
        files: every file written, by name (the artifact and any sidecar such as ONNX external data).
        sizes: bytes of each file in ``files``, by the same names.
        info: how the exporter did it (exporter, opset, dynamic batch, trace or script, fallbacks).
        parity: the parity report (None with ``check=False``).
        seconds: wall time of the export and its check.
    """

    path: Path
    format: str
    files: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    parity: ParityReport | None = None
    seconds: float = 0.0

    @property
    def size_bytes(self) -> int:
        """Total bytes on disk."""
        return sum(self.sizes.values())

    def summary(self) -> str:
        from torchslim.profile.tables import human

        text = f"{self.format} -> {self.path} ({human(self.size_bytes, 'B')})"
        return text + ("; " + self.parity.summary() if self.parity is not None else "; parity not checked")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "files": dict(self.files),
            "sizes": dict(self.sizes),
            "info": dict(self.info),
            "parity": None if self.parity is None else self.parity.to_dict(),
            "seconds": self.seconds,
        }


def _resolve(path: Any, format: str | None) -> tuple[Path, str]:
    if not isinstance(path, (str, os.PathLike)):
        raise type_error("path", path, "a file path (str or os.PathLike)")
    p = Path(path)
    if p.name in ("", ".", ".."):
        raise ConfigError(f"export path {str(path)!r} does not name a file")
    if p.is_dir():
        raise ConfigError(f"export path {str(p)!r} is a directory; give a file path such as {p / 'model.onnx'}")
    if not p.parent.is_dir():
        raise ConfigError(
            f"cannot export to {str(p)!r}: the directory {str(p.parent)!r} does not exist (create it first)"
        )
    by_suffix = format_for_path(p)
    if format is None:
        if by_suffix is None:
            raise ConfigError(
                f"cannot tell the export format from {str(p)!r}; pass format= one of {', '.join(list_formats())}, "
                "or use a suffix: .onnx, .pt (torchscript), .pt2, .pte, .gguf"
            )
        return p, by_suffix
    fmt = get_format(format).name
    if by_suffix is not None and by_suffix != fmt and not fmt.startswith(by_suffix + "-"):  # onnx-int8 is onnx
        raise ConfigError(f"path {str(p)!r} has the suffix of format {by_suffix!r} but format={format!r} was given")
    return p, fmt


def _write_and_check(
    model: nn.Module, inputs: Inputs, staged: Path, fmt: Format, tol: Tolerance, *, check: bool,
    random_cases: int, seed: int, options: dict[str, Any],
) -> tuple[dict[str, Any], ParityReport | None]:
    """Write the artifact and check it; on a parity failure write again with each of the
    format's ``retry_options`` until one passes (the last attempt's file and report stay)."""
    retries: list[dict[str, Any]] = []
    for extra in ({}, *fmt.retry_options):
        for old in staged.parent.iterdir():  # the staging directory holds only this attempt's files
            old.unlink()
        try:
            info = fmt.write(model, inputs, staged, **options, **extra)
        except TorchslimError:
            raise
        except Exception as exc:  # exporters raise many types; report format and reason
            reason = failure_reason(exc)
            raise ExportError(f"{fmt.name} export of {type(model).__name__} failed: {reason}",
                              format=fmt.name, reason=reason) from exc
        # an int8 writer that quantized the model itself hands back what it lowered (checked against)
        reference = info.pop("_reference", model)
        if retries:
            info["parity_retries"] = retries
        if not check:
            return info, None
        dynamic = bool(info.get("dynamic_batch", fmt.dynamic_batch)) and fmt.dynamic_batch
        report = check_parity(
            reference, fmt.load(staged, model_device(model)), inputs, format=fmt.name, tolerance=tol,
            random_cases=random_cases, other_batch=_OTHER_BATCH if dynamic and random_cases > 0 else None, seed=seed,
        )
        if report.ok:
            return info, report
        retries.append({"options": dict(extra), "max_abs": report.max_abs, "max_rel": report.max_rel})
    return info, report


def export(
    model: nn.Module,
    example_inputs: Any = None,
    path: str | os.PathLike[str] | None = None,
    format: str | None = None,
    *,
    check: bool = True,
    strict: bool = True,
    tolerance: Any = None,
    random_inputs: int = 2,
    dynamic_batch: bool = True,
    opset: int | None = None,
    method: str = "auto",
    seed: int = 0,
    calibration: Any = None,
) -> ExportResult:
    """Write ``model`` at ``path`` in an inference format and check the file computes the same.

    Args:
        model: the model (not modified; it runs in eval mode and its modes are restored).
        example_inputs: a tensor, a tuple of inputs or a dict of keyword inputs (default: the
            inputs the model remembers, for models built by ``ts.create_model``).
        path: the file to write; its directory must exist.
        format: ``"onnx"``, ``"torchscript"`` or ``"pt2"`` (or ``"pte"``, ``"gguf"``); by default from
            the suffix (``.onnx``, ``.pt``/``.ts``, ``.pt2``, ``.pte``, ``.gguf``).
        check: run the artifact back and compare (see :mod:`torchslim.export.parity`).
        strict: raise :class:`ParityError` (and keep no file) when parity fails; with
            ``False`` the file is kept and ``result.parity.ok`` is False.
        tolerance: ``(atol, rtol)``, one number for both, or a ``Tolerance``; default per format
            (ONNX 1e-4, TorchScript and pt2 1e-5).
        random_inputs: random input sets checked besides the example.
        dynamic_batch: make the batch axis dynamic (ONNX, pt2) where the model allows it.
        opset: ONNX opset (default 18).
        method: TorchScript capture: ``"auto"``, ``"trace"`` or ``"script"``.
        seed: seed of the random inputs.
        calibration: for models quantized in static / QAT mode exported to ONNX: batches
            (input tensors or ``(input, target)`` pairs) ONNX Runtime calibrates the tensors
            torchslim left in float on (default: random batches like the example inputs).

    Decoder LLMs: ``.gguf`` writes a GGUF file for llama.cpp with
    :func:`torchslim.export.gguf.export_gguf`'s defaults (torchslim int4 / int8 weights carried over
    as Q4_0 / Q8_0, float weights F32) and checks it by loading it into transformers; call
    ``export_gguf`` itself for the other weight types.

    Quantized models: with format ``onnx``, a model quantized by ``ts.quantize_`` in static or
    QAT mode is written as int8 QDQ ONNX (format ``"onnx-int8"``, see
    :mod:`torchslim.export.quantized`) and checked in quantization steps of its output.

    Returns:
        An :class:`ExportResult` (files, sizes, exporter facts and the parity report).

    Raises:
        ConfigError: unknown format, a path in a directory that does not exist, a suffix that
            contradicts ``format``, or a bad option. Nothing is written.
        ExportError: the model cannot be exported in that format (the message names the format
            and the reason, and the failing op when the exporter says which).
        ParityError: the artifact differs from the model by more than the tolerance (``strict``).

    Example:
        >>> import tempfile, os, torchslim as ts
        >>> from torchslim.export import export
        >>> model = ts.create_model("zoo:lenet300")
        >>> with tempfile.TemporaryDirectory() as d:
        ...     result = export(model, path=os.path.join(d, "lenet.pt2"))
        >>> result.format, result.parity.ok
        ('pt2', True)
    """
    if not isinstance(model, nn.Module):
        raise type_error("model", model, "an nn.Module")
    if path is None:
        raise ConfigError("export needs a path, e.g. export(model, inputs, 'model.onnx')")
    if format == "gguf" or (format is None and isinstance(path, (str, os.PathLike)) and Path(path).suffix.lower() == ".gguf"):
        from torchslim.export.gguf import export_checked  # decoder LLMs only: not a registered Format

        if calibration is not None:
            raise ConfigError("calibration= is for int8 exports (onnx-int8, pte-int8); gguf export does not use it")
        return export_checked(model, example_inputs, path, check=check, strict=strict, tolerance=tolerance,
                              random_inputs=random_inputs, seed=seed)
    target, fmt_name = _resolve(path, format)
    from torchslim.export.pte import route_pte
    from torchslim.export.quantized import QUANTIZED_ONNX, route

    fmt = get_format(route_pte(route(fmt_name, model), model))
    # calibration goes to the int8 writers only (other formats' writers need not accept it)
    calibrated = fmt.name == QUANTIZED_ONNX or fmt.calibrated
    quant_options = {"calibration": calibration, "seed": seed} if calibrated else {}
    if calibration is not None and not quant_options:
        raise ConfigError(f"calibration= is for int8 exports (onnx-int8, pte-int8); {fmt.name} export does not use it")
    tol = Tolerance.coerce(tolerance, fmt.tolerance)
    if not is_int(random_inputs) or random_inputs < 0:
        raise ConfigError(f"random_inputs must be an integer >= 0; got {random_inputs!r}")
    if opset is not None and (not is_int(opset) or not 7 <= opset <= 25):
        raise ConfigError(f"opset must be an integer ONNX opset between 7 and 25; got {opset!r}")
    if example_inputs is None:
        from torchslim._modelinfo import example_inputs as remembered

        example_inputs = remembered(model)
    inputs: Inputs = as_inputs(example_inputs).to(model_device(model))

    start = time.perf_counter()
    report: ParityReport | None = None
    with evaluating(model):
        out = call_model(model, inputs)  # a model that does not run gets the usual readable error
        if not tensor_leaves(out):
            raise ExportError(
                f"{type(model).__name__} returned {type(out).__name__}, which holds no tensors; export needs "
                "outputs that are tensors or tuples/lists/dicts of tensors",
                format=fmt.name, reason="no tensor outputs",
            )
        with staging(target) as staged:
            info, report = _write_and_check(
                model, inputs, staged, fmt, tol, check=check, random_cases=random_inputs, seed=seed,
                options={"opset": opset, "dynamic_batch": dynamic_batch, "method": method, **quant_options},
            )
            if strict and report is not None and not report.ok:
                bad = next(c for c in report.cases if not c.ok)
                why = bad.problem or f"max abs diff {bad.max_abs:.3g} on the {bad.name} inputs"
                raise ParityError(
                    f"{fmt.name} export of {type(model).__name__} does not match the model: {why} "
                    f"(tolerance {tol.describe()}); no file was written. "
                    "Pass a looser tolerance=, or strict=False to keep the file.",
                    report,
                )
            names = sorted(p.name for p in staged.parent.iterdir())
    files = {("model" if n == target.name else n): str(target.parent / n) for n in names}
    sizes = {k: os.path.getsize(v) for k, v in files.items()}
    return ExportResult(path=target, format=fmt.name, files=files, sizes=sizes, info=info, parity=report,
                        seconds=time.perf_counter() - start)
