"""Rich renderables that also print as plain text.

Every ``.table()`` of the public API returns a :class:`Printable`: ``print(p.table())`` and
``str(p.table())`` give a plain-text table (no colour codes, as wide as the terminal or 120
columns), and ``rich.console.Console().print(p.table())`` renders it with rich as before. The
wrapped object's public attributes stay reachable (``t.row_count``, ``t.title``, ``t.columns``).
"""

from __future__ import annotations

import io
import shutil
import sys
from typing import Any

__all__ = ["Printable", "printable", "render_text"]

DEFAULT_WIDTH = 120


def _width() -> int:
    """The terminal's width when stdout is one, else :data:`DEFAULT_WIDTH`."""
    try:
        if sys.stdout is not None and sys.stdout.isatty():
            return max(shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns, 40)
    except (AttributeError, ValueError, OSError):
        pass
    return DEFAULT_WIDTH


def render_text(renderable: Any, width: int | None = None) -> str:
    """``renderable`` drawn by rich as plain text: no colour or style codes, trailing spaces cut.

    Example:
        >>> from rich.table import Table
        >>> t = Table("a", "b")
        >>> t.add_row("1", "2")
        >>> "a" in render_text(t) and "\\x1b" not in render_text(t)
        True
    """
    from rich.console import Console

    buf = io.StringIO()
    console = Console(
        file=buf,
        width=width or _width(),
        color_system=None,
        force_terminal=False,
        force_jupyter=False,
        force_interactive=False,
        no_color=True,
        highlight=False,
        emoji=False,
        legacy_windows=False,
        soft_wrap=False,
    )
    console.print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().rstrip("\n").split("\n"))


class Printable:
    """A rich renderable (a ``Table``, a ``Group``...) that prints as plain text.

    ``__rich__`` hands rich the wrapped object, so consoles, groups and layouts render it as
    before; ``__str__`` (hence ``print``) renders it to text; public attributes are read from the
    wrapped object.

    Example:
        >>> from rich.table import Table
        >>> t = Table("layer", "params", title="Layers")
        >>> t.add_row("fc", "10")
        >>> p = Printable(t)
        >>> print(p)  # doctest: +NORMALIZE_WHITESPACE
              Layers
        ┏━━━━━━━┳━━━━━━━━┓
        ┃ layer ┃ params ┃
        ┡━━━━━━━╇━━━━━━━━┩
        │ fc    │ 10     │
        └───────┴────────┘
        >>> p.row_count
        1
    """

    __slots__ = ("renderable",)

    def __init__(self, renderable: Any) -> None:
        object.__setattr__(self, "renderable", renderable.renderable if isinstance(renderable, Printable) else renderable)

    def __rich__(self) -> Any:
        return self.renderable

    def __str__(self) -> str:
        return render_text(self.renderable)

    def __repr__(self) -> str:
        return str(self)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __getattr__(self, name: str) -> Any:
        # only public names: dunder lookups (copy, pickle, rich's protocol checks) stay on this class
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "renderable"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "renderable":
            object.__setattr__(self, name, value)
        else:
            setattr(self.renderable, name, value)

    def __getstate__(self) -> Any:
        return self.renderable

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "renderable", state)


def printable(renderable: Any) -> Printable:
    """Wrap ``renderable`` in a :class:`Printable` (once: a ``Printable`` is returned as it is)."""
    return renderable if isinstance(renderable, Printable) else Printable(renderable)
