"""``finalize_``: make every reversible edit on a model permanent, whatever family made it.

Families keep their edits reversible until the user says otherwise: pruning masks, shared-weight
codebooks and QAT fake-quant all sit on the model as parametrizations or observers. Each family
registers a *finalizer* (registry kind ``"finalizer"``): a function ``(model) -> result`` that
makes its own edits permanent, or returns None when the model has none of them. This module only
reads the registry, so it sits in the core layer and imports no family.

Example:
    >>> import torchslim as ts
    >>> m = ts.create_model("zoo:lenet300")
    >>> _ = ts.sparsify_(m, 0.5)
    >>> done = ts.finalize_(m)
    >>> list(done), round(done["masks"].overall, 2)
    (['masks'], 0.5)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from torchslim._registry import entries, lookup, register

__all__ = ["finalize_", "register_finalizer", "finalizers"]


def register_finalizer(name: str, fn: Callable[..., Any] | None = None, *, family: str = "", order: int = 50,
                       options: tuple[str, ...] = (), description: str = "") -> Any:
    """Register ``fn`` as the finalizer ``name`` (decorator without ``fn``).

    Args:
        name: what it finalizes (``"masks"``, ``"clusters"``, ``"qat"``); the key of its result.
        fn: ``(model) -> result``, or None when nothing of its kind is on the model.
        family: the family that registers it.
        order: lower runs first (freeze quantizers, then bake codebooks, then masks).
        options: keyword options of ``finalize_`` that ``fn`` takes (e.g. ``("storage",)``).
        description: one line (default: the first line of ``fn``'s docstring).
    """
    return register("finalizer", name, fn, family=family, description=description, order=order, options=options)


def _ordered() -> list[Any]:
    return sorted(entries("finalizer"), key=lambda e: (e.meta.get("order", 50), e.name))


def finalizers() -> list[str]:
    """Names of the registered finalizers, in the order ``finalize_`` runs them."""
    return [e.name for e in _ordered()]


def finalize_(model: nn.Module, kinds: Iterable[str] | None = None, *, storage: str = "auto") -> dict[str, Any]:
    """Make every reversible edit on ``model`` permanent, in place.

    Runs each registered finalizer in order: QAT fake-quant is frozen (``"qat"``), shared-weight
    codebooks become plain weights (``"clusters"``), pruning masks are baked in and the sparse
    weights stored compressed (``"masks"``; ``ts.prune.finalize_`` with its ``storage=``).

    Args:
        model: changed in place.
        kinds: only these finalizers (names from :func:`finalizers`); default: all of them.
        storage: how baked sparse weights are stored: ``"auto"`` (the smallest per tensor),
            ``"bitmask"``, ``"csr"`` or ``"dense"``.

    Returns:
        Finalizer name -> what it did, for those that found something to finalize (an empty dict:
        nothing on the model was reversible).

    Raises:
        ConfigError: an unknown name in ``kinds`` (the message names the known ones), or an
            unknown ``storage``.
    """
    chosen = _ordered()
    if kinds is not None:
        kinds = list(kinds)
        for k in kinds:
            lookup("finalizer", k)  # unknown: ConfigError with the nearest name
        chosen = [e for e in chosen if e.name in kinds]
    given = {"storage": storage}
    done: dict[str, Any] = {}
    for entry in chosen:
        result = entry.obj(model, **{k: given[k] for k in entry.meta.get("options", ())})
        if result is not None:
            done[entry.name] = result
    return done
