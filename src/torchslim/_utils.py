"""Small helpers shared by every family."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torchslim._fs import atomic_path  # the one place files are published (kept here for callers)

__all__ = [
    "atomic_path",
    "evaluating",
    "is_int",
    "is_number",
    "logits_of",
    "mode",
    "model_device",
    "num_threads",
    "quiet_native_stderr",
    "saved_modes",
    "training",
]


def saved_modes(model: nn.Module) -> Callable[[], None]:
    """Remember every module's train/eval flag; the returned function puts them all back.

    Module by module, unlike ``model.train(was)``, which would overwrite a mode a submodule
    holds on purpose (a frozen BatchNorm inside a training model). For code whose restore point
    is not one block; elsewhere use :func:`mode`, :func:`evaluating` or :func:`training`.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = m[1].eval()
        >>> restore = saved_modes(m)
        >>> _ = m.train()
        >>> restore(); m.training, m[1].training
        (True, False)
    """
    modes = [(m, m.training) for m in model.modules()]

    def restore() -> None:
        for m, was in modes:
            m.training = was

    return restore


@contextlib.contextmanager
def mode(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    """``model.train(train)`` for the block; every module's own mode restored after, even on error."""
    restore = saved_modes(model)
    model.train(train)
    try:
        yield model
    finally:
        restore()


@contextlib.contextmanager
def evaluating(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore every module's own mode after.

    Restores even when the block raises, module by module (a model may mix modes on purpose,
    e.g. frozen BatchNorm inside a training model). With ``enabled=False`` nothing changes.
    """
    if not enabled:
        yield model
        return
    with mode(model, False):
        yield model


def training(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Put ``model`` in train mode for the block; every module's own mode restored after."""
    return mode(model, True)


def logits_of(outputs: Any, keys: tuple[str, ...] = ("logits",)) -> Any:
    """The logits tensor in a model's output.

    A tensor is returned as is; a tuple or list gives its first item; a mapping or an object
    (a Hugging Face ``ModelOutput``) gives the first of ``keys`` it holds as a tensor. Anything
    else is returned unchanged (the caller's loss then says what it got).

    Example:
        >>> t = torch.zeros(2, 3)
        >>> all(logits_of(o) is t for o in (t, (t, None), {"logits": t}))
        True
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, (tuple, list)):
        return outputs[0] if outputs else outputs
    for key in keys:
        value = outputs.get(key) if isinstance(outputs, Mapping) else getattr(outputs, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return outputs


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


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class NativeOutput:
    """What :func:`quiet_native_stderr` caught: ``text`` is filled in when the block ends."""

    __slots__ = ("text",)

    def __init__(self) -> None:
        self.text = ""

    def lines(self) -> list[str]:
        """The caught text, one entry per non-empty line."""
        return [line for line in self.text.splitlines() if line.strip()]


@contextlib.contextmanager
def quiet_native_stderr(*, replay: bool | None = None) -> Iterator[NativeOutput]:
    """Catch what native (C/C++) code writes to file descriptor 2 during the block.

    Python's ``sys.stderr`` can be swapped, but a C++ library such as the ExecuTorch runtime
    (``[threadpool.cpp:66] Resetting threadpool ...``, cpuinfo's ``Failed to open midr file``)
    writes to the descriptor itself. For the block, descriptor 2 points at a scratch file; after
    it, the old descriptor is back and the caught text is in the yielded object's ``text``.
    Python-level writes to ``sys.stderr`` in the block are caught too when ``sys.stderr`` is the
    process's real stderr; a replaced ``sys.stderr`` (pytest's capture, a ``StringIO``) is left
    alone, and the block runs unchanged when the process has no descriptor 2.

    ``replay``: write the caught text back to stderr after the block (``None``: only when the
    environment variable ``TORCHSLIM_VERBOSE`` is set, which ``torchslim --verbose`` does). The
    text is also replayed when the block raises, since it may explain the error.

    Example:
        >>> import os
        >>> with quiet_native_stderr(replay=False) as caught:
        ...     _ = os.write(2, b"[threadpool.cpp:66] Resetting threadpool to 1 threads.\\n")
        >>> caught.lines()
        ['[threadpool.cpp:66] Resetting threadpool to 1 threads.']
    """
    caught = NativeOutput()
    if replay is None:
        replay = bool(os.environ.get("TORCHSLIM_VERBOSE"))
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (a daemon): nothing to catch
        yield caught
        return
    failed = False
    with tempfile.TemporaryFile() as sink:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield caught
        except BaseException:
            failed = True
            raise
        finally:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            caught.text = sink.read().decode("utf-8", "replace")
            if caught.text and (replay or failed):
                with contextlib.suppress(AttributeError, ValueError, OSError):
                    sys.stderr.write(caught.text)
                    sys.stderr.flush()
