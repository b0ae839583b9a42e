"""ExecuTorch programs (``.pte``) lowered to the XNNPACK delegate, in fp32 and int8.

``ts.export(model, inputs, "model.pte")`` captures the model with ``torch.export`` (static
shapes: the example's batch size), hands every subgraph XNNPACK supports to the XNNPACK
delegate (``to_edge_transform_and_lower`` with ``XnnpackPartitioner``) and serialises the
ExecuTorch program (``to_executorch``). The parity check runs the file back with ExecuTorch's
Python runtime (``executorch.runtime.Runtime``), which executes the delegated parts on XNNPACK's
CPU kernels and the rest on ExecuTorch's portable kernels; ``info["undelegated_ops"]`` names the
ops that stayed outside XNNPACK (empty for the usual CNNs).

Int8 (format ``"pte-int8"``) goes through PyTorch 2 export quantization: the model is captured
with a dynamic batch, ExecuTorch's ``XNNPACKQuantizer`` (per-channel symmetric int8 weights,
int8 activations with a zero point) inserts observers (``prepare_pt2e``), calibration batches run
through it, ``convert_pt2e`` folds the observed ranges into quantize / dequantize pairs, and the
lowering turns each pattern into an XNNPACK integer kernel. It is chosen

* by ``format="pte-int8"`` (``torchslim export --format pte-int8``) for any model: a float
  model is quantized here, a model quantized by ``ts.quantize_`` is quantized from its float
  twin (:func:`~torchslim.export.onnx_int.float_twin`);
* automatically for ``"pte"`` when the model was quantized by ``ts.quantize_`` (a static / QAT
  model's plain export would simulate int8 in float, as ``"onnx"`` goes to ``"onnx-int8"``; the
  integer ops of a dynamic / weight-only model are not all in ExecuTorch's kernel set).

Calibration reads ``calibration=`` (input tensors or ``(input, target)`` pairs) or, by default,
a few random batches shaped like the example inputs with their mean and spread. The activation
ranges are always observed again by the XNNPACK quantizer's own observers (histogram): a model
calibrated by ``ts.quantize_`` keeps its integer weights' grid but not its activation ranges,
and ``info["ranges"]`` says so. Models quantized in dynamic or weight-only mode are written with
XNNPACK's dynamically quantized linear layers (int8 weights per channel, activations quantized
at run time; int4 weights stored as int8).

The int8 parity check compares the file with the program it was lowered from (the PT2E-quantized
model, int8 simulated in float: what ``onnx-int8`` does with the fake-quant model) in quantization
steps of the output (default 16 steps of an 8-bit output range); the random parity inputs need not
look like the calibration data, where int8 against float would measure range clipping rather than
the file. How the int8 program agrees with the exported model itself is in ``info["vs_model"]``
(lowest SQNR in dB and top-1 agreement on the example and up to two calibration batches).

Example (the export is not run as a doctest: importing ExecuTorch's compiler takes seconds):
    >>> import torch, tempfile, pathlib
    >>> from torchslim.export.pte import export_pte, load_pte, route_pte
    >>> from torchslim.graph.inputs import Inputs
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    >>> route_pte("pte", model)  # a float model: fp32 unless format="pte-int8" is asked for
    'pte'
    >>> x = Inputs((torch.randn(2, 4),))
    >>> with tempfile.TemporaryDirectory() as d:  # doctest: +SKIP
    ...     info = export_pte(model, x, pathlib.Path(d) / "m.pte")
    ...     out = load_pte(pathlib.Path(d) / "m.pte")(x)[0]
    >>> info["backend"], info["undelegated_ops"], bool(torch.allclose(out, model(*x.args), atol=1e-5))  # doctest: +SKIP
    ('XnnpackBackend', [], True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._optional import require
from torchslim._utils import quiet_native_stderr
from torchslim.errors import TorchslimError
from torchslim.export._base import ExportError, Format, batched, quiet, register_format, tensor_leaves
from torchslim.export.onnx_int import float_twin, integer_scheme
from torchslim.export.pt2 import export_program
from torchslim.graph.inputs import Inputs

__all__ = ["PTE", "PTE_INT8", "export_pte", "export_pte_int8", "load_pte", "lower_program", "quantize_pt2e",
           "route_pte", "set_threads"]

PTE, PTE_INT8 = "pte", "pte-int8"
_RANDOM_BATCHES, _RANDOM_BATCH_SIZE = 4, 8
_DELEGATE = "executorch_call_delegate"


def _require(feature: str) -> None:
    require("executorch.exir", feature)


def lower_program(program: Any) -> tuple[bytes, dict[str, Any]]:
    """An ``ExportedProgram`` lowered to XNNPACK and serialised: ``(pte bytes, info)``.

    ``info`` has ``backend``, ``delegated_subgraphs`` (how many XNNPACK blobs) and
    ``undelegated_ops`` (sorted names of the ops left to ExecuTorch's portable kernels).
    """
    _require("ExecuTorch export (.pte)")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with quiet():
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        graph = edge.exported_program().graph_module.graph
        delegated, left = 0, set()
        for node in graph.nodes:
            if node.op != "call_function" or node.target.__name__ == "getitem":
                continue
            name = getattr(node.target, "__name__", str(node.target))
            if name == _DELEGATE:
                delegated += 1
            else:
                left.add(name)
        buffer = edge.to_executorch().buffer
    return buffer, {"backend": "XnnpackBackend", "delegated_subgraphs": delegated, "undelegated_ops": sorted(left)}


def _version() -> str:
    try:
        from executorch.version import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - a build without the version module
        return "unknown"


def export_pte(model: nn.Module, inputs: Inputs, path: Path, **_: Any) -> dict[str, Any]:
    """Write ``model`` as an fp32 ExecuTorch program with the XNNPACK delegate at ``path``.

    The program has static shapes (the example inputs'); run it on inputs of those shapes.

    Returns:
        ``{"exporter": "executorch", "executorch": version, "backend": "XnnpackBackend",
        "delegated_subgraphs": n, "undelegated_ops": [...], "dynamic_batch": False}``.

    Raises:
        ExportError: ``torch.export`` cannot capture the model, or the lowering fails.
        MissingDependencyError: ``executorch`` is not installed.
    """
    _require("ExecuTorch export (.pte)")
    program, _info = export_program(model, inputs, dynamic_batch=False)
    buffer, info = lower_program(program)
    Path(path).write_bytes(buffer)
    return {"exporter": "executorch", "executorch": _version(), **info, "dynamic_batch": False}


def route_pte(format: str, model: nn.Module) -> str:
    """``"pte-int8"`` for ``"pte"`` and a model quantized by ``ts.quantize_`` (any mode), else ``format``."""
    if format == PTE and integer_scheme(model) is not None:
        return PTE_INT8
    return format


def _as_inputs(batch: Any) -> Inputs:
    if isinstance(batch, Inputs):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return Inputs((batch[0],))  # an (input, target) pair
    if isinstance(batch, torch.Tensor):
        return Inputs((batch,))
    raise ExportError(f"{PTE_INT8} calibration batches must be tensors or (input, target) pairs; got "
                      f"{type(batch).__name__}", format=PTE_INT8, reason="bad calibration batch")


def _calibration_batches(inputs: Inputs, calibration: Iterable[Any] | None, seed: int) -> list[Inputs]:
    if calibration is None:
        from torchslim.export.parity import random_inputs

        return [random_inputs(inputs, batch=_RANDOM_BATCH_SIZE, seed=seed + 1000 + k) for k in range(_RANDOM_BATCHES)]
    batches = [_as_inputs(b) for b in calibration]
    if not batches:
        raise ExportError(f"the calibration batches for {PTE_INT8} are empty", format=PTE_INT8,
                          reason="no calibration batches")
    return batches


def _pieces(batch: Inputs, size: int) -> list[Inputs]:
    """``batch`` cut into batches of exactly ``size`` rows (a static capture takes no other)."""
    n = batch.batch_size
    if n == size:
        return [batch]
    if n < size:
        return [batched(batch, size)]

    def rows(lo: int) -> Inputs:
        cut = torch.utils._pytree.tree_map(
            lambda x: x[lo:lo + size] if isinstance(x, torch.Tensor) and x.dim() > 0 else x, (batch.args, batch.kwargs))
        return Inputs(tuple(cut[0]), dict(cut[1]))

    return [rows(lo) for lo in range(0, n - size + 1, size)]


def quantize_pt2e(model: nn.Module, inputs: Inputs, batches: list[Inputs], *, dynamic: bool = False) -> nn.Module:
    """``model`` quantized by PT2E with ExecuTorch's XNNPACK quantizer, calibrated on ``batches``.

    Args:
        model: a float model (not modified).
        inputs: the example inputs (the capture's shapes).
        batches: calibration inputs; static quantization observes activations on them (dynamic
            quantization needs one call only: the example inputs when ``batches`` is empty).
        dynamic: XNNPACK's dynamic int8 linear (weights int8 per channel, activations quantized
            at run time) instead of static int8 everywhere.

    Returns:
        The converted ``GraphModule`` (quantize / dequantize pairs around float ops), ready for
        ``torch.export`` and :func:`lower_program`.
    """
    require("torchao", "int8 ExecuTorch export (PT2E quantization)")
    _require("int8 ExecuTorch export (XNNPACK quantizer)")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    program, info = export_program(model, inputs, dynamic_batch=True)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
    with quiet():
        prepared = prepare_pt2e(program.module(), quantizer)
        static = not info["dynamic_batch"]
        with torch.no_grad():  # weight observers see their weights in the first call (dynamic too)
            for batch in batches or [inputs]:
                for piece in (_pieces(batch, inputs.batch_size) if static else [batch]):
                    prepared(*piece.args, **piece.kwargs)
        return convert_pt2e(prepared)


def export_pte_int8(
    model: nn.Module, inputs: Inputs, path: Path, *, calibration: Iterable[Any] | None = None, seed: int = 0, **_: Any
) -> dict[str, Any]:
    """Write ``model`` as an int8 ExecuTorch program with the XNNPACK delegate at ``path``.

    A model quantized by ``ts.quantize_`` is quantized again from its float twin (static / QAT:
    static int8; dynamic / weight-only: dynamic int8 linear layers); a float model is quantized
    here (static int8). See the module docstring for the calibration.

    Returns:
        :func:`export_pte`'s facts plus ``quantized`` (the model's mode, or ``"pt2e"`` for a float
        model), ``scheme`` (``"static"`` or ``"dynamic"``), ``calibration`` (``"given"`` /
        ``"random"``) and ``ranges`` (how the activation ranges were found).

    Raises:
        ExportError: capture, quantization or lowering failed, or bad calibration batches.
        MissingDependencyError: ``executorch`` or ``torchao`` is not installed.
    """
    _require("int8 ExecuTorch export (.pte)")
    scheme = integer_scheme(model)
    source = model if scheme is None else float_twin(model)
    dynamic = scheme is not None and scheme.kind != "static"
    batches = [] if dynamic else _calibration_batches(inputs, calibration, seed)
    try:
        quantized = quantize_pt2e(source, inputs, batches, dynamic=dynamic)
        program, _info = export_program(quantized, inputs, dynamic_batch=False)
    except TorchslimError:
        raise
    except Exception as exc:  # the quantizer raises many types; name the format
        from torchslim.export._base import failure_reason

        reason = failure_reason(exc)
        raise ExportError(f"{PTE_INT8} export of {type(model).__name__} failed: {reason}", format=PTE_INT8,
                          reason=reason) from exc
    buffer, info = lower_program(program)
    Path(path).write_bytes(buffer)
    out: dict[str, Any] = {"exporter": "executorch", "executorch": _version(), **info, "dynamic_batch": False,
                           "quantized": "pt2e" if scheme is None else scheme.mode,
                           "scheme": "dynamic" if dynamic else "static",
                           "vs_model": _agreement(model, quantized, [inputs, *batches[:2]]),
                           "_reference": _Simulated(quantized)}
    if not dynamic:
        out["calibration"] = "random" if calibration is None else "given"
        out["ranges"] = ("observed by the XNNPACK quantizer" if scheme is None else
                         "recalibrated by the XNNPACK quantizer (the model's own activation ranges are not reused)")
    if scheme is not None and scheme.kind == "int4":
        out["note"] = "int4 weights stored as int8 (XNNPACK dynamic int8 linear)"
    return out


_pool = {"generation": 0}  # bumped whenever set_threads replaces ExecuTorch's thread pool


class _Simulated(nn.Module):
    """The PT2E-quantized program (int8 simulated in float) as a plain module: the parity check
    compares the file with it, as ``onnx-int8`` files are compared with the fake-quant model.
    The program is held outside the module tree (exported programs refuse ``train()`` / ``eval()``)."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.__dict__["program"] = program
        self.output_steps = _output_steps(program)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["program"](*args, **kwargs)


def _output_steps(program: nn.Module) -> list[float | None]:
    """The quantization step (scale) of each output of a converted PT2E program: the scale of the
    per-tensor dequantize that produces it, ``None`` for an output left in float.

    The runtime requantizes with its own rounding, so an output may land one step away from the
    simulation's; parity counts in these steps rather than in steps of the output's range, which
    for one row of a few logits can be a small fraction of the real step.
    """
    graph = getattr(program, "graph", None)
    if graph is None:
        return []
    out = next((n for n in graph.nodes if n.op == "output"), None)
    if out is None:
        return []
    steps: list[float | None] = []
    for node in torch.utils._pytree.tree_leaves(out.args[0]):
        target = getattr(node, "target", None)
        name = getattr(target, "__name__", "") if target is not None else ""
        scale = node.args[1] if name.startswith("dequantize_per_tensor") and len(node.args) > 1 else None
        steps.append(float(scale) if isinstance(scale, (int, float)) else None)
    return steps


@torch.no_grad()
def _agreement(model: nn.Module, quantized: nn.Module, cases: list[Inputs]) -> dict[str, float | None]:
    """How the int8 program agrees with ``model`` (float, or torchslim's own quantization): the
    lowest SQNR (dB) of output 0 and top-1 agreement over ``cases`` (example and calibration batches)."""
    from torchslim._utils import evaluating
    from torchslim.export.parity import _sqnr_db, _top1

    sqnr, top1 = [], []
    with evaluating(model):
        for case in cases:
            ref = tensor_leaves(model(*case.args, **case.kwargs))[0]
            out = tensor_leaves(quantized(*case.args, **case.kwargs))[0]
            sqnr.append(_sqnr_db(ref, out))
            top1.append(_top1(ref, out))
    sq = [v for v in sqnr if v is not None]
    t1 = [v for v in top1 if v is not None]
    return {"min_sqnr_db": min(sq) if sq else None, "top1_agreement": min(t1) if t1 else None}


def set_threads(threads: int) -> int:
    """Set the thread count of ExecuTorch's CPU thread pool (XNNPACK's); returns the previous one.

    Resetting the pool replaces it: a program loaded before keeps a pointer to the old one, and
    running it crashes the process (seen with executorch 1.5.1). Functions from :func:`load_pte`
    therefore load their program again on their first call after a change; anything else should
    load programs after setting the threads.
    """
    _require("the ExecuTorch runtime")
    with quiet_native_stderr():  # cpuinfo's and the pool's C++ lines on descriptor 2 (shown by --verbose)
        from executorch.extension.pybindings import portable_lib

        before = int(portable_lib._threadpool_get_thread_count())
        if before != threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
            _pool["generation"] += 1
    return before


def load_pte(path: Path, device: torch.device | None = None) -> Callable[[Inputs], list[torch.Tensor]]:
    """The program at ``path`` in ExecuTorch's Python runtime, as a function of :class:`Inputs`.

    Tensors are fed in order (positional, then keyword inputs); outputs come back as CPU tensors
    (copies: ExecuTorch reuses its output buffers from call to call). The program is loaded again
    when :func:`set_threads` changed the thread pool since it was loaded.
    """
    _require("the ExecuTorch runtime (.pte)")
    from executorch.runtime import Runtime

    def load() -> Any:
        with quiet_native_stderr():  # not around execute(): it runs inside timing loops
            from executorch.extension.pybindings import portable_lib

            portable_lib._threadpool_get_thread_count()  # the pool is created here, quietly
            method = Runtime.get().load_program(Path(path)).load_method("forward")
        if method is None:
            raise ExportError(f"the ExecuTorch program at {path} has no 'forward' method", format=PTE,
                              reason="no forward method")
        return method

    loaded = {"method": load(), "generation": _pool["generation"]}

    def run(inputs: Inputs) -> list[torch.Tensor]:
        if loaded["generation"] != _pool["generation"]:  # the pool it points to is gone
            loaded.update(method=load(), generation=_pool["generation"])
        outputs = loaded["method"].execute([t.detach().cpu().contiguous() for t in inputs.tensors()])
        return [o.clone() for o in tensor_leaves(list(outputs))]

    return run


PTE_FORMAT = register_format(
    Format(name=PTE, suffixes=(".pte",), write=export_pte, load=load_pte, tolerance=(1e-4, 1e-4))
)
PTE_INT8_FORMAT = register_format(
    Format(name=PTE_INT8, suffixes=(), write=export_pte_int8, load=load_pte, tolerance=(0.0, 0.0, 16.0),
           calibrated=True)
)
