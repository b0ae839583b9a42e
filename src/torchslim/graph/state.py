"""No side effects, by construction: everything a model holds, captured and put back exactly.

Analysis, trials and surgery run a model's forward, and a forward may leave things behind: a
torchvision ``AnchorGenerator`` moves its ``cell_anchors`` (a plain list attribute) to the input's
device, RAFT keeps its correlation pyramid in ``CorrBlock.corr_pyramid``, timm's LeViT caches
attention biases in a dict, a layer in train mode updates its running statistics in place.
:func:`preserved` puts all of it back when the block ends, whether it succeeded or raised:

* **the attribute set** (and the class) of every module and of every plain object reachable from one (walked
  through lists, tuples, dicts and sets): an attribute the forward added is removed, one it
  replaced is put back (the same object), a container it filled in place gets its old items
  (``_parameters``, ``_buffers``, ``_modules`` and hook tables are such containers);
* **every tensor** reachable that way (parameters, buffers, tensors in plain attributes and in
  containers): a ``.data`` swap is undone, ``.grad`` and ``requires_grad`` are put back, and a
  write into its memory (``copy_``, ``add_``, running statistics, ``out=``) is undone from a copy
  taken just before the first write (copy-on-write, through a ``TorchDispatchMode``), so no
  upfront copy of the weights is made. Extra tensors (the example inputs) can be guarded too.

:func:`clone_module` is the one deep copy for trials: robust to non-leaf tensors a forward left in
attributes ("Only Tensors created explicitly by the user (graph leaves) support the deepcopy
protocol"), optionally with parameters and buffers on the ``meta`` device. :func:`state_digest`
fingerprints the same reachable state (values included) for tests of the contract.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ModelState", "clone_module", "preserved", "state_digest"]

_MAX_DEPTH = 12  # plain objects nested deeper than this are restored by identity only
# objects whose attributes are never walked: they are not state a forward changes (or not ours)
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           torch.dtype, torch.device, torch.Generator, torch.Size, str, bytes, int, float, complex, bool,
           type(None), range, slice, logging.Logger, type(threading.Lock()))


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - sparse, nested, some subclasses: no plain storage
        return None


def _walkable(obj: Any) -> bool:
    if isinstance(obj, _OPAQUE):
        return False
    d = getattr(obj, "__dict__", None)
    return isinstance(d, dict)


class _Walk:
    """The objects reachable from some roots: containers, objects with a ``__dict__``, tensors."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.dicts: list[tuple[Any, dict[str, Any]]] = []  # (object, copy of its __dict__)
        self.classes: list[tuple[Any, type]] = []  # (object, its class): a class swap is undone too
        self.lists: list[tuple[list, list]] = []
        self.maps: list[tuple[dict, list[tuple[Any, Any]]]] = []
        self.sets: list[tuple[set, set]] = []
        self.tensors: list[torch.Tensor] = []
        self.keep: list[Any] = []  # everything walked stays alive, so ids are not reused

    def visit(self, obj: Any, depth: int = 0) -> None:
        stack = [(obj, depth)]
        while stack:
            o, d = stack.pop()
            if id(o) in self.seen:
                continue
            if isinstance(o, torch.Tensor):
                self.seen.add(id(o))
                self.keep.append(o)
                self.tensors.append(o)
                continue
            if d > _MAX_DEPTH:
                continue
            if type(o) is list or (isinstance(o, list) and not _walkable(o)):
                self.seen.add(id(o))
                self.keep.append(o)
                self.lists.append((o, list(o)))
                stack.extend((v, d + 1) for v in o)
            elif isinstance(o, dict):
                self.seen.add(id(o))
                self.keep.append(o)
                items = list(o.items())
                self.maps.append((o, items))
                stack.extend((v, d + 1) for _, v in items)
            elif isinstance(o, tuple):
                self.seen.add(id(o))
                self.keep.append(o)
                stack.extend((v, d + 1) for v in o)
            elif isinstance(o, (set, frozenset)):
                self.seen.add(id(o))
                self.keep.append(o)
                if isinstance(o, set):
                    self.sets.append((o, set(o)))
            elif _walkable(o):
                self.seen.add(id(o))
                self.keep.append(o)
                attrs = dict(o.__dict__)
                self.dicts.append((o, attrs))
                self.classes.append((o, type(o)))
                # a module's own tables (_parameters, _buffers, _modules, hooks) are walked as dicts
                stack.extend((v, d + (0 if isinstance(o, nn.Module) else 1)) for v in attrs.values())


class _TensorState:
    __slots__ = ("tensor", "alias", "key", "geometry", "grad", "requires_grad", "leaf")

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor = t
        self.leaf = t.is_leaf
        with torch.no_grad():
            self.alias = t.detach()  # keeps the memory alive, for undoing a ``.data`` swap
        self.key = _storage_key(t)
        self.geometry = self._geometry(t)
        self.grad = t.grad if self.leaf else None
        self.requires_grad = t.requires_grad

    @staticmethod
    def _geometry(t: torch.Tensor) -> tuple[Any, ...]:
        try:
            return (_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        except Exception:  # noqa: BLE001
            return (_storage_key(t), tuple(t.shape), t.dtype, t.device)

    def restore(self) -> None:
        t = self.tensor
        if self._geometry(t) != self.geometry:
            with torch.no_grad():
                t.data = self.alias
        if self.leaf:
            if t.grad is not self.grad:
                t.grad = self.grad
            if t.requires_grad != self.requires_grad:
                t.requires_grad_(self.requires_grad)


# ops that write into arguments their schema does not mark as written: batch norm's running
# statistics (arguments 3 and 4) in training mode
_UNDECLARED = {"native_batch_norm": (3, 4), "cudnn_batch_norm": (3, 4), "miopen_batch_norm": (3, 4),
               "_batch_norm_impl_index": (3, 4)}


class _WriteGuard(TorchDispatchMode):
    """Copy-on-write: before an op writes into the memory of a guarded tensor, its storage is copied."""

    _mutable: dict[Any, tuple[int, ...]] = {}

    def __init__(self, storages: dict[int, torch.UntypedStorage]) -> None:
        super().__init__()
        self.storages = storages  # storage key -> storage (of the guarded tensors)
        self.saved: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    @classmethod
    def _written(cls, func: Any) -> tuple[int, ...]:
        w = cls._mutable.get(func)
        if w is None:
            try:
                schema = func._schema
                w = tuple(i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write)
                w = w or _UNDECLARED.get(schema.name.split("::")[-1], ())
            except Exception:  # noqa: BLE001
                w = ()
            cls._mutable[func] = w
        return w

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        written = self._written(func)
        if written:
            schema = func._schema
            for i in written:
                a = schema.arguments[i]
                val = args[i] if i < len(args) else kwargs.get(a.name)
                for t in (val if isinstance(val, (list, tuple)) else (val,)):
                    if isinstance(t, torch.Tensor):
                        self._save(t)
        return func(*args, **kwargs)

    def _save(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key is None or key in self.saved or key not in self.storages:
            return
        st = self.storages[key]
        self.saved[key] = (st, st.clone())

    def restore(self) -> None:
        for st, old in self.saved.values():
            if st.nbytes() != old.nbytes():
                st.resize_(old.nbytes())
            st.copy_(old)
        self.saved.clear()


class ModelState:
    """What :func:`preserved` captured: call :meth:`restore` to put it all back."""

    def __init__(self, roots: tuple[Any, ...]) -> None:
        walk = _Walk()
        for r in roots:
            walk.visit(r)
        self._walk = walk
        self._tensors = [_TensorState(t) for t in walk.tensors]
        self.storages: dict[int, torch.UntypedStorage] = {}
        for s in self._tensors:
            t = s.tensor
            if s.key is not None and s.key not in self.storages and t.device.type != "meta":
                try:
                    self.storages[s.key] = t.untyped_storage()
                except Exception:  # noqa: BLE001
                    pass

    def restore(self) -> None:
        """Put every attribute, container and tensor back as it was captured."""
        w = self._walk
        for obj, cls in w.classes:
            if type(obj) is not cls:
                obj.__class__ = cls
        for obj, attrs in w.dicts:
            d = obj.__dict__
            if d.keys() != attrs.keys() or any(d.get(k, _MISSING) is not v for k, v in attrs.items()):
                for k in [k for k in d if k not in attrs]:
                    del d[k]
                for k, v in attrs.items():
                    if d.get(k, _MISSING) is not v:
                        d[k] = v
        for lst, items in w.lists:
            if len(lst) != len(items) or any(a is not b for a, b in zip(lst, items)):
                lst[:] = items
        for mp, items in w.maps:
            if len(mp) != len(items) or any(mp.get(k, _MISSING) is not v for k, v in items) or list(mp) != [k for k, _ in items]:
                mp.clear()
                mp.update(items)
        for st, items in w.sets:
            if st != items:
                st.clear()
                st.update(items)
        for s in self._tensors:
            s.restore()


_MISSING = object()


@contextmanager
def preserved(*roots: Any, guard_writes: bool = True) -> Iterator[ModelState]:
    """Run the block, then put back everything reachable from ``roots`` (modules, tensors,
    containers) exactly as it was, whether the block succeeded or raised.

    Args:
        roots: the model, and anything else the block must not change (e.g. the example inputs).
        guard_writes: undo writes into the memory of the captured tensors (copy-on-write); turn
            off only for a block that cannot write (it saves a dispatch per op).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> with preserved(m):
        ...     m.cache = [torch.ones(1)]
        ...     with torch.no_grad():
        ...         _ = m.weight.zero_()
        >>> hasattr(m, "cache"), bool(m.weight.abs().sum() > 0)
        (False, True)
    """
    state = ModelState(roots)
    guard = _WriteGuard(state.storages) if guard_writes and state.storages else None
    try:
        if guard is None:
            yield state
        else:
            with guard:
                yield state
    finally:
        with torch.no_grad():
            if guard is not None:
                guard.restore()
            state.restore()


def clone_module(model: nn.Module, *, meta: bool = False) -> nn.Module:
    """A deep copy of ``model`` that shares nothing with it.

    Tensors held in plain attributes that are not graph leaves (a forward's caches, kept with their
    autograd history) are copied detached, where ``copy.deepcopy`` would refuse them. With
    ``meta=True`` the parameters and buffers of the copy live on the ``meta`` device (tied ones stay
    tied; no data is copied).
    """
    memo: dict[int, Any] = {}
    if meta:
        for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
            if id(t) in memo:
                continue
            m = t.detach().to("meta")
            memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    walk = _Walk()
    walk.visit(model)
    with torch.no_grad():
        for t in walk.tensors:
            if id(t) not in memo and not t.is_leaf:
                memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)


def state_digest(*roots: Any) -> dict[str, Any]:
    """A fingerprint of everything reachable from ``roots``: for every object with attributes, the
    attribute names and the types of their values; for every tensor, its place, shape, dtype,
    device, ``requires_grad`` and a hash of its bytes. Equal digests mean the same observable state."""
    walk = _Walk()
    for r in roots:
        walk.visit(r)
    index = {id(t): i for i, t in enumerate(walk.tensors)}
    out: dict[str, Any] = {}

    def describe(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("tensor", index.get(id(v)))
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, tuple(describe(x) for x in v))
        if isinstance(v, dict):
            return ("dict", tuple((repr(k), describe(x)) for k, x in v.items()))
        if isinstance(v, (int, float, bool, str, type(None), torch.dtype, torch.device)):
            return repr(v)
        return type(v).__qualname__

    for i, (obj, _) in enumerate(walk.dicts):
        out[f"obj{i}:{type(obj).__qualname__}"] = tuple(sorted((k, describe(v)) for k, v in obj.__dict__.items()))
    for i, t in enumerate(walk.tensors):
        if t.device.type == "meta" or t.is_sparse or getattr(t, "is_nested", False):
            h = "no-data"
        else:
            try:
                with torch.no_grad():
                    flat = t.detach().contiguous().cpu().reshape(-1)
                    h = hashlib.sha1(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()
            except Exception:  # noqa: BLE001 - quantized and other exotic layouts: their printed values
                h = hashlib.sha1(repr(t).encode()).hexdigest()
        out[f"tensor{i}"] = (tuple(t.shape), str(t.dtype), str(t.device), t.requires_grad, h)
    return out
