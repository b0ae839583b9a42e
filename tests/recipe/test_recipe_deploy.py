"""Deploy targets of the export stage: ``export: {formats: [onnx, pte, torch]}`` ships the model
in each runtime, and the report gives bytes, latency and accuracy of each file against the
original shipped the same way."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import torchslim as ts
from torchslim.recipe import RecipeError, compress, load_recipe, without_missing_targets
from torchslim.recipe._cli import deployed_lines

HAS_ET = importlib.util.find_spec("executorch") is not None
pytest.importorskip("onnxruntime")


def _recipe(formats: list[str]) -> dict:
    return {"version": 1, "name": "deploy", "stages": [
        {"quantize": {"mode": "static", "bits": 8, "calibration_batches": 2}},
        {"export": {"formats": formats, "batch_sizes": [1, 8], "runs": 3}},
    ]}


def test_every_target_is_measured_in_its_runtime(trained: Path, data, tmp_path: Path) -> None:
    formats = ["onnx", "torch"] + (["pte"] if HAS_ET else [])
    rep = compress(ts.load(trained), _recipe(formats), data, out=tmp_path / "run", progress=False, latency=False).report
    deployed = rep["deployed"]
    assert set(deployed) == set(formats)
    # a static-int8 model runs on integer kernels in PyTorch only compiled: timed there, beside its original compiled
    runtimes = {"onnx": "ONNX Runtime", "torch": "torch.compile (int8 on oneDNN)", "pte": "ExecuTorch (XNNPACK)"}
    for target in formats:
        fig = deployed[target]
        assert fig["runtime"] == runtimes[target]
        assert fig["size_bytes"] > 0 and fig["original_size_bytes"] > 0
        assert fig["size_ratio"] == pytest.approx(fig["size_bytes"] / fig["original_size_bytes"])
        for lat in fig["latency_ms"].values():
            assert lat["original"] > 0 and lat["compressed"] > 0
            assert lat["speedup"] == pytest.approx(lat["original"] / lat["compressed"])
        assert 0.0 <= fig["accuracy"] <= 1.0 and 0.0 <= fig["original_accuracy"] <= 1.0
    # the bytes are the shipped files' own
    torch_dir = Path(rep["files"]["torch"])
    assert deployed["torch"]["size_bytes"] == (torch_dir / "model.safetensors").stat().st_size
    assert ts.load(torch_dir)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    assert set(deployed["torch"]["latency_ms"]) == {"1", "8"}  # dynamic batch: every batch size asked for
    # the compiled int8 model scores what the stage table scored (the simulation), within a few rounding flips
    assert deployed["torch"]["timed_in"] == "compile"
    assert deployed["torch"]["accuracy"] == pytest.approx(rep["accuracy_after"], abs=0.02)
    assert deployed["onnx"]["size_bytes"] * 2 < deployed["onnx"]["original_size_bytes"]  # int8 QDQ file
    if HAS_ET:
        pte = deployed["pte"]
        assert pte["format"] == "pte-int8"  # a quantized model ships as XNNPACK int8; its original as fp32 .pte
        assert Path(rep["files"]["pte"]).stat().st_size == pte["size_bytes"]
        assert pte["size_bytes"] * 2 < pte["original_size_bytes"]
        assert pte["static_batch"] == 1 and set(pte["latency_ms"]) == {"1"}  # static shapes: the example's batch
        assert abs(pte["accuracy"] - pte["original_accuracy"]) < 0.05  # int8 in ExecuTorch keeps the accuracy
    lines = deployed_lines(rep)
    assert len(lines) == len(formats) and all("smaller on disk" in line and "1 thread" in line for line in lines)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "torch.compile (int8 on oneDNN) latency, batch 8" in md and ("ExecuTorch (XNNPACK) latency, batch 1" in md or not HAS_ET)


@pytest.mark.parametrize(("formats", "needle"), [
    (["tflite"], "allowed: "), (["pte2"], "did you mean 'pte'"), (["onnx", "onnx"], "twice"),
])
def test_bad_target_is_refused_when_the_recipe_loads(formats: list[str], needle: str) -> None:
    with pytest.raises(RecipeError, match=needle) as info:
        load_recipe(_recipe(formats))
    assert "torch" in str(info.value) or needle == "twice"


def test_missing_runtime_is_refused_before_any_work(trained: Path, data, tmp_path: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    model = ts.load(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=r"torchslim\[executorch\]"):
        compress(model, _recipe(["onnx", "pte"]), data, out=tmp_path / "run", progress=False, latency=False)
    assert not (tmp_path / "run").exists()  # refused before the output folder or any stage
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the demo drops what it cannot measure and says which
    recipe, dropped = without_missing_targets("default")
    assert dropped == ["pte"] and recipe.stages[-1].config["formats"] == ["onnx", "torch"]


def test_default_recipe_and_demo_report_three_targets() -> None:
    assert load_recipe("default").stages[-1].config["formats"] == ["onnx", "pte", "torch"]
