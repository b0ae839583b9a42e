"""What every frozen config dataclass shares: a JSON round trip that checks its keys, overrides
by field name, and the defaults the recipe schemas and CLI flags read.

A config is a ``@dataclass(frozen=True)`` that also derives from :class:`ConfigDict` and checks
its values in ``__post_init__`` (a :class:`~torchslim.errors.ConfigError` naming the field, the
value and what is allowed). ``ConfigDict`` then gives it:

* ``to_dict()``: JSON-ready (tuples become lists, nested configs nested dicts);
* ``from_dict()``: the way back, refusing unknown keys with the nearest field name;
* ``build(config, **overrides)``: how every verb reads ``verb_(model, config=None, **overrides)``;
* ``defaults()``: the field defaults, for recipe schemas and CLI flags.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class DemoConfig(ConfigDict):
    ...     ratio: float = 0.5
    ...     skip: tuple[str, ...] = ()
    >>> DemoConfig.from_dict({"ratio": 0.3, "skip": ["fc"]})
    DemoConfig(ratio=0.3, skip=('fc',))
    >>> DemoConfig.build(DemoConfig(ratio=0.3), skip=("fc",)).to_dict()
    {'ratio': 0.3, 'skip': ['fc']}
    >>> DemoConfig.build(None, rato=0.2)
    Traceback (most recent call last):
    ...
    torchslim.errors.ConfigError: unknown DemoConfig field 'rato' (did you mean 'ratio'?); known: ratio, skip
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from torchslim._select import renamed_argument
from torchslim.errors import ConfigError

__all__ = ["ConfigDict", "config_defaults", "did_you_mean", "jsonable"]

C = TypeVar("C", bound="ConfigDict")
_TUPLE = re.compile(r"^\s*(?:None\s*\|\s*)?tuple\b|\|\s*tuple\b")
_MISSING = dataclasses.MISSING


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, configs as dicts and other dataclasses as dicts (deep)."""
    if isinstance(value, ConfigDict):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def config_defaults(cls: type) -> dict[str, Any]:
    """Field name -> default value of a dataclass (``default_factory`` called; no default: omitted)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not _MISSING:
            out[f.name] = f.default
        elif f.default_factory is not _MISSING:
            out[f.name] = f.default_factory()
    return out


def did_you_mean(word: str, allowed: list[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``allowed`` to ``word``, or ``""``."""
    close = difflib.get_close_matches(word, allowed, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ConfigDict:
    """Mixin for frozen config dataclasses: ``to_dict()`` / ``from_dict()`` / ``build()``.

    Fields annotated as tuples (or named in ``_tuple_fields``) are written as JSON lists and
    turned back into tuples on the way in; a field annotated with another ``ConfigDict`` class
    is written nested and rebuilt with its ``from_dict``.
    """

    _tuple_fields: ClassVar[tuple[str, ...]] = ()
    # old field name -> new one: the old field (default None) still works for one release, with a
    # DeprecationWarning; it is moved into the new one, never written by to_dict, not in defaults()
    _renamed: ClassVar[dict[str, str]] = {}

    def _take_renamed(self) -> None:
        """Move values given under old field names to the new ones (call in ``__post_init__``)."""
        name = type(self).__name__
        for old, new in self._renamed.items():
            value = getattr(self, old)
            if value is None:
                continue
            value = renamed_argument(getattr(self, new), value, old_name=old, new_name=new, where=name,
                                     default=type(self).defaults().get(new), label=f"{name}.{old}", stacklevel=5)
            object.__setattr__(self, new, value)
            object.__setattr__(self, old, None)

    # ------------------------------------------------------------------ field facts
    @classmethod
    def field_names(cls) -> list[str]:
        """The config's field names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls._renamed]  # type: ignore[arg-type]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Field name -> default value (the one place defaults live; schemas and CLI flags read it)."""
        return {k: v for k, v in config_defaults(cls).items() if k not in cls._renamed}

    @classmethod
    def _tuple_names(cls) -> frozenset[str]:
        return _tuple_names(cls)

    @classmethod
    def _nested(cls) -> dict[str, type[ConfigDict]]:
        return _nested(cls)

    @classmethod
    def _check_keys(cls, keys: Any, what: str = "field") -> None:
        names = cls.field_names()
        for key in keys:
            if key not in names and key not in cls._renamed:
                raise ConfigError(f"unknown {cls.__name__} {what} {key!r}{did_you_mean(str(key), names)}; "
                                  f"known: {', '.join(names)}")

    # ------------------------------------------------------------------ the round trip
    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (tuples become lists, nested configs dicts)."""
        return {name: jsonable(getattr(self, name)) for name in self.field_names()}

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Build a config from a dict such as :meth:`to_dict` returns (missing keys keep defaults).

        Raises:
            ConfigError: not a mapping, unknown keys (with the nearest field name), or invalid values.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict needs a mapping; got {type(values).__name__}")
        cls._check_keys(values)
        kwargs = dict(values)
        for key in cls._tuple_names():
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        for key, sub in cls._nested().items():
            if isinstance(kwargs.get(key), Mapping):
                kwargs[key] = sub.from_dict(kwargs[key])
        return cls(**kwargs)

    # ------------------------------------------------------------------ the verb shape
    def replace(self: C, **overrides: Any) -> C:
        """A copy with some fields changed (checked like a new config).

        Raises:
            ConfigError: an unknown field name, or an invalid value.
        """
        type(self)._check_keys(overrides)
        return dataclasses.replace(self, **overrides)  # type: ignore[type-var]

    @classmethod
    def build(cls: type[C], config: Any = None, **overrides: Any) -> C:
        """The config a verb runs with: ``config`` (None, a config or a dict) with ``overrides``.

        ``build(None, bits=4) == cls(bits=4)``; ``build(cfg, bits=4) == cfg.replace(bits=4)``.

        Raises:
            ConfigError: ``config`` of another type, an unknown field, or an invalid value.
        """
        if config is None:
            return cls.from_dict(overrides)
        if isinstance(config, cls):
            return config.replace(**overrides) if overrides else config
        if isinstance(config, Mapping):
            cls._check_keys(overrides)
            return cls.from_dict({**config, **overrides})
        raise ConfigError(
            f"config must be a {cls.__name__}, a dict of its fields or None; got {type(config).__name__}"
        )


# facts read from a config class's annotations, worked out once per class (every verb call builds a config)
@functools.cache
def _tuple_names(cls: type[ConfigDict]) -> frozenset[str]:
    names = set(cls._tuple_fields)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if isinstance(f.type, str) and _TUPLE.search(f.type) and not f.type.lstrip().startswith("dict"):
            names.add(f.name)
    return frozenset(names)


@functools.cache
def _nested(cls: type[ConfigDict]) -> dict[str, type[ConfigDict]]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that names a type not importable here: no nesting known
        return {}
    out = {}
    for name in cls.field_names():
        hint = hints.get(name)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = typing.get_args(hint) if union else (hint,)
        for t in options:
            if isinstance(t, type) and issubclass(t, ConfigDict):
                out[name] = t
    return out
