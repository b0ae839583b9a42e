"""The one registry: kinds, unknown names (close-match suggestion), duplicates refused."""

from __future__ import annotations

import pytest

import torchslim as ts
from torchslim import _registry
from torchslim._registry import KINDS, Entry, entries, get_method, lookup, register
from torchslim.errors import ConfigError


@pytest.fixture
def scratch():
    """Names registered by a test are removed afterwards."""
    added: list[tuple[str, str]] = []
    yield added
    for kind, name in added:
        _registry._ENTRIES[kind].pop(name, None)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_listable(kind: str) -> None:
    found = entries(kind)
    assert all(isinstance(e, Entry) and e.kind == kind for e in found)
    assert [e.name for e in found] == sorted(e.name for e in found)


@pytest.mark.parametrize("kind", ["method", "plan", "cli_verb", "model", "dataset"])
def test_kinds_the_core_fills_are_not_empty(kind: str) -> None:
    assert entries(kind), f"nothing registered as {kind}"


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'prune.importance.l1'\?.*known:"):
        lookup("method", "prune.importance.l11")
    with pytest.raises(ConfigError, match=r"unknown prune.importance method 'fpgn'; did you mean 'fpgm'"):
        get_method("prune.importance", "fpgn")


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown registry kind 'methods'.*allowed: method"):
        entries("methods")


def test_duplicate_registration_is_refused(scratch) -> None:
    def first() -> None:
        """First."""

    def second() -> None:
        """Second."""

    register("recipe_stage", "test-dup", first, family="test")
    scratch.append(("recipe_stage", "test-dup"))
    register("recipe_stage", "test-dup", first, family="test")  # the same object again: fine
    with pytest.raises(ConfigError, match="'test-dup' is already registered"):
        register("recipe_stage", "test-dup", second)
    assert lookup("recipe_stage", "test-dup").obj is first
    register("recipe_stage", "test-dup", second, replace=True)
    e = lookup("recipe_stage", "test-dup")
    assert e.obj is second and e.description == "Second." and e.family == ""


def test_decorator_family_filter_and_meta(scratch) -> None:
    @register("method", "testfam.sub.thing", family="testfam.sub", order=3)
    class Thing:
        """A thing."""

    scratch.append(("method", "testfam.sub.thing"))
    assert [e.obj for e in entries("method", family="testfam")] == [Thing]
    assert entries("method", family="testfam", pattern="*.nothing") == []
    e = lookup("method", "testfam.sub.thing")
    assert e.meta["order"] == 3 and e.short_name == "thing" and e.description == "A thing."
    assert ts.list_methods("testfam") == ["testfam.sub.thing"]
    assert get_method("testfam.sub", "thing") is Thing


def test_list_functions_read_the_registry() -> None:
    assert set(ts.list_methods()) == {e.name for e in entries("method")}
    assert ts.list_datasets() == [e.name for e in entries("dataset") if e.obj.claims is None]
    assert {"torchvision", "timm", "zoo", "pretrained", "file", "saved"} <= {e.name for e in entries("model")}
    assert {"prune_channels", "sparsify", "factorize", "binarize", "quantize", "cluster"} <= {e.name for e in entries("plan")}
    import torchslim.cli  # noqa: F401  (registers the core verbs: profile, train, list, demo)

    verbs = [v for e in entries("cli_verb") for v in e.meta["verbs"]]
    assert len(verbs) == len(set(verbs))
    assert {"profile", "train", "list", "demo", "prune", "sparsify", "quantize", "compress", "export", "pack"} <= set(verbs)


def test_unknown_model_kind_cannot_be_rebuilt() -> None:
    from torchslim._modelinfo import rebuild, rebuildable
    from torchslim.errors import SpecError

    assert rebuildable("zoo") and not rebuildable("saved") and not rebuildable("custom")
    with pytest.raises(SpecError, match="cannot rebuild a model of kind 'custom'; known kinds: file, pretrained"):
        rebuild({"kind": "custom", "build": {}})


def test_a_cli_verb_is_one_registration(scratch, capsys) -> None:
    """A verb registered under kind cli_verb appears in `torchslim` (no table in cli.py to edit)."""
    from torchslim.cli import main

    def add(sub) -> None:
        p = sub.add_parser("hello-test", help="say hello")
        p.set_defaults(func=lambda args: print("hello") or 0)

    register("cli_verb", "hello-test", add, family="test", order=999, verbs=("hello-test",))
    scratch.append(("cli_verb", "hello-test"))
    assert main(["hello-test"]) == 0 and capsys.readouterr().out == "hello\n"
