"""Feature taps: read intermediate outputs of named modules with forward hooks.

A tap name is a module name as ``model.named_modules()`` spells it (``"features.3"``,
``"encoder.layer.0"``), optionally followed by ``#k`` to keep item ``k`` of a tuple output
(``"layers.0.attn#1"`` is the attention-weights half of an ``nn.MultiheadAttention`` output).
Without ``#k`` a tuple output is tapped through its first item, an object output through its
``last_hidden_state`` / ``logits`` attribute when it has one.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with FeatureTaps(model, ["1"]) as taps:
    ...     _ = model(torch.zeros(3, 4))
    ...     taps["1"].shape
    torch.Size([3, 8])
    >>> len(model[1]._forward_hooks)  # removed on exit
    0
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from torchslim._utils import logits_of
from torchslim.errors import ConfigError

__all__ = ["FeatureTaps", "parse_tap", "resolve_taps"]


def parse_tap(name: str) -> tuple[str, int | None]:
    """Split ``"module#k"`` into ``("module", k)``; plain names give ``(name, None)``.

    Raises:
        ConfigError: ``name`` is not a string or its ``#k`` part is not an integer.
    """
    if not isinstance(name, str):
        raise ConfigError(f"a tap name must be a module name string; got {type(name).__name__} {name!r}")
    module, sep, index = name.partition("#")
    if not sep:
        return name, None
    if not index.isdigit():
        raise ConfigError(f"tap {name!r}: the part after '#' must be a tuple index such as '#1'; got {index!r}")
    return module, int(index)


def resolve_taps(model: nn.Module, names: Iterable[str], role: str = "model") -> dict[str, nn.Module]:
    """Map every tap name to its module, or fail naming the module and its closest real names.

    Args:
        model: The model to look in.
        names: Tap names (``"module"`` or ``"module#k"``).
        role: How error messages call the model (``"student"``, ``"teacher"``).

    Raises:
        ConfigError: A name that is not a submodule of ``model``; the message lists close matches.
    """
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for name in names:
        module_name, _ = parse_tap(name)
        if module_name not in modules or module_name == "":
            known = [n for n in modules if n]
            near = difflib.get_close_matches(module_name, known, n=3, cutoff=0.5)
            hint = f"; close matches: {', '.join(near)}" if near else ""
            listing = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
            raise ConfigError(
                f"{role} ({type(model).__name__}) has no module named {module_name!r}{hint} "
                f"(its modules: {listing or 'none'})"
            )
        found[name] = modules[module_name]
    return found


def _select(output: Any, index: int | None, name: str) -> torch.Tensor:
    if index is not None:
        if not isinstance(output, (tuple, list)) or index >= len(output):
            raise ConfigError(
                f"tap {name!r} asks for item {index} of the module's output, but it returned "
                f"{type(output).__name__}" + (f" of length {len(output)}" if isinstance(output, (tuple, list)) else "")
            )
        output = output[index]
    else:
        output = logits_of(output, keys=("last_hidden_state", "logits"))
    if not isinstance(output, torch.Tensor):
        raise ConfigError(f"tap {name!r} captured {type(output).__name__}, not a tensor; pick a module that returns one")
    return output


class FeatureTaps:
    """Context manager that records the outputs of named modules on every forward.

    Hooks are registered on ``__enter__`` and removed on ``__exit__``, also when the block
    raises. Values are kept as produced (with their autograd graph) unless ``detach`` is set;
    each forward overwrites the previous values.

    Args:
        model: The model to tap.
        names: Tap names (see the module docstring); checked when the taps are built.
        role: How error messages call the model.
        detach: Store detached tensors (for a frozen teacher).

    Raises:
        ConfigError: An unknown module name (the message lists close matches).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, role: str = "model", detach: bool = False):
        self.names = list(dict.fromkeys(names))
        self.modules_ = resolve_taps(model, self.names, role)
        self.detach = detach
        self.values_: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str, index: int | None):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            value = _select(output, index, name)
            self.values_[name] = value.detach() if self.detach else value

        return hook

    def __enter__(self) -> FeatureTaps:
        try:
            for name, module in self.modules_.items():
                self._handles.append(module.register_forward_hook(self._hook(name, parse_tap(name)[1])))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook and forget the recorded values (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.values_.clear()

    def clear(self) -> None:
        """Forget the recorded values (the hooks stay)."""
        self.values_.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.values_:
            raise ConfigError(
                f"tap {name!r} recorded nothing: the module did not run in the last forward "
                f"(taps: {', '.join(self.names)})"
            )
        return self.values_[name]

    def collect(self) -> list[torch.Tensor]:
        """The recorded values in the order of :attr:`names`."""
        return [self[name] for name in self.names]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)
