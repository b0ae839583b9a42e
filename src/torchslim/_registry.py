"""One registry of everything torchslim can be asked for by name.

Every family fills it when its package is imported (the package's ``__init__`` imports its
modules, and each module registers what it defines), so a new method, plan kind, export format,
recipe stage or CLI verb is one decorated object in one file::

    @register("method", "prune.importance.l1", family="prune.importance", description="sum of |w|")
    class L1Importance: ...

Kinds (:data:`KINDS`):

    method         strategy objects of a family: importance criteria, observers, rank selectors,
                   losses, ... (``register_method`` / ``get_method`` / ``ts.list_methods``)
    plan           how to replay a saved plan on a rebuilt model (``_modelinfo.register_plan_kind``)
    export_format  writers of ``ts.export``
    recipe_stage   stages a recipe may name
    cli_verb       ``torchslim VERB`` parsers (each ``*/_cli.py`` registers its own)
    model          model spec resolvers (``zoo:``, ``torchvision:``, a saved directory, ...)
    dataset        data spec resolvers (``mnist``, ``synthetic:SHAPE``, ``file.py:factory``, ...)
    finalizer      what makes a family's reversible edits permanent (``ts.finalize_``): a function
                   ``(model) -> result``, or None when nothing of its kind is on the model
    compiler       how a family's layers run under ``torch.compile`` (``_compile.compile_model``):
                   a function ``(model, **compile_kwargs) -> compiled callable`` with meta
                   ``takes=(model) -> bool`` (static int8 layers -> oneDNN int8 kernels)

A lookup first makes sure every family is registered by importing the package once (the root
imports every family), so callers never keep tables of module names.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from torchslim.errors import ConfigError

__all__ = [
    "KINDS",
    "Entry",
    "register",
    "unregister",
    "import_modules",
    "lookup",
    "entries",
    "MethodEntry",
    "register_method",
    "get_method",
    "list_methods",
]

T = TypeVar("T")

KINDS: tuple[str, ...] = (
    "method", "plan", "export_format", "recipe_stage", "cli_verb", "model", "dataset", "finalizer",
    "compiler",
)
_LABEL = {
    "method": "method",
    "plan": "plan kind",
    "export_format": "export format",
    "recipe_stage": "recipe stage",
    "cli_verb": "CLI verb",
    "model": "model spec kind",
    "dataset": "data set",
    "finalizer": "finalizer",
    "compiler": "compiler",
}


@dataclass(frozen=True)
class Entry:
    """One registered object: ``kind`` and ``name`` identify it (names are unique per kind)."""

    kind: str
    name: str
    obj: Any
    family: str = ""
    description: str = ""
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def short_name(self) -> str:
        """The name without its family prefix (``'l1'`` for ``'prune.importance.l1'``)."""
        prefix = self.family + "."
        return self.name[len(prefix):] if self.family and self.name.startswith(prefix) else self.name


MethodEntry = Entry  # the old name of an entry of kind "method"

_ENTRIES: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_loaded = False


def _check_kind(kind: str) -> None:
    if kind not in _ENTRIES:
        raise ConfigError(f"unknown registry kind {kind!r}; allowed: {', '.join(KINDS)}")


def _same(a: Any, b: Any) -> bool:
    """The same object, or the same definition imported again (a module reloaded)."""
    if a is b:
        return True
    qa = (getattr(a, "__module__", None), getattr(a, "__qualname__", None))
    return qa[1] is not None and qa == (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def register(
    kind: str,
    name: str,
    obj: Any = None,
    *,
    family: str = "",
    description: str = "",
    replace: bool = False,
    **meta: Any,
) -> Any:
    """Register ``obj`` as ``name`` of ``kind``; without ``obj`` returns a decorator.

    Args:
        kind: one of :data:`KINDS`.
        name: unique within ``kind``.
        obj: the object (class, function, resolver, ...); omitted, ``register`` decorates.
        family: the family or group it belongs to (``"prune"``, ``"prune.importance"``, ...).
        description: one line; defaults to the first line of ``obj``'s docstring.
        replace: replace an existing entry of that name instead of refusing it.
        **meta: anything the kind's users read (e.g. a CLI verb's ``order``).

    Returns:
        ``obj`` itself (so ``register`` works as a decorator).

    Raises:
        ConfigError: an unknown kind, or ``name`` already registered (and ``replace`` not set).

    Example:
        >>> from torchslim._registry import lookup
        >>> entry = lookup("method", "prune.importance.l1")  # registered by ``@register_method``
        >>> entry.family, entry.short_name
        ('prune.importance', 'l1')
    """
    _check_kind(kind)

    def deco(target: T) -> T:
        table = _ENTRIES[kind]
        old = table.get(name)
        if old is not None and not replace and not _same(old.obj, target):
            raise ConfigError(
                f"{_LABEL[kind]} {name!r} is already registered (by {_where(old.obj)}); "
                f"pick another name or pass replace=True"
            )
        doc = description or (getattr(target, "__doc__", None) or "").strip().split("\n")[0]
        table[name] = Entry(kind, name, target, family, doc, MappingProxyType(dict(meta)))
        return target

    return deco if obj is None else deco(obj)


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _ensure_loaded() -> None:
    """Import the package once: its root imports every family, and every family registers itself."""
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module("torchslim")


def _unknown(kind: str, name: str, known: list[str], what: str | None = None) -> ConfigError:
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"unknown {what or _LABEL[kind]} {name!r}{hint} (known: {', '.join(known) or 'none'})")


def import_modules(package: str, path: Any) -> list[str]:
    """Import every public module of ``package`` (its ``__path__`` is ``path``): called at the end
    of a family's ``__init__``, so a new file that registers a method is found without editing
    any other file. Private modules (``_x.py``) are imported by whoever uses them."""
    import pkgutil

    names = sorted(m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


def unregister(kind: str, name: str) -> Entry | None:
    """Remove ``name`` of ``kind`` and return its entry (None if it was not there): for tests and
    plug-ins that registered something for a while."""
    _check_kind(kind)
    return _ENTRIES[kind].pop(name, None)


def lookup(kind: str, name: str) -> Entry:
    """The entry registered as ``name`` of ``kind``.

    Raises:
        ConfigError: an unknown kind or name; the message suggests the closest known name and
            lists every known one.
    """
    _check_kind(kind)
    entry = _ENTRIES[kind].get(name)
    if entry is None:
        _ensure_loaded()
        entry = _ENTRIES[kind].get(name)
    if entry is None:
        raise _unknown(kind, name, sorted(_ENTRIES[kind]))
    return entry


def _in_family(entry: Entry, family: str | None) -> bool:
    return family is None or entry.family == family or entry.family.startswith(family + ".")


def entries(kind: str, family: str | None = None, pattern: str = "*") -> list[Entry]:
    """Every entry of ``kind`` (of ``family`` or its sub-families; names matching the glob
    ``pattern``), sorted by name."""
    _check_kind(kind)
    _ensure_loaded()
    return [
        e for _, e in sorted(_ENTRIES[kind].items())
        if _in_family(e, family) and fnmatch.fnmatch(e.name, pattern)
    ]


# ---- methods: the original API, kept -----------------------------------------------------------
def register_method(family: str, name: str, *, description: str = "", replace: bool = False) -> Callable[[T], T]:
    """Decorator: register ``obj`` as method ``name`` of ``family`` (e.g. ``'prune.importance'``).

    The entry is kind ``"method"`` named ``'family.name'``.
    """
    return register("method", f"{family}.{name}", family=family, description=description, replace=replace)


def get_method(family: str, name: str) -> Any:
    """The object registered as ``name`` in ``family``; a ``ConfigError`` lists the known names."""
    full = f"{family}.{name}"
    entry = _ENTRIES["method"].get(full)
    if entry is None:
        _ensure_loaded()
        entry = _ENTRIES["method"].get(full)
    if entry is None:
        known = sorted(e.short_name for e in _ENTRIES["method"].values() if e.family == family)
        raise _unknown("method", name, known, what=f"{family} method")
    return entry.obj


def list_methods(family: str | None = None, pattern: str = "*") -> list[str]:
    """``'family.name'`` of every registered method under ``family`` (all when None), sorted."""
    return [e.name for e in entries("method", family) if fnmatch.fnmatch(e.short_name, pattern)]
