"""The dispatch-level tracer: one eager forward, every ATen op recorded.

``trace(model, example_inputs)`` runs the real forward under a ``TorchDispatchMode``. Each ATen
op that reaches the dispatcher is recorded with its arguments (tensors replaced by
:class:`TensorMeta`: an id, shape, dtype, and the parameter/buffer name when the tensor is one),
its outputs, and the module whose forward was running. Because it runs eagerly, it works on any
model that runs: data-dependent control flow takes the branch actually taken.

The tracer also measures peak activation memory: every tensor an op allocates is a block that
lives until the last Python or C++ reference to it dies (tracked with weak-reference
finalizers), so the peak is what eager execution really holds, parameters and inputs excluded.
"""

from __future__ import annotations

import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from torchslim.errors import InputShapeError, ModelRunError
from torchslim.graph.inputs import Inputs, as_inputs, call_model
from torchslim.graph.state import preserved

__all__ = ["TensorMeta", "OpNode", "ModuleCall", "Trace", "trace"]


@dataclass(frozen=True)
class TensorMeta:
    """What the trace keeps of a tensor: identity and shape, never the data."""

    id: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    param: str | None = None  # qualified parameter/buffer name, when the tensor is one
    producer: int | None = None  # index of the op that created it (None: input/param/constant)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex


@dataclass
class OpNode:
    """One ATen op as it ran."""

    index: int
    func: Any  # torch._ops.OpOverload
    args: tuple[Any, ...]  # tensors replaced by TensorMeta
    kwargs: dict[str, Any]
    outputs: list[TensorMeta]
    module: str  # qualified name of the innermost module whose forward was running ('' = top)

    @property
    def name(self) -> str:
        """``aten.convolution.default`` style name."""
        return str(self.func)

    @property
    def packet(self) -> str:
        """The op name without overload, e.g. ``convolution``."""
        return self.func._schema.name.split("::")[-1]

    def tensor_args(self) -> list[TensorMeta]:
        leaves, _ = tree_flatten((self.args, self.kwargs))
        return [x for x in leaves if isinstance(x, TensorMeta)]


@dataclass
class ModuleCall:
    """One call of a module's forward."""

    name: str
    type: str
    first_op: int
    last_op: int = -1
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class Trace:
    """Everything one traced forward saw."""

    ops: list[OpNode]
    module_calls: list[ModuleCall]
    module_types: dict[str, str]
    params: dict[str, TensorMeta]  # parameter and buffer name -> meta (tied names share one id)
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    peak_activation_bytes: int
    seconds: float
    output: Any = None  # the model's real output (kept only when asked)

    def ops_in(self, module: str) -> list[OpNode]:
        """Ops recorded while ``module`` (or a submodule of it) was running."""
        prefix = module + "."
        return [op for op in self.ops if op.module == module or op.module.startswith(prefix) or module == ""]

    def __repr__(self) -> str:
        return (
            f"Trace({len(self.ops)} ops, {len(self.module_calls)} module calls, "
            f"{len(self.params)} params/buffers, peak activations {self.peak_activation_bytes} B)"
        )


def _map(fn: Any, x: Any) -> Any:
    """``tree_map`` for what ATen ops take and return (tensors, scalars, lists and tuples of them):
    a third of the trace's time went to the generic pytree machinery."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if type(x) is tuple or type(x) is list:
        return type(x)(_map(fn, v) for v in x)
    if isinstance(x, (tuple, list, dict)):  # named tuples, dicts: the generic path
        return tree_map(fn, x)
    return x


def _flat(x: Any) -> list[Any]:
    if type(x) is tuple or type(x) is list:
        out: list[Any] = []
        for v in x:
            out.extend(_flat(v))
        return out
    if isinstance(x, (tuple, list, dict)):
        return tree_flatten(x)[0]
    return [x]


class _Recorder(TorchDispatchMode):
    def __init__(self, tracer: _Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        try:
            out = _fast_meta(func, args, kwargs) if func in _MEMO_OPS else None
            if out is None:
                out = func(*args, **kwargs)
        except Exception:
            self.tracer.failed_op = str(func)  # named by the error trace() raises
            raise
        self.tracer.failed_op = None  # the forward caught that one: it was not what failed
        self.tracer.record(func, args, kwargs, out)
        return out


# Norms whose meta kernels are Python decompositions (a ResNet-152's 155 batch norms were a third
# of its shape-only trace): outputs never alias inputs, so on meta tensors their output shapes are
# computed once per signature and later calls get fresh meta tensors of those shapes.
_MEMO_OPS = {torch.ops.aten.native_batch_norm.default, torch.ops.aten.native_layer_norm.default,
             torch.ops.aten.native_group_norm.default}
_META_MEMO: dict[Any, list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype]]] = {}


def _fast_meta(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    key: list[Any] = [func]
    for a in (*args, *kwargs.items()):
        if isinstance(a, torch.Tensor):
            if a.device.type != "meta":
                return None
            key.append((tuple(a.shape), a.stride(), a.dtype))
        elif isinstance(a, (int, float, bool, str, type(None))) or (isinstance(a, (list, tuple)) and all(
                isinstance(v, (int, float, bool)) for v in a)):
            key.append(a if not isinstance(a, list) else tuple(a))
        else:
            return None
    k = tuple(key)
    spec = _META_MEMO.get(k)
    if spec is None:
        out = func(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        if len(_META_MEMO) > 20_000:  # a long search traces many widths: keep the memo bounded
            _META_MEMO.clear()
        _META_MEMO[k] = [(tuple(o.shape), o.stride(), o.dtype) for o in outs]
        return out
    made = tuple(torch.empty_strided(sh, st, dtype=dt, device="meta") for sh, st, dt in spec)
    return made if len(made) > 1 else made[0]


class _Tracer:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ops: list[OpNode] = []
        self.calls: list[ModuleCall] = []
        self.stack: list[str] = []
        self.call_stack: list[ModuleCall] = []
        self.failed_in: list[str] = []  # innermost module whose forward raised (for the message)
        self.failed_op: str | None = None  # the ATen op that raised, e.g. "aten.nonzero.default"
        self.ids: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.meta_ids: dict[int, int] = {}  # id(meta tensor) -> tensor id (the tensors are held below)
        self.meta_refs: list[torch.Tensor] = []
        self.metas: dict[int, TensorMeta] = {}
        self.next_id = 0
        self.param_names: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.param_names.setdefault(id(p), name)
        for name, b in model.named_buffers(remove_duplicate=False):
            if b is not None:
                self.param_names.setdefault(id(b), name)
        # memory accounting
        self.active = True
        self.external_ptrs: set[int] = set()
        self.live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, refcount]
        self.current = 0
        self.peak = 0

    # ---- identities -------------------------------------------------------------------
    def meta(self, t: torch.Tensor, producer: int | None = None) -> TensorMeta:
        on_meta = t.is_meta
        tid = self.meta_ids.get(id(t)) if on_meta else self.ids.get(t)
        if tid is not None:
            return self.metas[tid]
        tid = self.next_id
        self.next_id += 1
        if on_meta:  # storage-free: keep them alive for the trace, a plain id lookup is 4x cheaper
            self.meta_ids[id(t)] = tid
            self.meta_refs.append(t)
        else:
            self.ids[t] = tid
        try:
            shape = tuple(int(s) for s in t.shape)
        except (RuntimeError, TypeError):  # nested tensors with ragged dims
            shape = ()
        m = TensorMeta(tid, shape, t.dtype, str(t.device), self.param_names.get(id(t)), producer)
        self.metas[tid] = m
        if producer is not None:
            self._allocate(t)
        return m

    # ---- memory -----------------------------------------------------------------------
    @staticmethod
    def _storage(t: torch.Tensor) -> tuple[int, int]:
        try:
            st = t.untyped_storage()
            return st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):
            return 0, 0

    def mark_external(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            ptr, _ = self._storage(t)
            if ptr:
                self.external_ptrs.add(ptr)

    def _allocate(self, t: torch.Tensor) -> None:
        ptr, nbytes = self._storage(t)
        if not ptr or not nbytes or ptr in self.external_ptrs:
            return
        block = self.live.get(ptr)
        if block is None:
            self.live[ptr] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            block[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        if not self.active:
            return
        block = self.live.get(ptr)
        if block is None:
            return
        block[1] -= 1
        if block[1] <= 0:
            self.current -= block[0]
            del self.live[ptr]

    # ---- recording --------------------------------------------------------------------
    def record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        index = len(self.ops)

        def in_meta(x: Any) -> Any:
            return self.meta(x) if isinstance(x, torch.Tensor) else x

        def out_meta(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            tid = self.meta_ids.get(id(x)) if x.is_meta else self.ids.get(x)
            if tid is not None and self.metas[tid].shape != tuple(x.shape):
                # an in-place op changed the shape (transpose_, squeeze_...): from here on the
                # same tensor object is a new value, produced by this op
                if x.is_meta:
                    del self.meta_ids[id(x)]
                else:
                    del self.ids[x]
            return self.meta(x, producer=index)

        margs, mkwargs = _map(in_meta, tuple(args)), {k: _map(in_meta, v) for k, v in kwargs.items()}
        outs = _flat(_map(out_meta, out))
        module = self.stack[-1] if self.stack else ""
        self.ops.append(OpNode(index, func, margs, mkwargs, [o for o in outs if isinstance(o, TensorMeta)], module))

    def pre_hook(self, name: str, module: nn.Module) -> None:
        self.failed_in.clear()
        self.stack.append(name)
        call = ModuleCall(name, type(module).__name__, first_op=len(self.ops))
        self.calls.append(call)
        self.call_stack.append(call)

    def post_hook(self, output: Any) -> None:
        if self.stack:
            name = self.stack.pop()
            # hooks registered with always_call also run while an exception propagates
            if sys.exc_info()[1] is not None and not self.failed_in:
                self.failed_in.append(name)
        if self.call_stack:
            call = self.call_stack.pop()
            call.last_op = len(self.ops) - 1
            leaves = [output] if isinstance(output, torch.Tensor) else tree_flatten(output)[0]
            call.output_shapes = [tuple(x.shape) for x in leaves if isinstance(x, torch.Tensor) and not x.is_nested]


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    grad: bool = False,
    keep_output: bool = False,
) -> Trace:
    """Run ``model`` once on ``example_inputs`` and record every ATen op.

    The model is run as it is (its train/eval mode is not changed). With ``grad=False`` the
    forward runs under ``torch.no_grad()``, so PyTorch may pick fused inference kernels
    (``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``) exactly as users
    see at inference time; with ``grad=True`` the unfused ops are recorded.

    Args:
        model: any ``nn.Module`` that runs eagerly.
        example_inputs: a tensor, a tuple/list of positional inputs, or a dict of keyword inputs.
        grad: record with autograd enabled.
        keep_output: keep the model's output on the returned trace.

    Returns:
        A :class:`Trace`. Neither the model nor the inputs are modified: every attribute, container
        and tensor reachable from them is put back after the forward, even when it raises
        (:func:`torchslim.graph.state.preserved`).

    Raises:
        InputShapeError: the inputs do not fit the model.
        ModelRunError: the model's forward raised; the message names the module. Either error's
            ``op`` attribute names the ATen op that raised (None when the forward's own Python
            code did), ``module`` the innermost module running ("" for the top level, None
            when unknown), and ``__cause__`` is what the forward raised.

    Example:
        >>> import torch, torchslim as ts
        >>> t = ts.graph.trace(torch.nn.Linear(4, 2), torch.randn(1, 4))
        >>> [op.packet for op in t.ops]
        ['t', 'addmm']
    """
    inputs: Inputs = as_inputs(example_inputs)
    tracer = _Tracer(model)
    tracer.mark_external(list(model.parameters()) + [b for b in model.buffers() if b is not None])
    tracer.mark_external(inputs.tensors())
    input_metas = [tracer.meta(t) for t in inputs.tensors()]

    # Global hooks, filtered to this model's modules: per-module hooks would switch off
    # PyTorch's fused inference paths (nn.TransformerEncoderLayer checks for them).
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)

    def pre(module: nn.Module, args: Any) -> None:
        name = names.get(id(module))
        if name is not None:
            tracer.pre_hook(name, module)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in names:
            tracer.post_hook(output)

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post, always_call=True)]
    start = time.perf_counter()
    try:
        # whatever the forward leaves behind (caches, anchors moved to another device, running
        # statistics, attributes it adds) is put back when it ends (graph.state)
        with preserved(model, inputs.args, inputs.kwargs), torch.set_grad_enabled(grad), _Recorder(tracer):
            output = call_model(model, inputs, where=tracer.failed_in)
    except (InputShapeError, ModelRunError) as exc:
        exc.op = tracer.failed_op
        exc.module = tracer.failed_in[-1] if tracer.failed_in else None
        raise
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - start
    leaves, _ = tree_flatten(output)
    output_metas = [tracer.meta(x) for x in leaves if isinstance(x, torch.Tensor)]
    params = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        if p is not None:
            params[name] = tracer.meta(p)
    result = Trace(
        ops=tracer.ops,
        module_calls=tracer.calls,
        module_types={n: type(m).__name__ for n, m in model.named_modules(remove_duplicate=False)},
        params=params,
        inputs=input_metas,
        outputs=output_metas,
        peak_activation_bytes=tracer.peak,
        seconds=seconds,
        output=output if keep_output else None,
    )
    tracer.active = False
    return result
