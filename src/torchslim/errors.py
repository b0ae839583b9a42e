"""Errors raised by torchslim.

Every error torchslim raises on purpose derives from :class:`TorchslimError`, and each
subclass also derives from the matching built-in exception, so ``except ValueError`` keeps
working for callers that do not know torchslim.  The CLI turns any ``TorchslimError`` into
one readable line and exit code 2.

Messages follow one pattern: what was wrong, what was given, what is allowed (and the fix,
when there is one).
"""

from __future__ import annotations

__all__ = [
    "TorchslimError",
    "SpecError",
    "ConfigError",
    "InputShapeError",
    "ModelRunError",
    "UnsupportedOpError",
    "MissingDependencyError",
    "CheckpointError",
]


class TorchslimError(Exception):
    """Root of every error torchslim raises on purpose."""


class SpecError(TorchslimError, ValueError):
    """A model or data spec string could not be resolved."""


class ConfigError(TorchslimError, ValueError):
    """A configuration value is out of range or of the wrong kind."""


class InputShapeError(TorchslimError, ValueError):
    """Example inputs do not fit the model (wrong rank, channels or size)."""


class ModelRunError(TorchslimError, RuntimeError):
    """The model's own forward raised while torchslim ran it."""


class UnsupportedOpError(TorchslimError, NotImplementedError):
    """An operator has no rule in an analysis that must not guess."""


class MissingDependencyError(TorchslimError, ImportError):
    """An optional dependency is needed for this feature and is not installed."""


class CheckpointError(TorchslimError, ValueError):
    """A saved model or checkpoint is missing, truncated or of an unknown format."""


def type_error(name: str, value: object, allowed: str) -> TypeError:
    """Build a ``TypeError`` that is also a ``TorchslimError``."""
    return _TorchslimTypeError(f"{name} must be {allowed}, got {type(value).__name__}")


class _TorchslimTypeError(TorchslimError, TypeError):
    pass
