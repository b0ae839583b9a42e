"""Small helpers shared by every family."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

__all__ = ["evaluating", "model_device", "num_threads", "atomic_path", "is_int", "is_number"]


@contextlib.contextmanager
def evaluating(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore every module's own mode after.

    Restores even when the block raises, module by module (a model may mix modes on purpose,
    e.g. frozen BatchNorm inside a training model).
    """
    if not enabled:
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` torch intra-op threads and restore the previous count after.

    ``None`` keeps the current setting. Yields the thread count in force inside the block.

    Raises:
        ConfigError: ``n`` is not an integer >= 1.

    Example:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with num_threads(1) as n:
        ...     n, torch.get_num_threads()
        (1, 1)
        >>> torch.get_num_threads() == before
        True
    """
    if n is not None and (not is_int(n) or n < 1):
        from torchslim.errors import ConfigError

        raise ConfigError(f"threads must be an integer >= 1 or None; got {n!r}")
    saved = torch.get_num_threads()
    if n is None or n == saved:
        yield saved
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(saved)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and directories: nothing half-written is ever left at ``path``.
    """
    import shutil

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
