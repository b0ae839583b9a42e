"""``torch.export`` programs: ``torch.export.export`` then ``torch.export.save`` (a ``.pt2`` file).

The program is captured non-strictly (the model's Python runs, its tensor ops are recorded),
with a dynamic batch axis when the model allows one; ``torch.export.load(path).module()``
runs it back.

Example:
    >>> import torch, tempfile, pathlib
    >>> from torchslim.export.pt2 import export_pt2
    >>> from torchslim.graph.inputs import Inputs
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     export_pt2(model, Inputs((torch.randn(1, 4),)), pathlib.Path(d) / "m.pt2")["dynamic_batch"]
    True
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.export._base import (
    ExportError,
    Format,
    batch_dynamic_shapes,
    batched,
    failure_reason,
    quiet,
    register_format,
    tensor_leaves,
)
from torchslim.graph.inputs import Inputs

__all__ = ["export_program", "export_pt2", "load_pt2", "PT2"]


def export_program(model: nn.Module, inputs: Inputs, *, dynamic_batch: bool = True) -> tuple[Any, dict[str, Any]]:
    """``torch.export.export`` with a dynamic batch axis, static shapes when the model pins them.

    Returns:
        ``(ExportedProgram, info)`` where ``info`` has ``dynamic_batch`` and, when the dynamic
        attempt failed, ``static_reason``.

    Raises:
        ExportError: the model cannot be captured (the message names the reason and the op).
    """
    info: dict[str, Any] = {"dynamic_batch": dynamic_batch}
    attempts = [True, False] if dynamic_batch else [False]
    first: BaseException | None = None
    for dynamic in attempts:
        example = batched(inputs, 2) if dynamic else inputs  # batch 2: size-1 dims get specialized
        try:
            shapes = batch_dynamic_shapes(model, example) if dynamic else None
            with quiet():
                program = torch.export.export(
                    model, tuple(example.args), dict(example.kwargs) or None, dynamic_shapes=shapes, strict=False
                )
        except Exception as exc:  # torch.export raises many types (UserError, GuardOnDataDependent...)
            first = first or exc
            if dynamic:
                info["static_reason"] = failure_reason(exc)
            continue
        info["dynamic_batch"] = dynamic
        return program, info
    reason = failure_reason(first) if first is not None else "no attempt was made"
    raise ExportError(f"pt2 export of {type(model).__name__} failed: {reason}", format="pt2", reason=reason) from first


def export_pt2(model: nn.Module, inputs: Inputs, path: Path, *, dynamic_batch: bool = True, **_: Any) -> dict[str, Any]:
    """Capture ``model`` with :func:`export_program` and ``torch.export.save`` it at ``path``."""
    program, info = export_program(model, inputs, dynamic_batch=dynamic_batch)
    torch.export.save(program, str(path))
    return info


def load_pt2(path: Path, device: torch.device | None = None) -> Callable[[Inputs], list[torch.Tensor]]:
    """``torch.export.load(path).module()`` as a function of :class:`Inputs`."""
    module = torch.export.load(str(path)).module()
    if device is not None:
        module = module.to(device)

    def run(inputs: Inputs) -> list[torch.Tensor]:
        with torch.no_grad():
            return tensor_leaves(module(*inputs.args, **inputs.kwargs))

    return run


PT2 = register_format(
    Format(
        name="pt2",
        suffixes=(".pt2",),
        write=export_pt2,
        load=load_pt2,
        tolerance=(1e-5, 1e-5),
        dynamic_batch=True,
    )
)
