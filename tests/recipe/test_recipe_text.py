"""Post-training transformer stages from a recipe on the real pretrained MiniLM (no data spec:
calibration and distillation use the bundled sentences)."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.recipe import RecipeError, compress, load_recipe

pytest.importorskip("transformers")


def test_text_stages_run_on_minilm(tmp_path) -> None:
    recipe = {"stages": [
        {"prune_heads": {"heads": 0.25, "ffn": 0.25, "calibration_batches": 1}},
        {"wanda": {"sparsity": 0.5, "calibration_batches": 2, "modules": ["re:.*intermediate\\.dense"]}},
        {"distill_hidden": {"epochs": 1, "max_sentences": 32, "batch_size": 16}},
    ]}
    model = ts.create_model("pretrained:minilm")
    result = compress(model, recipe, None, out=tmp_path / "run", progress=False, latency=False)
    rep = result.report
    kinds = [s["kind"] for s in rep["stages"]]
    assert kinds == ["original", "prune_heads", "wanda", "distill_hidden"]
    heads, wanda = rep["stages"][1], rep["stages"][2]
    assert heads["params"] < rep["stages"][0]["params"] and heads["macs"] < rep["stages"][0]["macs"]
    assert wanda["nonzero_params"] < heads["nonzero_params"]
    # the final model is still a sentence encoder of the same width, reloadable
    again = ts.load(tmp_path / "run" / "model")
    x = ts.example_inputs(again)
    with torch.no_grad():
        out = again(**x) if isinstance(x, dict) else again(*x)
    assert out.shape[-1] == 384


def test_text_stage_errors_before_any_work() -> None:
    with pytest.raises(RecipeError, match=r"stage 1 \(prune_heads\).*nothing to prune"):
        load_recipe({"stages": [{"prune_heads": {}}]})
    with pytest.raises(RecipeError, match=r"stage 1 \(prune_heads\).*'heads'.*\[0, 1\)"):
        load_recipe({"stages": [{"prune_heads": {"heads": 1.0}}]})
    with pytest.raises(RecipeError, match=r"stage 1 \(gptq\)"):
        load_recipe({"stages": [{"gptq": {"bits": 9}}]})
    with pytest.raises(RecipeError, match=r"stage 1 \(wanda\)"):
        load_recipe({"stages": [{"wanda": {"pattern": "3:2"}}]})
