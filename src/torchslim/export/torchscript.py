"""TorchScript export: ``torch.jit.trace`` with a ``torch.jit.script`` fallback; loaded back by
``torch.jit.load`` in Python or by libtorch in C++ (``torchslim/export/cpp``).

Tracing records the ops the example inputs actually run, so Python control flow that depends on
tensor values is frozen to the branch taken (PyTorch warns with a ``TracerWarning``). With
``method="auto"`` such a warning, or a failed trace, makes the exporter try scripting, which
keeps the control flow; when scripting fails too, the trace is kept (if there is one) and its
warnings are reported, and the parity check on random inputs tells whether it still holds.

Example:
    >>> import torch, tempfile, pathlib
    >>> from torchslim.export.torchscript import export_torchscript
    >>> from torchslim.graph.inputs import Inputs
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     export_torchscript(model, Inputs((torch.randn(1, 4),)), pathlib.Path(d) / "m.pt")["method"]
    'trace'
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.export._base import ExportError, Format, failure_reason, register_format, tensor_leaves
from torchslim.graph.inputs import Inputs

__all__ = ["METHODS", "export_torchscript", "load_torchscript", "TORCHSCRIPT"]

METHODS = ("auto", "trace", "script")


def _trace(model: nn.Module, inputs: Inputs) -> tuple[torch.jit.ScriptModule, list[str]]:
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(
            model,
            example_inputs=tuple(inputs.args) if inputs.args else None,
            example_kwarg_inputs=dict(inputs.kwargs) or None,
            strict=False,
            check_trace=False,
        )
    notes = sorted({str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)})
    return traced, notes


def _script(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(model)


def export_torchscript(
    model: nn.Module, inputs: Inputs, path: Path, *, method: str = "auto", **_: Any
) -> dict[str, Any]:
    """Write ``model`` as a TorchScript archive at ``path``; returns how it was done.

    Args:
        method: ``"trace"``, ``"script"`` or ``"auto"`` (trace; script when the trace fails
            or warns that it froze data-dependent control flow).

    Returns:
        ``{"method": "trace"|"script", "trace_warnings": [...]}`` plus ``script_reason`` /
        ``trace_reason`` when one of the two failed.

    Raises:
        ConfigError: unknown ``method``.
        ExportError: neither tracing nor scripting worked (the message has both reasons).
    """
    if method not in METHODS:
        raise ConfigError(f"torchscript method must be one of {', '.join(METHODS)}; got {method!r}")
    info: dict[str, Any] = {"trace_warnings": []}
    module = None
    errors: list[str] = []
    if method in ("auto", "trace"):
        try:
            module, info["trace_warnings"] = _trace(model, inputs)
            info["method"] = "trace"
        except Exception as exc:  # tracing raises whatever the model's forward raises
            info["trace_reason"] = failure_reason(exc)
            errors.append(f"trace: {info['trace_reason']}")
    if method == "script" or (method == "auto" and (module is None or info["trace_warnings"])):
        try:
            module = _script(model)
            info["method"] = "script"
        except Exception as exc:  # the scripting compiler raises several types
            info["script_reason"] = failure_reason(exc)
            errors.append(f"script: {info['script_reason']}")
    if module is None:
        reason = "; ".join(errors)
        raise ExportError(
            f"torchscript export of {type(model).__name__} failed: {reason}", format="torchscript", reason=reason
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.10+ marks TorchScript deprecated
        torch.jit.save(module, str(path))
    return info


def load_torchscript(path: Path, device: torch.device | None = None) -> Callable[[Inputs], list[torch.Tensor]]:
    """``torch.jit.load(path)`` as a function of :class:`Inputs` returning the output tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location=device)
    module.eval()

    def run(inputs: Inputs) -> list[torch.Tensor]:
        with torch.no_grad():
            return tensor_leaves(module(*inputs.args, **inputs.kwargs))

    return run


TORCHSCRIPT = register_format(
    Format(
        name="torchscript",
        suffixes=(".pt", ".ts", ".torchscript", ".jit"),
        write=export_torchscript,
        load=load_torchscript,
        tolerance=(1e-5, 1e-5),
    )
)
