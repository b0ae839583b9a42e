"""Module selection in recipes: exact names, globs (``layer4.*``) and regexes (``re:^features\\.\\d+$``)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from torchslim.errors import ConfigError

__all__ = ["match_modules", "expand_patterns", "expand_keys", "resolve_config"]

def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def match_modules(model: nn.Module, pattern: str) -> list[str]:
    """Names of the modules of ``model`` that ``pattern`` selects (exact, glob or ``re:``)."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"module pattern {pattern!r} is not a valid regular expression: {exc}") from None
    return [name for name, _ in model.named_modules() if name and _matches(pattern, name)]


def expand_patterns(model: nn.Module, patterns: Iterable[str], field: str) -> list[str]:
    """Exact module names for a list of patterns; a pattern that selects nothing is an error."""
    names: list[str] = []
    for p in patterns:
        found = match_modules(model, p)
        if not found:
            raise ConfigError(f"field {field!r}: pattern {p!r} selects no module of the model "
                              f"(names are like {_examples(model)}; use exact names, globs or 're:REGEX')")
        names.extend(n for n in found if n not in names)
    return names


def expand_keys(model: nn.Module, mapping: Mapping[str, Any], field: str) -> dict[str, Any]:
    """A pattern-keyed dict with exact module names as keys (earlier patterns win on overlaps)."""
    out: dict[str, Any] = {}
    for p, value in mapping.items():
        for name in expand_patterns(model, [p], field):
            out.setdefault(name, value)
    return out


def resolve_config(model: nn.Module, kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every module pattern replaced by the exact names it selects in ``model``
    (the fields holding patterns are the stage kind's ``patterns``)."""
    from torchslim.recipe.schema import stage_kinds

    cfg = dict(config)
    for f in stage_kinds()[kind].patterns:
        value = cfg.get(f)
        if not value:
            continue
        cfg[f] = expand_keys(model, value, f) if isinstance(value, Mapping) else expand_patterns(model, value, f)
    return cfg


def _examples(model: nn.Module, n: int = 4) -> str:
    names = [name for name, m in model.named_modules() if name and not list(m.children())]
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
