"""Example inputs: normalise what users pass, move it, and run a model with readable errors."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim._utils import model_device
from torchslim.errors import InputShapeError, ModelRunError, SpecError, type_error

__all__ = ["Inputs", "as_inputs", "call_model", "remembered_inputs"]


@dataclass(frozen=True)
class Inputs:
    """Positional and keyword example inputs for one forward call."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor among the inputs, in order."""
        leaves = torch.utils._pytree.tree_leaves((self.args, self.kwargs))
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    def to(self, device: torch.device | str) -> Inputs:
        """A copy with every tensor moved to ``device``."""

        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) else x

        args, kwargs = torch.utils._pytree.tree_map(move, (self.args, self.kwargs))
        return Inputs(tuple(args), dict(kwargs))

    def describe(self) -> str:
        """Shapes as a short string, e.g. ``[1, 3, 224, 224]``."""
        parts = [list(t.shape) for t in self.tensors()]
        return ", ".join(str(p) for p in parts) if parts else "no tensors"

    @property
    def batch_size(self) -> int:
        """Leading dimension of the first tensor (1 when there is none)."""
        ts = self.tensors()
        return int(ts[0].shape[0]) if ts and ts[0].dim() > 0 else 1


def as_inputs(example_inputs: Any) -> Inputs:
    """Normalise a tensor, a tuple/list of inputs, a dict of keyword inputs, or :class:`Inputs`.

    Raises:
        TypeError: (a ``TorchslimError``) for anything else.
    """
    if isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return Inputs((example_inputs,))
    if isinstance(example_inputs, Mapping):
        return Inputs((), dict(example_inputs))
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return Inputs(tuple(example_inputs))
    raise type_error("example_inputs", example_inputs, "a Tensor, a tuple/list of inputs or a dict of keyword inputs")


def remembered_inputs(model: nn.Module) -> Inputs:
    """The example inputs a model remembers (``ts.create_model`` records them), on its device.

    The record (``model._torchslim``, see ``torchslim._modelinfo``) sits above the graph, so it is
    read here by its one attribute, ``example`` (an :class:`Inputs`), without importing it.

    Raises:
        SpecError: the model remembers no example inputs; pass them explicitly.
    """
    example = getattr(model.__dict__.get("_torchslim"), "example", None)
    if not isinstance(example, Inputs) or not (example.args or example.kwargs):
        raise SpecError(
            f"{type(model).__name__} does not remember example inputs: build it with ts.create_model(spec) "
            "or pass example_inputs explicitly"
        )
    return example.to(model_device(model))


# Messages PyTorch raises when a tensor's shape does not fit a layer.
_SHAPE_PATTERNS = re.compile(
    r"shapes cannot be multiplied|size mismatch|expected input\[|to have \d+ channels|"
    r"must match the size|Expected .*dimension|Expected \d+D|expected \d+D|input size|"
    r"Calculated padded input size|Output size is too small|Kernel size can't be greater|"
    r"not enough values|index out of range|out of bounds|doesn't match the broadcast shape|"
    r"shape .\[.*\]. is invalid|Expected size|Sizes of tensors must match|dimension specified as|Dimension out of range",
    re.IGNORECASE,
)


def call_model(model: nn.Module, inputs: Inputs, where: list[str] | None = None) -> Any:
    """Run ``model`` on ``inputs``; turn an exception from its forward into a torchslim error.

    Args:
        model: the module to run.
        inputs: normalised inputs.
        where: an optional module-path stack kept by a tracer; its innermost entry at the
            moment of failure is named in the message.

    Raises:
        InputShapeError: the forward failed in a way that says the inputs do not fit.
        ModelRunError: the forward raised anything else.
    """
    try:
        return model(*inputs.args, **inputs.kwargs)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # the user's forward may raise anything
        place = ""
        if where:
            name = where[-1] or "(top level)"
            place = f" in module '{name}'"
        first_line = (str(exc).strip().splitlines() or [""])[0]
        detail = f"{type(exc).__name__}: {first_line}"
        if _SHAPE_PATTERNS.search(str(exc)):
            try:
                own = remembered_inputs(model)
            except SpecError:
                own = None
            hint = ("pass inputs of the shape the model expects (CLI: --input-shape N,C,H,W)" if own is None
                    or own.describe() == inputs.describe() else f"the model's own example inputs are {own.describe()}")
            raise InputShapeError(
                f"example inputs of shape {inputs.describe()} do not fit the model{place}: {detail}; {hint}"
            ) from exc
        raise ModelRunError(f"the model's forward raised{place} on inputs {inputs.describe()}: {detail}") from exc
