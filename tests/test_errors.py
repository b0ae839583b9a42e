"""Errors: one root, and each subclass is also the matching built-in."""

from __future__ import annotations

import pytest

from torchslim import errors


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.SpecError, ValueError),
        (errors.ConfigError, ValueError),
        (errors.InputShapeError, ValueError),
        (errors.ModelRunError, RuntimeError),
        (errors.UnsupportedOpError, NotImplementedError),
        (errors.MissingDependencyError, ImportError),
        (errors.CheckpointError, ValueError),
    ],
)
def test_hierarchy(cls: type, builtin: type) -> None:
    assert issubclass(cls, errors.TorchslimError)
    assert issubclass(cls, builtin)


def test_type_error_helper() -> None:
    e = errors.type_error("ratio", "x", "a float in [0, 1)")
    assert isinstance(e, TypeError) and isinstance(e, errors.TorchslimError)
    assert "ratio must be a float in [0, 1), got str" in str(e)


def test_missing_optional_dependency_message() -> None:
    from torchslim._optional import require

    with pytest.raises(errors.MissingDependencyError, match=r"pip install"):
        require("definitely_not_a_module_xyz", "testing")
