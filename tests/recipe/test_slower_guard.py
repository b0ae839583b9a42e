"""The compress guard: a result slower than the original where it runs is a failed goal naming the
stage that made it slower; ``allow_slower`` (``--allow-slower``) keeps the figure without failing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import torchslim as ts
from torchslim.cli import main
from torchslim.recipe import compress

# pruning a quarter of the channels makes LeNet-300-100 faster; factorizing every layer at full rank
# (W -> two layers, more MACs and twice the calls) makes it reliably slower in eager PyTorch
SLOWER = {"name": "slower", "stages": [
    {"prune_channels": {"ratio": 0.25, "importance": "l2"}},
    {"factorize": {"method": "svd", "rank": 1.0, "only_if_smaller": False}},
]}


def _not_slower(report: dict) -> list[dict]:
    return [g for g in report["goals"] if g["name"] == "not_slower"]


@pytest.fixture
def cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))


def test_slower_result_is_a_failed_goal_naming_the_stage(cache, tmp_path: Path) -> None:
    model = ts.create_model("zoo:lenet300")
    result = compress(model, SLOWER, None, out=tmp_path / "run", progress=False)
    (goal,) = _not_slower(result.report)
    # no export stage: the ts.save model is what ships, to eager PyTorch, timed side by side with the original
    assert goal["runtime"] == "eager" and goal["deploy_target"] == "torch" and "eager PyTorch" in goal["basis"]
    assert goal["value"] > 1.0 and goal["slower"] and not goal["met"] and not goal["allowed"]
    assert goal["rounds_lost"] >= 0.75 and "re-measured" in goal["basis"] and "warm blocks" in goal["basis"]
    assert goal["stage"] == "02-factorize"  # the pruning before it made the model faster, not slower
    assert set(goal["stage_ratios"]) == {"01-prune_channels", "02-factorize"} and goal["stage_ratios"]["02-factorize"] > 1.0
    assert not result.goals_met
    # the report files state the runtime and the stage
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert _not_slower(rep) == [goal] and rep["latency_runtime"]["stages"].startswith("eager PyTorch")
    html = (tmp_path / "run" / "report.html").read_text()
    md = (tmp_path / "run" / "report.md").read_text()
    for text in (html, md):
        assert "not slower than the original in eager PyTorch" in text and "made slower by stage 02-factorize" in text
        assert "MISSED" in text


def test_allow_slower_keeps_the_ratio_without_failing(cache, tmp_path: Path) -> None:
    recipe = {**SLOWER, "allow_slower": True}
    result = compress(ts.create_model("zoo:lenet300"), recipe, None, out=tmp_path / "run", progress=False)
    (goal,) = _not_slower(result.report)
    assert goal["met"] and goal["allowed"] and goal["slower"] and goal["value"] > 1.0
    assert "stage" not in goal  # no stage is hunted for when slower is allowed
    assert result.goals_met
    assert "slower, allowed" in (tmp_path / "run" / "report.md").read_text()
    assert ts.load_recipe(recipe).to_dict()["allow_slower"] is True  # kept in resolved_recipe.yaml


def test_no_latency_without_export_says_the_guard_did_not_run(tmp_path: Path) -> None:
    result = compress(ts.create_model("zoo:lenet300"), SLOWER, None, out=tmp_path / "run", progress=False, latency=False)
    assert _not_slower(result.report) == [] and "not timed" in result.report["guard"]["skipped"]
    assert "not-slower check skipped" in (tmp_path / "run" / "report.md").read_text()


def test_cli_names_the_stage_and_allow_slower_flag(cache, capsys, tmp_path: Path) -> None:
    path = tmp_path / "slower.yaml"
    path.write_text(yaml.safe_dump(SLOWER))
    argv = ["compress", "zoo:lenet300", "--recipe", str(path)]
    # a failed goal is reported, not raised: exit code 0 like every other missed goal
    assert main([*argv, "--out", str(tmp_path / "a"), "--quiet", "--json"]) == 0
    (goal,) = _not_slower(json.loads(capsys.readouterr().out))
    assert not goal["met"] and goal["stage"] == "02-factorize"
    assert main([*argv, "--out", str(tmp_path / "b"), "--allow-slower"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "goal not slower than the original in eager PyTorch" in out and "slower, allowed" in out
    assert "eager ms" in out
