"""Third-party output around every CLI verb (``torchslim.cli.main`` wraps each in
:func:`third_party_output`).

Warnings and log records of other libraries (ONNX Runtime's quantization advice on the root
logger, torch's ``W1206 ... cpp_extension.py`` and pytree notices, the ONNX exporter's
``UserWarning``) are caught. Those known to be harmless (:data:`HARMLESS`) are dropped, any other
becomes one ``note:`` line after the verb's output; ``--verbose`` lets everything through as the
libraries print it. torchslim's own warnings and loggers are never caught. C++ prints to file
descriptor 2 are caught where the native runtime is called (``torchslim._utils.quiet_native_stderr``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

__all__ = ["HARMLESS", "third_party_output"]


#: Third-party messages known to say nothing a torchslim user can act on (substrings): dropped
#: unless ``--verbose``. ONNX Runtime's quantizer advises shape-inference pre-processing that
#: torchslim's exporter already does; torch says once that CUDA_HOME exists without a CUDA runtime;
#: torch's pytree notes an Enum registration of torchao's; the ONNX exporter names dynamic axes it
#: does not use; torch.ao's eager quantization announces its own deprecation.
HARMLESS = (
    "Please consider to run pre-processing before quantization",
    "Please consider pre-processing before quantization",
    "No CUDA runtime is found",
    "is an Enum subclass and is now natively supported",
    "will not be used, since it shares the same shape",
    "The axis name:",
    "torch.ao.quantization is deprecated",
)

#: warning categories of other libraries that are advice to their own callers, not to the user
_QUIET_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)

class _Caught:
    """What :func:`third_party_output` caught: ``(source, message)`` in arrival order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, bool]] = []  # (source, message, quiet category)

    def add(self, source: str, message: str, quiet: bool = False) -> None:
        self.items.append((source, message, quiet))

    def notes(self) -> list[str]:
        """One line per distinct message worth reading (the harmless ones dropped)."""
        seen, lines = set(), []
        for source, message, quiet in self.items:
            if quiet or any(h in message for h in HARMLESS):
                continue
            first = " ".join((message.strip().splitlines() or [""])[0].split())
            if len(first) > 160:
                first = first[:157] + "..."
            line = f"note: {source} says: {first}"
            if first and line not in seen:
                seen.add(line)
                lines.append(line)
        return lines


class _Divert(logging.Filter):
    def __init__(self, caught: _Caught) -> None:
        super().__init__()
        self.caught = caught

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torchslim" or record.name.startswith("torchslim."):
            return True  # torchslim's own records are for the user
        try:
            message = record.getMessage()
        except Exception:  # a library's malformed record: keep its format string
            message = str(record.msg)
        self.caught.add(record.name.split(".")[0], message)
        return False


class _RootCatch(logging.Handler):
    """On the root logger: other libraries' records are caught; torchslim's own are printed as
    logging's last resort prints them (``echo``: only where the root logger had no handler)."""

    def __init__(self, caught: _Caught, echo: bool) -> None:
        super().__init__(logging.WARNING)
        self.caught, self.echo = caught, echo
        self.divert = _Divert(caught)

    def emit(self, record: logging.LogRecord) -> None:
        if self.divert.filter(record) and self.echo:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                sys.stderr.write(record.getMessage() + "\n")


def _warning_origin() -> str:
    """The module whose code called ``warnings.warn`` (read from the stack, as a library's
    ``stacklevel`` may attribute its own warning to torchslim's line that called it)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") == "warnings":
        frame = frame.f_back
    return "" if frame is None else str(frame.f_globals.get("__name__", ""))


def _to_stderr(handler: logging.Handler) -> bool:
    """A handler that writes to the console's stderr: a ``StreamHandler`` on it, or one (torch's
    ``_StderrHandler``) whose ``stream`` follows ``sys.stderr``."""
    if isinstance(handler, logging.FileHandler):
        return False
    try:
        stream = getattr(handler, "stream", None)
    except Exception:  # a property that fails: not a console handler we know
        return False
    return stream is sys.stderr or stream is sys.__stderr__ or getattr(stream, "name", None) == "<stderr>"


@contextlib.contextmanager
def third_party_output(verbose: bool = False) -> Iterator[_Caught]:
    """Catch other libraries' warnings and log records for the block (module doc, *Third-party output*).

    After the block, each caught message that is not known to be harmless is written to stderr as
    one ``note:`` line. ``verbose=True`` catches nothing (and sets ``TORCHSLIM_VERBOSE`` for the
    block, so :func:`torchslim._utils.quiet_native_stderr` lets native prints through too).

    Example:
        >>> import io, contextlib, logging
        >>> err = io.StringIO()
        >>> with contextlib.redirect_stderr(err), third_party_output() as caught:
        ...     logging.getLogger("onnxruntime").warning("Please consider to run pre-processing before quantization.")
        ...     logging.getLogger("somelib").warning("weights contain NaN")
        >>> err.getvalue()
        'note: somelib says: weights contain NaN\\n'
    """
    caught = _Caught()
    if verbose:
        before = os.environ.get("TORCHSLIM_VERBOSE")
        os.environ["TORCHSLIM_VERBOSE"] = "1"
        try:
            yield caught
        finally:
            if before is None:
                os.environ.pop("TORCHSLIM_VERBOSE", None)
            else:
                os.environ["TORCHSLIM_VERBOSE"] = before
        return
    divert = _Divert(caught)
    root = logging.getLogger()
    # records of every library reach the root logger; with no handler there, logging's last resort
    # would print them (and ``logging.warning()`` would add basicConfig's ``WARNING:root:`` one)
    own = _RootCatch(caught, echo=not root.handlers)
    root.addHandler(own)
    loggers = [root, *(lg for lg in list(logging.root.manager.loggerDict.values()) if isinstance(lg, logging.Logger))]
    filtered = [h for lg in loggers for h in lg.handlers if h is not own and _to_stderr(h)]
    for h in filtered:
        h.addFilter(divert)

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        origin = _warning_origin()
        if origin == "torchslim" or origin.startswith("torchslim."):  # torchslim's own warning: as Python prints it
            shown(message, category, filename, lineno, file, line)
            return
        caught.add(origin.split(".")[0] or category.__name__, str(message), issubclass(category, _QUIET_CATEGORIES))

    try:
        with warnings.catch_warnings():
            shown = warnings.showwarning
            warnings.showwarning = show
            yield caught
    finally:
        for h in filtered:
            h.removeFilter(divert)
        root.removeHandler(own)
        notes = caught.notes()
        if notes:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                sys.stderr.write("\n".join(notes) + "\n")
                sys.stderr.flush()
