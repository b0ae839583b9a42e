"""ts.compress: every built-in recipe end to end at a small size; checkpoints, resume, reports, goals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchslim as ts
from torchslim.recipe import RecipeError, compress, list_recipes, load_recipe
from torchslim.recipe import stages as stage_mod


def _needs(name: str) -> None:
    kinds = {next(iter(s)) for s in load_recipe(name).to_dict()["stages"]}
    if kinds & {"cluster", "pack"}:
        pytest.importorskip("torchslim.pack")


@pytest.mark.parametrize("name", [n for n in list_recipes() if not n.startswith("llm-")])  # test_recipe_llm*.py
def test_every_builtin_recipe_runs(name: str, trained: Path, data, tmp_path: Path, shrink) -> None:
    _needs(name)
    model = ts.load(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress(model, shrink(name), data, out=tmp_path / "run", progress=False, latency=False)
    rep = result.report
    # the user's model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # one row per stage plus the original, each with the common figures and ratios
    assert [s["kind"] for s in rep["stages"]] == ["original"] + [s.kind for s in load_recipe(name).stages]
    for s in rep["stages"]:
        assert s["params"] > 0 and s["size_bytes"] > 0 and 0.0 <= s["accuracy"] <= 1.0
    assert rep["stages"][0]["ratios"]["params"] == 1.0
    assert rep["before"]["params"] == rep["stages"][0]["params"]
    assert rep["after"]["params"] == rep["stages"][-1]["params"]
    guard = {"not_slower"} if any(s.kind == "export" for s in load_recipe(name).stages) else set()  # latency=False
    assert {g["name"] for g in rep["goals"]} == set(load_recipe(name).goals.model_dump(exclude_none=True)) | guard
    for f in ("report_json", "report_md", "report_html", "model", "recipe"):
        assert Path(rep["files"][f]).exists(), f
    assert json.loads((tmp_path / "run" / "report.json").read_text())["stages"] == rep["stages"]
    # the final model is a ts.save directory that reloads to the same outputs
    again = ts.load(tmp_path / "run" / "model")
    x = ts.example_inputs(again)
    with torch.no_grad():
        assert torch.allclose(again(*x), result.model(*x))


def test_prune_stage_really_shrinks_and_export_times_both(trained: Path, data, tmp_path: Path, shrink) -> None:
    result = compress(ts.load(trained), shrink("default"), data, out=tmp_path / "run", progress=False, latency=False)
    rep = result.report
    prune = rep["stages"][1]
    assert prune["kind"] == "prune_channels" and prune["ratios"]["macs"] < 0.5 and prune["ratios"]["params"] < 0.5
    onnx = rep["deployed"]["onnx"]
    assert Path(rep["files"]["onnx"]).is_file() and Path(rep["files"]["onnx_original"]).is_file()
    assert onnx["size_bytes"] < onnx["original_size_bytes"]
    assert set(onnx["latency_ms"]) == {"1"} and onnx["latency_ms"]["1"]["original"] > 0
    # the ONNX file's accuracy is measured in ONNX Runtime and agrees with torch on most inputs
    assert 0.0 <= onnx["accuracy"] <= 1.0 and onnx["top1_agreement_vs_torch"] > 0.9
    size_goal = next(g for g in rep["goals"] if g["name"] == "target_size")
    assert size_goal["value"] == pytest.approx(onnx["size_ratio"]) and size_goal["met"] == (onnx["size_ratio"] <= 0.25)


def test_existing_out_is_refused_unless_resume_or_force(trained: Path, data, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = {"stages": [{"quantize": {"mode": "dynamic"}}]}
    with pytest.raises(ts.errors.ConfigError, match="already exists"):
        compress(ts.load(trained), recipe, data, out=out, progress=False, latency=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ts.errors.ConfigError, match="no state.json"):
        compress(ts.load(trained), recipe, data, out=out, resume=True, progress=False, latency=False)
    compress(ts.load(trained), recipe, data, out=out, force=True, progress=False, latency=False)
    assert not (out / "keep.txt").exists() and (out / "report.json").is_file()
    with pytest.raises(ts.errors.ConfigError, match="another recipe"):
        compress(ts.load(trained), {"stages": [{"quantize": {"mode": "dynamic", "granularity": "tensor"}}]}, data, out=out,
                 resume=True, progress=False, latency=False)


def _figures(report: dict) -> list[tuple]:
    return [(s["label"], s["accuracy"], s["params"], s["macs"], s["size_bytes"]) for s in report["stages"]]


def test_interrupted_run_resumes_to_the_same_report(trained: Path, data, tmp_path: Path, monkeypatch, shrink) -> None:
    recipe = shrink("default")
    full = compress(ts.load(trained), recipe, data, out=tmp_path / "full", progress=False, latency=False)

    real = stage_mod.runner_for

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # stopped during stage 3

    monkeypatch.setattr(stage_mod, "runner_for", lambda kind: boom if kind == "quantize" else real(kind))
    with pytest.raises(KeyboardInterrupt):
        compress(ts.load(trained), recipe, data, out=tmp_path / "cut", progress=False, latency=False)
    state = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert [s["label"] for s in state["stages"]] == ["01-prune_channels", "02-distill"]
    monkeypatch.setattr(stage_mod, "runner_for", real)
    ran = []
    resumed = compress(ts.load(trained), recipe, data, out=tmp_path / "cut", resume=True, progress=False,
                       latency=False, log=ran.append)
    assert any("02-distill" not in m and "finished earlier" in m for m in ran)
    assert _figures(resumed.report) == _figures(full.report)
    assert resumed.report["deployed"]["onnx"]["accuracy"] == full.report["deployed"]["onnx"]["accuracy"]


def test_data_required_and_patterns_checked_before_any_work(trained: Path, tmp_path: Path, shrink) -> None:
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=r"stages 02-distill, 03-quantize need data"):
        compress(ts.load(trained), shrink("default"), None, out=out, progress=False)
    recipe = {"stages": [{"prune_channels": {"ratio": 0.5, "ratios": {"re:conv[0-9]+": 0.3}}}]}
    with pytest.raises(RecipeError, match=r"stage 1 \(prune_channels\).*'re:conv\[0-9\]\+' selects no module"):
        compress(ts.load(trained), recipe, None, out=out, progress=False)
    assert not out.exists()


def test_module_patterns_select_by_glob_and_regex(trained: Path, data, tmp_path: Path) -> None:
    names = [n for n, m in ts.load(trained).named_modules() if isinstance(m, torch.nn.Linear)]
    recipe = {"stages": [{"quantize": {"mode": "weight-only", "bits": 8, "modules": [f"re:{names[0]}", names[1]]}}]}
    rep = compress(ts.load(trained), recipe, data, out=tmp_path / "run", progress=False, latency=False).report
    bits = {r["name"]: r["bits"] for r in rep["layers"]["final"]}
    assert bits[names[0]] == 8 and bits[names[1]] == 8 and bits[names[2]] == 32
