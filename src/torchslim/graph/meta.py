"""Shape-only copies: a model's parameters and buffers, and its inputs, on the ``meta`` device.

A forward on meta tensors computes every shape and no value, so tracing it costs no arithmetic
and no activation memory. The channel analysis traces this way first
(:func:`~torchslim.graph.build.analyse`); pruning and search use :func:`meta_copy` to try a
width without touching the real model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from torchslim.graph.inputs import as_inputs
from torchslim.graph.state import clone_module

__all__ = ["meta_copy", "params_on_meta", "to_meta"]


@contextmanager
def params_on_meta(model: nn.Module) -> Iterator[None]:
    """Inside the block, every parameter and buffer of ``model`` is a ``meta`` tensor of the same
    shape (tied tensors stay tied); the originals are put back on exit, whatever happens. Cheaper
    than :func:`meta_copy` (no deep copy), for a trace that runs the model once."""
    memo: dict[int, torch.Tensor] = {}
    saved: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        for mod in model.modules():
            for table in (mod._parameters, mod._buffers):
                for k, t in list(table.items()):
                    if t is None:
                        continue
                    m = memo.get(id(t))
                    if m is None:
                        mt = t.detach().to("meta")
                        m = memo[id(t)] = nn.Parameter(mt, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else mt
                    saved.append((table, k, t))
                    table[k] = m
        yield
    finally:
        for table, k, t in reversed(saved):
            table[k] = t


def meta_copy(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose parameters and buffers live on the ``meta`` device (no data copied;
    :func:`torchslim.graph.state.clone_module`, so tensors a forward cached in attributes are copied
    detached).

    Returns None when the model cannot be copied (e.g. it holds un-copyable state).
    """
    try:
        return clone_module(model, meta=True)
    except Exception:  # noqa: BLE001
        return None


def to_meta(example_inputs: Any) -> Any:
    """The same inputs as meta tensors (shapes and dtypes kept)."""
    return as_inputs(example_inputs).to("meta")

