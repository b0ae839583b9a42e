"""ONNX export through ``torch.onnx.export(..., dynamo=True)``, run back with ONNX Runtime.

The dynamo exporter captures the model with ``torch.export`` and translates the ATen graph to
ONNX (it needs ``onnxscript``). The batch dimension of every input is dynamic unless the model
pins it, in which case the export is static and says why. Weights are stored inside the one
``.onnx`` file unless the model is near protobuf's 2 GB limit (then beside it, as ``NAME.data``).
Only where the dynamo exporter fails is the older TorchScript-based exporter tried, and the
result records that (``exporter: "torchscript"`` with ``fallback_reason``).

:func:`export_fp32` is the float file the integer writer (:mod:`torchslim.export.onnx_int`)
starts from: named inputs (a text encoder's ``input_ids``...), a dynamic batch (and sequence,
for token inputs) and duplicate nodes merged.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.export.onnx import export_onnx
    >>> from torchslim.graph.inputs import Inputs
    >>> import tempfile, pathlib
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     info = export_onnx(model, Inputs((torch.randn(1, 4),)), pathlib.Path(d) / "m.onnx")
    >>> info["exporter"], info["opset"], info["dynamic_batch"]
    ('dynamo', 18, True)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._optional import require
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
from torchslim.export.onnx_passes import merge_duplicate_nodes
from torchslim.graph.inputs import Inputs

__all__ = ["DEFAULT_OPSET", "export_onnx", "export_fp32", "input_names", "load_onnx", "ONNX"]

DEFAULT_OPSET = 18
# protobuf refuses messages over 2 GiB; keep a margin for the graph itself
_INLINE_LIMIT = 1_800_000_000


def _param_bytes(model: nn.Module) -> int:
    seen = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _dynamo_export(
    model: nn.Module, inputs: Inputs, path: Path, opset: int, dynamic: bool, inline: bool, optimize: bool
) -> None:
    example = batched(inputs, 2) if dynamic else inputs  # batch 2: torch.export specializes size-1 dims
    shapes = batch_dynamic_shapes(model, example) if dynamic else None
    with quiet():
        program = torch.onnx.export(
            model,
            tuple(example.args),
            kwargs=dict(example.kwargs) or None,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=shapes,
            external_data=not inline,
            optimize=optimize,
            verbose=False,
        )
        if program is None:  # pragma: no cover - older torch wrote the file itself
            raise RuntimeError("torch.onnx.export returned no ONNXProgram")
        program.save(str(path), external_data=not inline)


def _legacy_export(model: nn.Module, inputs: Inputs, path: Path, opset: int, dynamic: bool) -> None:
    n_in = len(inputs.tensors())
    with torch.no_grad():
        n_out = len(tensor_leaves(model(*inputs.args, **inputs.kwargs)))
    in_names = [f"input_{i}" for i in range(n_in)]
    out_names = [f"output_{i}" for i in range(n_out)]
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic else None
    with quiet():
        torch.onnx.export(
            model,
            tuple(inputs.args),
            str(path),
            kwargs=dict(inputs.kwargs) or None,
            dynamo=False,
            opset_version=min(opset, 17),
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=axes,
        )


def export_onnx(
    model: nn.Module,
    inputs: Inputs,
    path: Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    fallback: bool = True,
    optimize: bool = True,
    **_: Any,
) -> dict[str, Any]:
    """Write ``model`` as ONNX at ``path``; returns how it was done.

    ``optimize`` runs onnxscript's graph optimizer on the dynamo exporter's output (constant
    folding, redundancy removal). ``ts.export`` exports again with ``optimize=False`` when the
    optimized file fails its parity check (seen with onnxscript 0.7.2 on a binarized LeNet-5).

    Tries, in order: the dynamo exporter with a dynamic batch axis; the dynamo exporter with
    static shapes (when the model pins its batch size); and, with ``fallback``, the
    TorchScript-based exporter (opset at most 17).

    Returns:
        ``{"exporter": "dynamo"|"torchscript", "opset": int, "dynamic_batch": bool,
        "external_data": bool}`` plus ``static_reason`` / ``fallback_reason`` when a step failed.

    Raises:
        ExportError: every attempt failed; the message names the format and the first reason.
        MissingDependencyError: ``onnx`` or ``onnxscript`` is not installed.
    """
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export (torch.onnx.export(dynamo=True))")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    inline = _param_bytes(model) < _INLINE_LIMIT
    info: dict[str, Any] = {"exporter": "dynamo", "opset": opset, "dynamic_batch": dynamic_batch,
                            "external_data": not inline, "optimized": bool(optimize)}
    attempts: list[tuple[str, bool]] = [("dynamo", True)] if dynamic_batch else []
    attempts.append(("dynamo", False))
    if fallback:
        attempts.append(("torchscript", dynamic_batch))
    first_error: BaseException | None = None
    for exporter, dynamic in attempts:
        for piece in (path, path.with_name(path.name + ".data")):  # a failed attempt may leave pieces
            piece.unlink(missing_ok=True)
        try:
            if exporter == "dynamo":
                _dynamo_export(model, inputs, path, opset, dynamic, inline, optimize)
            else:
                _legacy_export(model, inputs, path, opset, dynamic)
        except Exception as exc:  # exporters raise many types; we report the first reason
            if first_error is None:
                first_error = exc
            if exporter == "dynamo" and dynamic:
                info["static_reason"] = failure_reason(exc)
            elif exporter == "dynamo":
                info["fallback_reason"] = failure_reason(exc)
            else:
                info["torchscript_exporter_reason"] = failure_reason(exc, limit=200)
            continue
        info.update(exporter=exporter, dynamic_batch=dynamic)
        if exporter == "torchscript":
            info["opset"] = min(opset, 17)
            info["optimized"] = False
            warnings.warn(
                f"the dynamo ONNX exporter failed ({info.get('fallback_reason')}); "
                "the model was exported with the TorchScript-based exporter instead",
                stacklevel=2,
            )
        return info
    reason = failure_reason(first_error) if first_error is not None else "no exporter was tried"
    if "torchscript_exporter_reason" in info:
        reason += f" (the TorchScript-based exporter failed too: {info['torchscript_exporter_reason']})"
    raise ExportError(
        f"onnx export of {type(model).__name__} failed: {reason}", format="onnx", reason=reason
    ) from first_error


def load_onnx(path: Path, device: torch.device | None = None) -> Callable[[Inputs], list[torch.Tensor]]:
    """An ONNX Runtime session on ``path`` (CPU provider), as a function of :class:`Inputs`.

    Inputs are fed in order (every tensor of the positional then keyword inputs) and the
    outputs come back as CPU tensors.
    """
    from torchslim.export.ort import ort_feed, ort_session

    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]

    def run(inputs: Inputs) -> list[torch.Tensor]:
        tensors = inputs.tensors()
        if len(tensors) != len(names):
            raise ExportError(
                f"the ONNX graph at {path} takes {len(names)} inputs ({', '.join(names)}) but "
                f"{len(tensors)} tensors were given",
                format="onnx",
                reason="input count mismatch",
            )
        return [torch.from_numpy(o) for o in session.run(None, ort_feed(session, tensors))]

    return run


def input_names(model: nn.Module, n: int) -> list[str]:
    """ONNX input names: the model's own ``input_names`` (e.g. a text encoder's ``input_ids``,
    ``attention_mask``, ``token_type_ids``) when it declares ``n`` or more, else ``input``,
    ``input1``, ..."""
    declared = getattr(model, "input_names", None)
    if isinstance(declared, (tuple, list)) and len(declared) >= n and all(isinstance(x, str) for x in declared):
        return list(declared[:n])
    return [f"input{i}" if i else "input" for i in range(n)]


def export_fp32(model: nn.Module, example: tuple[Any, ...], path: str | os.PathLike[str]) -> Path:
    """Export ``model`` (float, moved to CPU) to ONNX at ``path`` with a dynamic batch dimension.

    Inputs are named by :func:`input_names` and the output ``output``; 2-D integer inputs (token
    ids, masks) also get a dynamic sequence length. The dynamo exporter is tried first (with
    onnxscript's optimizer), the TorchScript-based one (opset 17) where it fails or the model
    holds an RNN (the TorchScript exporter writes a batch-dynamic LSTM / GRU node). Duplicate
    nodes are merged afterwards (:func:`~torchslim.export.onnx_passes.merge_duplicate_nodes`).
    """
    require("onnx", "ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = tuple(t.detach().cpu() for t in example)
    model = model.cpu().eval()
    names = input_names(model, len(example))
    # token inputs (2-D integer tensors, e.g. input_ids) also get a dynamic sequence length
    tokens = [t.dim() == 2 and not t.is_floating_point() for t in example]
    try:
        if any(isinstance(m, nn.RNNBase) for m in model.modules()):
            # torch.export specialises the batch of an RNN's zero initial state; the TorchScript
            # exporter writes a batch-dynamic ONNX LSTM / GRU node (which ORT can quantize)
            raise NotImplementedError("RNN: use the TorchScript exporter")
        batch = torch.export.Dim("batch", min=1, max=4096)
        seq = torch.export.Dim("sequence", min=2, max=4096)
        dyn = tuple({0: batch, 1: seq} if tok else {0: batch} for tok in tokens)
        with torch.no_grad():
            prog = torch.onnx.export(
                model, example, dynamo=True, input_names=names, output_names=["output"],
                dynamic_shapes=dyn, optimize=True, verbose=False,
            )
        prog.save(str(path))
    except Exception:  # noqa: BLE001 - fall back to the TorchScript exporter
        with torch.no_grad():
            torch.onnx.export(
                model, example, str(path), dynamo=False, input_names=names, output_names=["output"],
                dynamic_axes={n: ({0: "batch", 1: "sequence"} if tok else {0: "batch"}) for n, tok in zip(names, tokens)},
                opset_version=17,
            )
    merge_duplicate_nodes(path)
    return path


ONNX = register_format(
    Format(
        name="onnx",
        suffixes=(".onnx",),
        write=export_onnx,
        load=load_onnx,
        tolerance=(1e-4, 1e-4),
        dynamic_batch=True,
        retry_options=({"optimize": False},),
    )
)
