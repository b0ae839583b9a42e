r"""One module selector: ``modules=`` / ``skip=`` as exact names, globs or ``re:`` regexes.

Every verb that acts on some of a model's layers takes the same two arguments:

* ``modules``: the layers to act on (``None``: every layer of the kinds the verb handles);
* ``skip``: layers to leave alone, even if ``modules`` selects them.

A pattern is an exact module name (``"layer4.0.conv1"``), a glob (``"layer4.*"``, ``"*.fc?"``)
or a regular expression after ``re:`` (``"re:features\\.\\d+"``, matched in full); ``""`` is the
model itself (the ops its own ``forward`` calls). A pattern
that names a container also selects everything inside it: ``"layer4"`` selects
``"layer4.0.conv1"``. A pattern that selects no module of the model is refused before any work,
with the nearest module names as suggestions.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2)))
    >>> select_modules(model)
    ['0', '2.0', '2.1']
    >>> select_modules(model, modules=["2"], skip=["re:2\\.1"])
    ['2.0']
    >>> select_modules(model, skip=["2.3"])
    Traceback (most recent call last):
    ...
    torchslim.errors.ConfigError: skip: '2.3' selects no module of the model; did you mean '2.1'? (module names are like 0, 1, 2, 2.0, ...; patterns are exact names, globs or 're:REGEX')
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from torchslim.errors import ConfigError

__all__ = [
    "DEFAULT_KINDS",
    "Selector",
    "as_patterns",
    "check_patterns",
    "first_match",
    "matches",
    "renamed_argument",
    "select_modules",
]

DEFAULT_KINDS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
HINT = "patterns are exact names, globs or 're:REGEX'"
V = TypeVar("V")


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"module pattern {pattern!r} is not a valid regular expression: {exc}") from None
    else:
        rx = re.compile(fnmatch.translate(pattern))
    return lambda name: rx.fullmatch(name) is not None


def _check_one(pattern: Any, field: str) -> str:
    if not isinstance(pattern, str):
        raise ConfigError(f"{field}: module patterns must be strings ({HINT}); got {pattern!r}")
    try:
        _compile(pattern)
    except ConfigError as exc:
        raise ConfigError(f"{field}: {exc}") from None
    return pattern


def as_patterns(value: Any, field: str = "modules", *, none_ok: bool = True) -> tuple[str, ...] | None:
    """``value`` as a tuple of checked patterns (a single string is one pattern; ``None`` stays).

    Raises:
        ConfigError: not a string or a list of non-empty strings, or a regex that does not compile.
    """
    if value is None:
        if none_ok:
            return None
        raise ConfigError(f"{field} must be a list of module patterns ({HINT}); got None")
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise ConfigError(f"{field} must be a list of module patterns ({HINT}); got {value!r}")
    return tuple(_check_one(p, field) for p in value)


def matches(name: str, pattern: str) -> bool:
    """Whether ``pattern`` selects the module ``name``: the name itself or one of its parents.

    Example:
        >>> matches("layer4.0.conv1", "layer4"), matches("layer4.0.conv1", "layer4.*.conv?")
        (True, True)
        >>> matches("layer40.conv", "layer4"), matches("fc", "re:f.")
        (False, True)
    """
    if not pattern.startswith("re:") and not any(c in pattern for c in "*?["):  # an exact name: no regex
        return name == pattern or name.startswith(pattern + ".")
    test = _compile(pattern)
    if test(name):
        return True
    parts = name.split(".")
    return any(test(".".join(parts[:i])) for i in range(1, len(parts)))


def first_match(name: str, mapping: Mapping[str, V]) -> str | None:
    """The first key of a pattern-keyed dict (``{"layer4.*": 0.7}``) that selects ``name``."""
    return next((p for p in mapping if matches(name, p)), None)


def check_patterns(patterns: Iterable[str] | None, names: Iterable[str], field: str = "modules") -> None:
    """Refuse any pattern that selects none of ``names``, suggesting the nearest names.

    Raises:
        ConfigError: names the field and the pattern, with a close match and a few known names.
    """
    if not patterns:
        return
    names = [n for n in names if n]
    for p in patterns:
        _check_one(p, field)
        if p == "" or any(matches(n, p) for n in names):  # "": the model itself (ops of its own forward)
            continue
        close = difflib.get_close_matches(p.removeprefix("re:"), names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ConfigError(
            f"{field}: {p!r} selects no module of the model{hint} (module names are like {shown or 'none'}; {HINT})"
        )


@dataclass(frozen=True)
class Selector:
    """A checked ``modules`` / ``skip`` pair; call it on a module name.

    Example:
        >>> s = Selector(modules=("features.*",), skip=("features.0",))
        >>> s("features.3"), s("features.0"), s("classifier.1")
        (True, False, False)
    """

    modules: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", as_patterns(self.modules, "modules"))
        object.__setattr__(self, "skip", as_patterns(self.skip, "skip", none_ok=False) if self.skip is not None else ())

    def __call__(self, name: str) -> bool:
        if self.modules is not None and not any(matches(name, p) for p in self.modules):
            return False
        return not any(matches(name, p) for p in self.skip)

    def check(self, names: Iterable[str], *, modules_field: str = "modules", skip_field: str = "skip") -> None:
        """Refuse a pattern that selects none of ``names`` (see :func:`check_patterns`)."""
        names = list(names)
        check_patterns(self.modules, names, modules_field)
        check_patterns(self.skip, names, skip_field)


def select_modules(
    model: nn.Module,
    modules: Iterable[str] | str | None = None,
    skip: Iterable[str] | str | None = None,
    *,
    kinds: tuple[type[nn.Module], ...] | None = DEFAULT_KINDS,
    modules_field: str = "modules",
    skip_field: str = "skip",
) -> list[str]:
    """Names of the modules of ``model`` that ``modules`` / ``skip`` select, in model order.

    Args:
        model: the model whose ``named_modules()`` are searched.
        modules: names, globs or ``re:`` patterns to act on; ``None``: every module of ``kinds``.
        skip: names, globs or ``re:`` patterns to leave alone.
        kinds: module types that count (``None``: every module but the root).
        modules_field, skip_field: the parameter names used in error messages.

    Returns:
        the selected names, in the order of ``model.named_modules()``.

    Raises:
        ConfigError: a pattern that is not a string, a regex that does not compile, or a
            pattern that selects no module of ``model`` (with the nearest names). Nothing
            about ``model`` is changed.
    """
    sel = Selector(as_patterns(modules, modules_field), as_patterns(skip, skip_field) or ())
    named = [(n, m) for n, m in model.named_modules() if n]
    sel.check((n for n, _ in named), modules_field=modules_field, skip_field=skip_field)
    return [n for n, m in named if (kinds is None or isinstance(m, kinds)) and sel(n)]


def renamed_argument(new: Any, old: Any, *, old_name: str, new_name: str, where: str, default: Any = None,
                     label: str | None = None, stacklevel: int = 3) -> Any:
    """Resolve a renamed keyword: warn when the old one is used; refuse both at once.

    ``new`` is the value of the new keyword (``default`` when not given), ``old`` that of the
    old one (``None`` when not given). ``label`` names the deprecated thing in the warning
    (default ``"<where>: <old_name>="``; a config field says ``"Config.old"``).

    Raises:
        ConfigError: both keywords were given.
    """
    if old is None:
        return new
    if new is not default and new != default:
        raise ConfigError(f"{where}: {old_name}= is the old name of {new_name}=; pass only {new_name}=")
    warnings.warn(
        f"{label or f'{where}: {old_name}='} is deprecated, use {new_name}= (same meaning); {old_name}= goes in the "
        "next release",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return old
