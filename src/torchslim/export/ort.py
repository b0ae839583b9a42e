"""ONNX Runtime on CPU: sessions, feeds, one run (timed with :mod:`torchslim.profile.latency`).

Inputs are a tensor or a tuple of tensors, fed to the graph's inputs in order; outputs come back
as CPU tensors.

Example:
    >>> import torch, tempfile, pathlib
    >>> from torchslim.export.onnx import export_fp32
    >>> model = torch.nn.Linear(4, 2).eval()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = export_fp32(model, (torch.randn(1, 4),), pathlib.Path(d) / "m.onnx")
    ...     y = ort_run(path, torch.ones(3, 4))
    >>> bool(torch.allclose(y, model(torch.ones(3, 4)), atol=1e-5))
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from torchslim._optional import require
from torchslim.errors import CheckpointError

__all__ = ["ort_session", "ort_feed", "ort_runner", "ort_run"]

Tensors = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


def ort_session(path: str | os.PathLike[str], threads: int | None = None, *, providers: list[Any] | None = None) -> Any:
    """An ONNX Runtime ``InferenceSession`` on ``path``: the one place torchslim opens a session.

    ``threads``: intra-op threads (inter-op pinned to 1); ``None`` leaves ONNX Runtime's defaults.
    ``providers``: execution providers in order (default: the CPU provider). Runtime warnings are
    not printed (severity 3: errors only).

    Raises:
        CheckpointError: ``path`` is missing, or ONNX Runtime cannot load it (a damaged, truncated
            or foreign file; one line naming the file).
    """
    ort = require("onnxruntime", "ONNX Runtime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not os.path.isfile(path):
        raise CheckpointError(f"ONNX model {os.fspath(path)} does not exist (or is not a file)")
    from onnxruntime.capi import onnxruntime_pybind11_state as _state

    unreadable = tuple(getattr(_state, n) for n in _LOAD_ERRORS if hasattr(_state, n))
    try:
        return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    except unreadable as exc:
        raise CheckpointError(_load_error(path, exc)) from None


# what ONNX Runtime raises for a file it cannot load as a model (damaged, truncated, not ONNX)
_LOAD_ERRORS = ("InvalidProtobuf", "InvalidArgument", "InvalidGraph", "NoModel", "NoSuchFile", "Fail")


def _load_error(path: str | os.PathLike[str], exc: BaseException) -> str:
    """One line naming the file: ONNX Runtime's reason without its ``[ONNXRuntimeError] : 7 : ...`` prefix."""
    text = " ".join(str(exc).split())
    reason = text.rsplit("failed:", 1)[-1].strip() if "failed:" in text else text
    reason = (reason if len(reason) <= 200 else reason[:197] + "...").rstrip(".") or type(exc).__name__
    if type(exc).__name__ in ("InvalidProtobuf", "NoModel") or "No graph was found" in reason:
        return (f"ONNX model {os.fspath(path)} is damaged, truncated or not an ONNX file ({reason}); "
                "export it again")
    return f"ONNX Runtime cannot load the model {os.fspath(path)} ({type(exc).__name__}: {reason})"


def ort_feed(session: Any, x: Tensors) -> dict[str, Any]:
    """The feed of ``session`` for ``x``: a tensor, or tensors given to the graph inputs in order."""
    xs = x if isinstance(x, (tuple, list)) else (x,)
    return {i.name: t.detach().cpu().contiguous().numpy() for i, t in zip(session.get_inputs(), xs)}


def ort_runner(path: str | os.PathLike[str], x: Tensors, threads: int | None = 1) -> Callable[[], Any]:
    """A no-argument function running ``path`` once on ``x`` (to time, e.g. with ``measure_pair``)."""
    session = ort_session(path, threads)
    feed = ort_feed(session, x)
    return lambda: session.run(None, feed)


def ort_run(path: str | os.PathLike[str], x: Tensors) -> torch.Tensor:
    """Run an ONNX file on ``x`` with ONNX Runtime (CPU) and return the first output."""
    session = ort_session(path)
    return torch.from_numpy(session.run(None, ort_feed(session, x))[0])
