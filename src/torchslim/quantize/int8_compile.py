"""``ts.quantize.compile``: static-int8 models on oneDNN int8 kernels under ``torch.compile``.

The Int8 layers of :mod:`torchslim.quantize.int8` trace the decomposed quantize / dequantize
pattern PyTorch 2 export quantization produces. :func:`compile` hands the model to
``torch.compile`` with inductor's freezing on and torchao's x86 inductor passes registered: they
recognise the pattern and run oneDNN int8 kernels (``onednn.qconv_pointwise`` /
``onednn.qlinear_pointwise``), fusing the ReLU that follows and the next layer's input
quantization into the kernel. Conv3d layers keep the float kernel (oneDNN's int8 conv is
lowered for 1-D and 2-D only), with the same numerics.

Before those passes, :func:`compile` rewrites inductor's aten graph the way PyTorch 2 export's
``X86InductorQuantizer`` annotates a model, with torchslim's own calibrated ranges:

* a residual ``add(conv(...), t)`` (ResNet's ``out += identity``, MobileNetV2's ``x + conv(x)``)
  reads ``t`` as ``dequantize(quantize(t))``, on the grid of the Int8 layer that already reads
  ``t`` or else on ``t``'s own calibrated output range (a ResNet downsample conv): the add then
  runs inside the conv's int8 kernel (oneDNN's "sum" post-op, ``qconv2d_pointwise.binary``),
  and whatever produced ``t`` writes uint8 instead of float;
* the quantize nodes of one tensor on one grid merge (two layers reading the same tensor), so
  a producer read only through them writes uint8;
* a max pool read only through a quantize pools the uint8 tensor (the same bits: max commutes
  with the monotone rounding);
* a global average pool (``mean``) of an Int8 layer's output, read only through a quantize,
  reads that output on the layer's calibrated output grid, so the conv writes uint8.

Only the residual operand and the pooled output are new rounding: the compiled model differs
from the eager one by at most half a quantization step on each (tested); the eager forward is
unchanged.

The per-call cost outside the kernels is cut too: inductor writes the code that calls the
kernels in C++ (``cpp_wrapper``).
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from torchslim._registry import register
from torchslim.quantize import int8 as _int8
from torchslim.quantize.int8 import _A_MAX, _A_MIN, _QD, _Int8Base

__all__ = ["compile", "int8_kernels"]

_AT = torch.ops.aten


def _is_q(node: Any) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target == _QD.quantize_per_tensor.default


def _is_uint8_q(node: Any) -> bool:
    """A ``quantize_per_tensor`` to uint8 with positional arguments (what the Int8 layers trace)."""
    return _is_q(node) and len(node.args) == 6 and not node.kwargs and node.args[5] == torch.uint8


def _is_dq(node: Any) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target == _QD.dequantize_per_tensor.default


def _float_tensor(node: Any) -> bool:
    val = getattr(node, "meta", {}).get("val")
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def _merge_same_quantize(graph: torch.fx.Graph) -> int:
    """One ``quantize_per_tensor`` per (tensor, scale, zero point): every Int8 layer quantizes its
    own input, so a tensor read by two layers calibrated alike is quantized twice."""
    seen: dict[tuple[Any, ...], Any] = {}
    merged = 0
    for node in list(graph.nodes):
        if not _is_q(node):
            continue
        key = (node.args, tuple(sorted(node.kwargs.items())))
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            merged += 1
    return merged


def _quantized_view(graph: torch.fx.Graph, q: Any, before: Any) -> Any:
    """A new ``dequantize_per_tensor`` of the quantize node ``q`` (same scale, zero point, range),
    placed before ``before``."""
    with graph.inserting_before(before):
        dq = graph.call_function(_QD.dequantize_per_tensor.default, (q, *q.args[1:]), dict(q.kwargs))
    if "val" in q.args[0].meta:  # the pattern checks read shapes and dtypes from here
        dq.meta["val"] = q.args[0].meta["val"]
    return dq


def _new_quantize(graph: torch.fx.Graph, y: Any, scale: float, zero_point: int, before: Any) -> Any:
    with graph.inserting_before(before):
        q = graph.call_function(_QD.quantize_per_tensor.default, (y, scale, zero_point, _A_MIN, _A_MAX, torch.uint8))
    if "val" in y.meta:
        q.meta["val"] = y.meta["val"].to(torch.uint8)
    return q


def _strip_output_marks(graph: torch.fx.Graph) -> dict[Any, tuple[float, int]]:
    """Remove the Int8 layers' output markers; return ``{output node: (scale, zero point)}``."""
    ranges: dict[Any, tuple[float, int]] = {}
    mark = torch.ops.torchslim.int8_output_range.default
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == mark:
            y, scale, zp = node.args
            ranges[y] = (float(scale), int(zp))
            node.replace_all_uses_with(y)
            graph.erase_node(node)
    return ranges


def _quantize_residual_operands(graph: torch.fx.Graph, ranges: dict[Any, tuple[float, int]]) -> int:
    """``add(conv_out, t)``: read ``t`` as ``dequantize(quantize(t))`` so the add runs as oneDNN's
    "sum" post-op of the conv and ``t``'s producer can write uint8. The grid of ``t`` is the one
    an Int8 layer reading ``t`` already quantizes it on, else ``t``'s own calibrated output range
    (``t`` is an Int8 layer's output, e.g. a ResNet downsample). Either is at most half a step
    off the float ``t``; an operand with neither stays float (and the add unfused)."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != _AT.add.Tensor or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        if not all(isinstance(t, torch.fx.Node) and _float_tensor(t) and not _is_dq(t) for t in (a, b)):
            continue
        if a.meta["val"].shape != b.meta["val"].shape:
            continue

        def read_by_layer(t: Any) -> Any:
            qs = [u for u in t.users if _is_uint8_q(u)]
            return qs[0] if len(qs) == 1 else None

        choice = None
        for i in (1, 0):  # the second operand first: ``out += identity``
            t, other = node.args[i], node.args[1 - i]
            if other.target == _AT.convolution.default and read_by_layer(t) is not None:
                choice = (i, read_by_layer(t))
                break
        if choice is None:
            for i in (1, 0):
                t, other = node.args[i], node.args[1 - i]
                if other.target == _AT.convolution.default and t in ranges:
                    choice = (i, _new_quantize(graph, t, *ranges[t], node))
                    break
        if choice is None:
            continue
        args = list(node.args)
        args[choice[0]] = _quantized_view(graph, choice[1], node)
        node.args = tuple(args)
        done += 1
    return done


_VIEWS = (_AT.view.default, _AT._unsafe_view.default, _AT.reshape.default, _AT.flatten.using_ints,
          _AT.squeeze.dim, _AT.squeeze.dims, _AT.unsqueeze.default, _AT.clone.default)


def _int8_max_pool(graph: torch.fx.Graph) -> int:
    """``maxpool(y)`` read only through one quantize (directly or through reshapes, as in
    ``pool -> flatten -> linear``): quantize ``y`` on that grid first and pool the uint8
    tensor; the same bits, as max commutes with the monotone rounding and re-quantizing a
    dequantized value on its own grid gives it back."""
    done = 0
    pools = (_AT.max_pool2d_with_indices.default, torch.ops.prims._low_memory_max_pool_with_offsets.default)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in pools or not _float_tensor(node.args[0]) \
                or _is_dq(node.args[0]):
            continue
        outs = list(node.users)
        if len(outs) != 1 or outs[0].target is not operator.getitem or outs[0].args[1] != 0:
            continue
        pooled = last = outs[0]
        while len(last.users) == 1 and next(iter(last.users)).target in _VIEWS:
            last = next(iter(last.users))
        qs = list(last.users)
        if len(qs) != 1 or not _is_uint8_q(qs[0]):
            continue
        q_out = qs[0]
        y = node.args[0]
        q_in = _new_quantize(graph, y, q_out.args[1], q_out.args[2], node)
        node.replace_input_with(y, _quantized_view(graph, q_in, node))
        if last is not pooled:  # pool -> quantize -> dequantize -> reshapes -> quantize
            reader = next(iter(pooled.users))
            q_mid = _new_quantize(graph, pooled, q_out.args[1], q_out.args[2], reader)
            reader.replace_input_with(pooled, _quantized_view(graph, q_mid, reader))
        done += 1
    return done


_ACTIVATIONS = (_AT.relu.default, _AT.clamp_min.default, _AT.clamp_max.default, _AT.clamp.default, _AT.hardtanh.default)


def _int8_mean(graph: torch.fx.Graph, ranges: dict[Any, tuple[float, int]]) -> int:
    """A global average pool (``mean`` over the spatial dims, as in MobileNetV2's head) read only
    through one quantize, of an Int8 layer's output (after its ReLU / ReLU6): quantize that output
    on the layer's calibrated output range, so the conv writes uint8 (its activation fused) and
    the mean reads bytes, as X86InductorQuantizer shares an average pool's grid with its input.
    The new rounding is at most half a step of the layer's range before the mean."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != _AT.mean.dim or not _float_tensor(node.args[0]) \
                or _is_dq(node.args[0]):
            continue
        last = node
        while len(last.users) == 1 and next(iter(last.users)).target in _VIEWS:
            last = next(iter(last.users))
        if len(last.users) != 1 or not _is_uint8_q(next(iter(last.users))):
            continue
        y = src = node.args[0]
        while src not in ranges and getattr(src, "target", None) in _ACTIVATIONS and len(src.users) == 1:
            src = src.args[0]
        if src not in ranges or len(y.users) != 1:
            continue
        q_in = _new_quantize(graph, y, *ranges[src], node)
        node.replace_input_with(y, _quantized_view(graph, q_in, node))
        done += 1
    return done


def _int8_graph_pass(graph: torch.fx.Graph, onednn: bool = False) -> None:
    """Rewrites on inductor's functional aten graph, before freezing lowers the quantization
    patterns: the Int8 layers' output markers go (their ranges kept aside), residual adds read
    their second operand through a quantize, quantize nodes of the same tensor and grid merge,
    max pooling and a global average pool's input run on uint8. What X86InductorQuantizer annotates in a model, here from
    torchslim's own calibrated ranges (see the module doc). ``onednn``: then every 2-D int8 conv
    chain that reads and writes uint8 becomes one call of torchslim's cached-primitive oneDNN conv
    (:func:`torchslim.quantize.onednn.use_cached_qconv`)."""
    ranges = _strip_output_marks(graph)
    _merge_same_quantize(graph)
    if _quantize_residual_operands(graph, ranges):
        _merge_same_quantize(graph)
    _int8_max_pool(graph)
    _int8_mean(graph, ranges)
    if onednn:
        from torchslim.quantize.onednn import use_cached_qconv

        use_cached_qconv(graph)
    graph.lint()


def _graph_pass(onednn: bool) -> Any:
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    files: tuple[str, ...] = (__file__,)
    if onednn:
        from torchslim.quantize import onednn as _onednn

        files += (_onednn.__file__, str(_onednn.SOURCE))

    class Int8GraphPass(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            _int8_graph_pass(graph, onednn)

        def uuid(self) -> Any:
            return get_hash_for_files(files)

    return Int8GraphPass()


def _register_x86_passes() -> None:
    from torchslim._optional import require

    # importing the quantizer registers the passes that turn dequant -> conv/linear into oneDNN int8 kernels
    require("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "int8 kernels under torch.compile")


def compile(model: nn.Module, *, cpp_wrapper: bool = True, onednn: bool | None = None, **compile_kwargs: Any) -> Any:
    """``torch.compile`` a static-int8 model so it runs oneDNN int8 kernels on x86 CPUs.

    Turns on inductor's freezing for this model's graphs (set around its calls only, so other
    compiled code is not affected: weights become constants, which the int8 weight prepacking
    needs), registers torchao's x86 inductor quantization passes, and returns a callable that runs
    the compiled model in eval mode under ``torch.no_grad()`` (freezing applies to inference only).
    A float model compiles the same way (useful as the fp32 baseline). The first call compiles
    (seconds to a minute).

    The result is a snapshot of the model, as an ONNX Runtime session is: its weights are frozen
    into the graph, and Dynamo re-checks only the inputs, global state and the identity of the
    model's tensors on each call (``_snapshot_guards``; ``options={"guard_filter_fn": None}``
    keeps all of Dynamo's guards). Compile again after changing the model.

    Args:
        model: the model (its mode is switched to eval).
        cpp_wrapper: inductor writes the code that calls the kernels in C++ instead of Python
            (``torch._inductor.config.cpp_wrapper``): a compiled MobileNetV2 makes ~60 kernel calls,
            and at batch 1 the Python wrapper costs about 1 ms of them. Compiling takes a few
            seconds longer. Where the C++ wrapper fails to build, the Python one is used.
        onednn: run 2-D int8 convs on torchslim's own oneDNN operator, whose primitives are built
            once (:mod:`torchslim.quantize.onednn`; PyTorch's ``qconv_pointwise`` rebuilds them at
            every call, tens of microseconds per conv at batch 1). ``None`` (default): where that
            operator is available (``make setup`` installs its oneDNN); ``True``: required
            (``MissingDependencyError`` naming why when it is not); ``False``: PyTorch's kernels.
        compile_kwargs: more ``torch.compile`` arguments (``dynamic=``, ``mode=``, ``options=``...).
            Shapes are static unless ``dynamic=`` says otherwise: each new input shape compiles
            once (the int8 lowering does not take symbolic shapes).

    Raises:
        MissingDependencyError: torchao is not installed (``pip install torchslim[executorch]``);
            ``onednn=True`` and torchslim's oneDNN operator cannot be built or loaded.
    """
    _register_x86_passes()
    if onednn is None or onednn:
        from torchslim.quantize import onednn as _onednn

        if onednn and not _onednn.available():
            from torchslim.errors import MissingDependencyError

            raise MissingDependencyError(f"compile(onednn=True): torchslim's oneDNN conv is not available: "
                                         f"{_onednn.why_unavailable()}")
        onednn = _holds_int8(model) and _onednn.available()
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor import config as inductor_config

    with contextlib.suppress(NotImplementedError):  # an exported program's module has no train/eval
        model.eval()
    compile_kwargs.setdefault("dynamic", False)
    # inductor's settings go in as torch.compile options: they hold while a graph compiles and cost
    # nothing per call (patching inductor's config around every call cost ~33 us); freezing alone
    # is set around each call (below), as Dynamo reads it too
    options = dict(compile_kwargs.pop("options", None) or {})
    mode = compile_kwargs.pop("mode", None)
    if mode:  # torch.compile takes a mode or options, not both: spell the mode out as options
        options = {**torch._inductor.list_mode_options(mode, compile_kwargs["dynamic"]), **options}
    options.setdefault("guard_filter_fn", _snapshot_guards(model))
    options["joint_custom_pre_pass"] = _graph_pass(bool(onednn))

    def build(cpp: bool) -> Any:
        return torch.compile(model, options={**options, "cpp_wrapper": cpp}, **compile_kwargs)

    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # read while Dynamo traces (a first call or a recompile): the Int8 layers mark their outputs,
        # and Dynamo lifts weights as constants only with freezing on. Set directly, not with
        # config.patch(), which costs ~25 us per call
        marking, _int8._MARK_OUTPUTS = _int8._MARK_OUTPUTS, True
        freezing, inductor_config.freezing = inductor_config.freezing, True
        try:
            with torch.no_grad():
                return run.compiled(*args, **kwargs)
        finally:
            _int8._MARK_OUTPUTS = marking
            inductor_config.freezing = freezing

    @functools.wraps(model.forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(args, kwargs)
        except BackendCompilerFailed:
            if not run.cpp_wrapper:  # type: ignore[attr-defined]
                raise
            run.cpp_wrapper = False  # type: ignore[attr-defined]  # the C++ wrapper did not build here
            run.compiled = build(False)  # type: ignore[attr-defined]
            return call(args, kwargs)

    run.cpp_wrapper = bool(cpp_wrapper)  # type: ignore[attr-defined]  # False after a failed C++ build
    run.compiled = build(run.cpp_wrapper)  # type: ignore[attr-defined]
    run.model = model  # type: ignore[attr-defined]
    run.onednn = bool(onednn)  # type: ignore[attr-defined]
    return run


def _snapshot_guards(model: nn.Module) -> Any:
    """A Dynamo guard filter for a compiled int8 model: it keeps the guards on the inputs, on global
    state and on the identity of the model's tensors (so two models with the same ``forward`` code
    never share a graph: their frozen weights differ), and drops the rest of those on the model and
    on module-level names.

    Dynamo guards every attribute, hook dictionary and module-level name the forward read: about
    2,700 checks for MobileNetV2, 0.2-0.3 ms per call at batch 1. With freezing the compiled model
    is a snapshot anyway (its weights are constants), so a later change to the model's attributes
    or submodules is not seen either way. Compile again after changing the model."""

    def keep(entries: list[Any]) -> list[bool]:
        roots = {e.name for e in entries if e.has_value and e.value is model}

        def of_model(name: str) -> bool:
            return name in roots or name.startswith("G[") or any(name.startswith((r + ".", r + "[")) for r in roots)

        return [e.guard_type == "ID_MATCH" or not of_model(e.name) for e in entries]

    return keep


def _holds_int8(model: nn.Module) -> bool:
    return any(isinstance(m, _Int8Base) for m in model.modules())


# every runtime that compiles (bench's compile rows, Budget(runtime="compile"), the recipes' deploy
# check) runs a static-int8 model on the oneDNN int8 kernels: ``torchslim._compile.compile_model``
register("compiler", "int8", compile, family="quantize", takes=_holds_int8,
         description="static / QAT int8 layers on oneDNN int8 kernels (inductor freezing + x86 passes)")


@contextlib.contextmanager
def _capture_output_code() -> Iterator[list[str]]:
    """Collect the Python source inductor writes for each compiled graph."""
    from torch._inductor import graph as inductor_graph

    sources: list[str] = []
    original = inductor_graph.GraphLowering.compile_to_module

    def capture(self: Any, *args: Any, **kwargs: Any) -> Any:
        mod = original(self, *args, **kwargs)
        path = getattr(mod, "__file__", None)
        if path:
            with open(path) as f:
                sources.append(f.read())
        return mod

    inductor_graph.GraphLowering.compile_to_module = capture  # type: ignore[method-assign]
    try:
        yield sources
    finally:
        inductor_graph.GraphLowering.compile_to_module = original  # type: ignore[method-assign]


def int8_kernels(model: nn.Module, *example_inputs: Any, onednn: bool | None = None) -> dict[str, int]:
    """Compile ``model`` with :func:`compile`, run it once and count the oneDNN kernels in the code
    inductor generated: ``{"qconv": n, "qlinear": n, "float_conv": n, "float_linear": n, "qconv_add": n,
    "qmaxpool": n, "float_out": n, "cached_qconv": n}`` (``qconv_add``: the int8 convs with a residual
    add fused in, counted in ``qconv`` too; ``qmaxpool``: max pools run on uint8; ``float_out``:
    int8 kernels that write float instead of uint8, e.g. the last linear; ``cached_qconv``: the
    int8 convs run by torchslim's own oneDNN operator, counted in ``qconv`` too). ``onednn`` as
    for :func:`compile`.

    A check that the int8 kernels are really used (compiles afresh: seconds to a minute).
    """
    torch._dynamo.reset()
    with _capture_output_code() as sources:
        compile(model, cpp_wrapper=False, onednn=onednn)(*example_inputs)  # the kernels are named in the Python wrapper
    code = "\n".join(sources)
    calls = [line for line in code.splitlines() if "= torch.ops.onednn.q" in line]
    cached = [line for line in code.splitlines() if "= torch.ops.torchslim_onednn.qconv2d.default(" in line]
    cached_add = sum(not line.rstrip().rstrip(")").split(", ")[-3].strip().startswith("None") for line in cached)
    return {
        "qconv": code.count("onednn.qconv_pointwise") + code.count("onednn.qconv2d_pointwise") + len(cached),
        "qlinear": code.count("onednn.qlinear_pointwise"),
        "float_conv": code.count("mkldnn._convolution_pointwise") + code.count("aten.convolution("),
        "float_linear": code.count("mkldnn._linear_pointwise") + code.count("extern_kernels.mm(")
        + code.count("extern_kernels.addmm("),
        "qconv_add": code.count("onednn.qconv2d_pointwise.binary") + code.count("onednn.qconv_pointwise.binary") + cached_add,
        "qmaxpool": code.count("quantized.max_pool2d"),
        "float_out": sum("torch.float32" in line for line in calls),
        "cached_qconv": len(cached),
    }
