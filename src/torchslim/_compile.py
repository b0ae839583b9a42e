"""``compile_model``: ``torch.compile`` a model so that every family's layers run on their real kernels.

Plain ``torch.compile`` runs a float model well, but a layer a family rewrote may need more to run
fast under inductor: a static-int8 convolution holds int8 weights and reaches oneDNN's int8
kernels only with inductor's freezing on and the x86 quantization passes registered
(``torchslim.quantize.compile``). Each family that needs such a thing registers a *compiler*
(registry kind ``"compiler"``): a function ``(model, **compile_kwargs) -> compiled callable``,
with ``takes=(model) -> bool`` saying whether the model holds any of its layers. This module only reads the registry, so it
sits in the core layer and every runtime that compiles (``torchslim bench``'s ``compile`` rows,
``Budget(runtime="compile")``, the recipes' deploy check) runs the same code.

Shapes are static by default (``dynamic=False``): each new batch size compiles once, which is what
a deployed model at a fixed batch wants, and the int8 lowering does not take symbolic shapes.

Dynamo keeps at most ``recompile_limit`` (8) compiled versions of one code object, and every model
of one class shares its ``forward``: past that it silently runs the code *eagerly*, so a process
that compiles an original, its pruned copies and several batch sizes would time eager code and
call it compiled. The callable :func:`compile_model` returns compiles every new input shape inside
:func:`compile_room` (the limit lifted for that call only; calls at shapes already compiled pay
nothing).

Example:
    >>> import torch
    >>> from torchslim._compile import compiler_for
    >>> compiler_for(torch.nn.Linear(4, 2)) is None  # a float model: plain torch.compile
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchslim._registry import entries

__all__ = ["compile_model", "compile_room", "compiler_for"]

_RECOMPILES = 4096  # compiled versions allowed per code object while a new shape compiles


def compile_room() -> Any:
    """A context in which ``torch.compile`` may recompile one code object many times (dynamo's
    recompile limits raised, put back on exit)."""
    import torch._dynamo

    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")
             if hasattr(torch._dynamo.config, n)]
    return torch._dynamo.config.patch(**dict.fromkeys(names, _RECOMPILES))


def _shape_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return (tuple(v.shape), v.dtype, v.device.type)
        if isinstance(v, (list, tuple)):
            return tuple(one(x) for x in v)
        if isinstance(v, dict):
            return tuple((k, one(x)) for k, x in sorted(v.items()))
        return type(v).__name__
    return (one(args), one(kwargs))


def _roomy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` whose calls at a new input shape (the ones that compile) run inside :func:`compile_room`."""
    seen: set[Any] = set()

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        key = _shape_key(args, kwargs)
        if key in seen:
            return fn(*args, **kwargs)
        with compile_room():
            out = fn(*args, **kwargs)
        seen.add(key)
        return out

    return run


def compiler_for(model: nn.Module) -> str | None:
    """Name of the registered compiler that takes ``model`` (None: plain ``torch.compile``)."""
    for entry in sorted(entries("compiler"), key=lambda e: (e.meta.get("order", 50), e.name)):
        takes = entry.meta.get("takes")
        if takes is None or takes(model):
            return entry.name
    return None


def compile_model(model: nn.Module, **compile_kwargs: Any) -> Callable[..., Any]:
    """``model`` compiled for inference: by the family compiler that takes it, else by
    ``torch.compile`` (inductor). Shapes are static unless ``dynamic=`` says otherwise. The first
    call (and the first at each new input shape) compiles."""
    from torchslim._registry import lookup

    compile_kwargs.setdefault("dynamic", False)
    name = compiler_for(model)
    if name is not None:
        return _roomy(lookup("compiler", name).obj(model, **compile_kwargs))
    return _roomy(torch.compile(model, backend="inductor", **compile_kwargs))
