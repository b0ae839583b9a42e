"""One registry of named methods per family, listable like timm's ``list_models``.

Families register their strategy objects (importance criteria, observers, rank selectors,
schedules, losses, ...) at import::

    @register_method("prune.importance", "l1", description="sum of |w| over the group")
    class L1Importance: ...

``ts.list_methods("prune")`` lists every name registered under ``prune`` or ``prune.*``.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torchslim.errors import ConfigError

__all__ = ["MethodEntry", "register_method", "get_method", "list_methods"]

T = TypeVar("T")

# family prefix -> modules whose import registers that family's methods
_FAMILY_MODULES: dict[str, tuple[str, ...]] = {
    "prune": ("torchslim.prune",),
    "quantize": ("torchslim.quantize",),
    "binarize": ("torchslim.binarize",),
    "distill": ("torchslim.distill",),
    "lowrank": ("torchslim.lowrank",),
    "pack": ("torchslim.pack",),
}


@dataclass(frozen=True)
class MethodEntry:
    family: str
    name: str
    obj: Any
    description: str = ""


_REGISTRY: dict[tuple[str, str], MethodEntry] = {}


def register_method(family: str, name: str, *, description: str = "") -> Callable[[T], T]:
    """Decorator: register ``obj`` as method ``name`` of ``family`` (e.g. ``'prune.importance'``)."""

    def deco(obj: T) -> T:
        _REGISTRY[(family, name)] = MethodEntry(family, name, obj, description or (obj.__doc__ or "").strip().split("\n")[0])
        return obj

    return deco


def _load(family: str | None) -> None:
    for prefix, modules in _FAMILY_MODULES.items():
        if family is None or family == prefix or family.startswith(prefix + "."):
            for m in modules:
                try:
                    importlib.import_module(m)
                except ModuleNotFoundError as exc:
                    if not (exc.name and m.startswith(exc.name)):
                        raise


def get_method(family: str, name: str) -> Any:
    """The object registered as ``name`` in ``family``; a ``ConfigError`` lists the known names."""
    _load(family)
    entry = _REGISTRY.get((family, name))
    if entry is None:
        known = sorted(n for f, n in _REGISTRY if f == family)
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown {family} method {name!r}{hint} (known: {', '.join(known) or 'none'})")
    return entry.obj


def list_methods(family: str | None = None, pattern: str = "*") -> list[str]:
    """``'family.name'`` of every registered method under ``family`` (all when None), sorted."""
    _load(family)
    out = []
    for (f, n) in _REGISTRY:
        if family is None or f == family or f.startswith(family + "."):
            if fnmatch.fnmatch(n, pattern):
                out.append(f"{f}.{n}")
    return sorted(out)
