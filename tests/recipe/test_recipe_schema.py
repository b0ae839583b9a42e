"""Recipe validation: every built-in loads and round-trips; bad recipes fail before any work, naming
the source, the stage and the field (with a suggestion for misspellings)."""

from __future__ import annotations

import pytest
import yaml

import torchslim as ts
from torchslim.recipe import RecipeError, list_recipes, load_recipe


def test_builtins_are_listed_and_valid() -> None:
    names = ts.list_recipes()
    assert {"default", "prune-distill-quantize", "deep-compression", "lottery"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert r.name == name and r.stages


@pytest.mark.parametrize("name", list_recipes())
def test_resolved_recipe_round_trips(name: str, tmp_path) -> None:
    r = load_recipe(name)
    path = tmp_path / "resolved.yaml"
    path.write_text(r.to_yaml())
    again = load_recipe(path)
    assert again.to_dict() == r.to_dict()


def test_defaults_are_filled_in() -> None:
    r = load_recipe({"stages": [{"quantize": {"mode": "dynamic"}}]})
    cfg = r.stages[0].config
    assert cfg["mode"] == "dynamic" and cfg["bits"] == 8 and cfg["granularity"] == "channel"


def test_bare_stage_name_means_defaults() -> None:
    r = load_recipe({"stages": ["finetune"]})
    assert r.stages[0].kind == "finetune" and r.stages[0].config == {}


def _write(tmp_path, recipe: dict) -> str:
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_unknown_stage_suggests(tmp_path) -> None:
    path = _write(tmp_path, {"stages": [{"prune_channels": {"ratio": 0.5}}, {"quantise": {}}]})
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert path in msg and "stage 2" in msg and "'quantise'" in msg and "did you mean 'quantize'" in msg


def test_misspelt_key_suggests(tmp_path) -> None:
    path = _write(tmp_path, {"stages": [{"quantize": {"mode": "static", "bitz": 8}}]})
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert path in msg and "stage 1 (quantize)" in msg and "'bitz'" in msg and "did you mean 'bits'" in msg


def test_nested_misspelt_key(tmp_path) -> None:
    path = _write(tmp_path, {"stages": [{"distill": {"train": {"epohcs": 2}}}]})
    with pytest.raises(RecipeError, match=r"stage 1 \(distill\).*'train\.epohcs'.*did you mean 'epochs'"):
        load_recipe(path)


def test_wrong_type(tmp_path) -> None:
    path = _write(tmp_path, {"stages": [{"quantize": {"bits": "eight"}}]})
    with pytest.raises(RecipeError, match=r"stage 1 \(quantize\): field 'bits'.*integer.*'eight'"):
        load_recipe(path)


def test_bad_value_from_the_family_config(tmp_path) -> None:
    path = _write(tmp_path, {"stages": [{"quantize": {"mode": "fast"}}]})
    with pytest.raises(RecipeError, match=r"stage 1 \(quantize\).*mode"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"stage 1 \(prune_channels\).*'ratio'"):
        load_recipe({"stages": [{"prune_channels": {"ratio": 1.5}}]})
    with pytest.raises(RecipeError, match=r"stage 1 \(cluster\).*'bits'.*1\.\.8"):
        load_recipe({"stages": [{"cluster": {"bits": 9}}]})


@pytest.mark.parametrize(
    ("goals", "pattern"),
    [
        ({"target_macs": 0.0}, r"goals: field 'target_macs'.*\(0, 1\]"),
        ({"max_accuracy_drop": -0.1}, r"goals: field 'max_accuracy_drop'"),
        ({"target_macs": 0.5}, r"impossible goal 0.5: no stage of this recipe reduces macs"),
        ({"target_sise": 0.5}, r"'target_sise'.*did you mean 'target_size'"),
    ],
)
def test_impossible_or_misspelt_goals(goals: dict, pattern: str) -> None:
    with pytest.raises(RecipeError, match=pattern):
        load_recipe({"stages": [{"quantize": {"mode": "dynamic"}}], "goals": goals})


def test_empty_and_malformed(tmp_path) -> None:
    with pytest.raises(RecipeError, match="'stages' is empty"):
        load_recipe({"stages": []})
    with pytest.raises(RecipeError, match="exactly one key"):
        load_recipe({"stages": [{"quantize": {}, "finetune": {}}]})
    with pytest.raises(RecipeError, match="newer"):
        load_recipe({"version": 99, "stages": ["finetune"]})
    with pytest.raises(RecipeError, match="neither a file nor a built-in"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed\n")
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(bad)


def test_recipe_error_is_a_config_error() -> None:
    with pytest.raises(ts.errors.ConfigError):
        load_recipe({"stages": ["nope"]})
