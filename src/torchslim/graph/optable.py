"""Tables of ATen ops that the channel analysis and the cost model both read.

The channel analysis (``graph.rules``) unites the channels of an elementwise op's inputs; the
cost model (``profile``) counts one FLOP per output element of it. Both ask the same question,
"is this op elementwise?", and get the same answer here: PyTorch's ``Tag.pointwise`` (also for
in-place variants, which are not always tagged) plus the activations PyTorch leaves untagged
(:data:`ELEMENTWISE`).

Example:
    >>> import torch
    >>> from torchslim.graph.optable import is_pointwise
    >>> is_pointwise(torch.ops.aten.add.Tensor), is_pointwise(torch.ops.aten.gelu.default)
    (True, True)
    >>> is_pointwise(torch.ops.aten.mm.default)
    False
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ELEMENTWISE", "is_pointwise", "op_name"]

# Elementwise ops PyTorch does not tag as pointwise (activations, mostly), by ATen name.
ELEMENTWISE: frozenset[str] = frozenset({
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "silu", "silu_", "mish", "mish_",
    "gelu", "gelu_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "softplus", "hardtanh",
    "hardtanh_", "leaky_relu", "leaky_relu_", "rrelu", "threshold", "threshold_", "glu",
    "log_sigmoid_forward", "softshrink", "hardshrink", "prelu",
})


def op_name(func: Any) -> str:
    """An ATen op's name without namespace or overload: ``aten.add_.Tensor`` -> ``"add_"``."""
    return func._schema.name.split("::")[-1]


def is_pointwise(func: Any) -> bool:
    """Whether the ATen op (an ``OpOverload``) computes each output element from the input
    elements at the same position (broadcasting aside)."""
    name = op_name(func)
    if torch.Tag.pointwise in func.tags or name in ELEMENTWISE:
        return True
    if name.endswith("_") and func.namespace == "aten":  # in-place variants are not always tagged
        base = getattr(torch.ops.aten, name[:-1], None)
        overload = getattr(base, func._overloadname, None) or getattr(base, "default", None)
        return overload is not None and torch.Tag.pointwise in overload.tags
    return False
