"""What every frozen config dataclass shares: a JSON round trip that validates its keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from torchslim.errors import ConfigError

__all__ = ["ConfigDict"]

C = TypeVar("C", bound="ConfigDict")


class ConfigDict:
    """Mixin for frozen config dataclasses: ``to_dict()`` / ``from_dict()``.

    Fields named in ``_tuple_fields`` hold tuples (module names, globs); JSON has only lists, so
    they are written as lists and turned back into tuples on the way in.
    """

    _tuple_fields: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        for key in self._tuple_fields:
            value = getattr(self, key)
            d[key] = list(value) if value is not None else None
        return d

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Build a config from a dict such as :meth:`to_dict` returns.

        Raises:
            ConfigError: not a mapping, unknown keys, or invalid values.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict needs a mapping; got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known: {', '.join(names)}")
        kwargs = dict(values)
        for key in cls._tuple_fields:
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)
