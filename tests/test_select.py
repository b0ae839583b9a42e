"""The one module selector: exact names, globs, ``re:`` regexes, containers, refusals."""

from __future__ import annotations

import warnings

import pytest
from torch import nn

from torchslim._select import Selector, check_patterns, first_match, matches, renamed_argument, select_modules
from torchslim.errors import ConfigError


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_default_selects_every_layer_of_the_kinds():
    assert select_modules(_model()) == ["0", "2.0", "4"]
    assert select_modules(_model(), kinds=(nn.Linear,)) == ["4"]
    assert select_modules(_model(), kinds=None) == ["0", "1", "2", "2.0", "2.1", "3", "4"]


@pytest.mark.parametrize(
    ("modules", "skip", "expected"),
    [
        (["0"], None, ["0"]),  # exact name
        (["2"], None, ["2.0"]),  # a container selects what is inside it
        (["?"], None, ["0", "2.0", "4"]),  # glob (it matches the container "2" too)
        (["re:[04]"], None, ["0", "4"]),  # regex, matched in full
        (None, ["re:2\\..*"], ["0", "4"]),
        (None, "4", ["0", "2.0"]),  # one string is one pattern
        (["*"], ["2"], ["0", "4"]),
    ],
)
def test_patterns(modules, skip, expected):
    assert select_modules(_model(), modules, skip) == expected


def test_matches_is_not_a_prefix_match():
    assert matches("layer4.0.conv1", "layer4")
    assert not matches("layer40.conv1", "layer4")
    assert matches("a.b", "re:a\\.b") and not matches("a.bc", "re:a\\.b")


def test_unknown_name_refused_with_suggestion():
    with pytest.raises(ConfigError, match=r"skip: '2\.3' selects no module.*did you mean '2\.\d'"):
        select_modules(_model(), skip=["2.3"])
    with pytest.raises(ConfigError, match=r"modules: 'conv' selects no module"):
        select_modules(_model(), modules=["conv"])
    with pytest.raises(ConfigError, match=r"exclude: 'x'"):
        select_modules(_model(), skip=["x"], skip_field="exclude")


@pytest.mark.parametrize("bad", [[3], "re:(", {"a": 1}, 5])
def test_bad_patterns_refused(bad):
    with pytest.raises(ConfigError):
        select_modules(_model(), modules=bad)


def test_selector_value_and_first_match():
    s = Selector(("features.*",), ("features.0",))
    assert s("features.3") and not s("features.0") and not s("head")
    assert Selector()("anything")
    with pytest.raises(ConfigError, match="'features.9x'"):
        Selector(("features.9x",)).check(["features.0", "features.3"])
    assert first_match("layer4.1.conv2", {"layer3": 1, "layer4.*": 2, "layer4": 3}) == "layer4.*"
    assert first_match("fc", {"layer4": 3}) is None
    check_patterns(None, [])


def test_renamed_argument_warns_and_refuses_both():
    with pytest.warns(DeprecationWarning, match="ignore= is deprecated, use skip="):
        assert renamed_argument((), ("a",), old_name="ignore", new_name="skip", where="f", default=()) == ("a",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert renamed_argument(("b",), None, old_name="ignore", new_name="skip", where="f", default=()) == ("b",)
    with pytest.raises(ConfigError, match="pass only skip="):
        renamed_argument(("b",), ("a",), old_name="ignore", new_name="skip", where="f", default=())


def test_a_bad_regex_names_the_argument_it_came_from() -> None:
    import pytest

    from torchslim._select import as_patterns
    from torchslim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^skip: module pattern 're:\(' is not a valid regular expression"):
        as_patterns(["re:("], "skip")
