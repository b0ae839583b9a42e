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

Example:
    >>> import torch
    >>> from torchslim._compile import compiler_for
    >>> compiler_for(torch.nn.Linear(4, 2)) is None  # a float model: plain torch.compile
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchslim._registry import entries

__all__ = ["compile_model", "compiler_for"]


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
        return lookup("compiler", name).obj(model, **compile_kwargs)
    return torch.compile(model, backend="inductor", **compile_kwargs)
