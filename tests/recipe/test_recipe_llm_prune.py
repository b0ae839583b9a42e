"""The llm-prune-heal recipe on a small random Llama: prune_llm (width + depth), heal, then a
save_pretrained folder that stock from_pretrained reloads, scored by held-out perplexity."""

from __future__ import annotations

import json

import pytest
import torch

import torchslim as ts

transformers = pytest.importorskip("transformers")


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture
def tiny_spec(llama_spec, monkeypatch):
    """A file spec of a random Llama over bytes (4 layers, so depth pruning has room), read with a byte tokenizer."""
    import torchslim.lm
    import torchslim.lm.evaluate as evaluate

    def bytes_tokenizer(model, tokenizer=None):
        return tokenizer if tokenizer is not None else _bytes

    monkeypatch.setattr(evaluate, "resolve_tokenizer", bytes_tokenizer)
    monkeypatch.setattr(torchslim.lm, "resolve_tokenizer", bytes_tokenizer)
    return llama_spec(layers=4)


def test_llm_prune_heal_recipe_ships_a_folder_stock_from_pretrained_reloads(tiny_spec, tmp_path) -> None:
    recipe = ts.load_recipe("llm-prune-heal").to_dict()
    assert recipe["stages"][0]["prune_llm"]["target"] == 0.3 and recipe["stages"][1]["heal"]["minutes"] == 30
    recipe["stages"][0]["prune_llm"].update(max_tokens=256)
    recipe["stages"][1]["heal"].update(max_steps=3, seq_len=32, batch_size=2)
    recipe["stages"][2]["export"].update(formats=["hf"], perplexity_tokens=200)
    result = ts.compress(tiny_spec, recipe, data="shakespeare", out=tmp_path / "run", latency=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["original", "prune_llm", "heal", "export"]
    plan = report["stages"][1]["extras"]["plan"]
    assert plan["mode"] == "both" and abs(plan["achieved"] - 0.3) <= 0.05
    assert report["stages"][2]["extras"]["heal"]["steps"] == 3
    hf = report["deployed"]["hf"]
    assert hf["reload"]["from_pretrained"] is True
    assert 0 < hf["size_bytes"] < hf["original_size_bytes"]
    assert hf["perplexity"]["data"] == "shakespeare[test]"
    assert result.files["hf"].endswith("hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.files["hf"]).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model.eval()(ids).logits, atol=1e-5)
    assert loaded.config.num_hidden_layers < 4 or loaded.config.intermediate_size < 128
    again = ts.load(tmp_path / "run" / "model").eval()  # the saved run replays the pruning (depth and width)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, result.model.eval()(ids).logits)


def test_llm_prune_stages_are_refused_for_a_classifier(tmp_path) -> None:
    from torchslim.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"stage 1 \(prune_llm\) is for decoder LLMs .* LeNet300 is not one"):
        ts.compress("zoo:lenet300", "llm-prune-heal", data="digits", out=tmp_path / "run", latency=False)
    recipe = {"version": 1, "stages": [{"export": {"formats": ["hf"]}}]}
    with pytest.raises(RecipeError, match="'hf' is for decoder LLMs"):
        ts.compress("zoo:lenet300", recipe, data="digits", out=tmp_path / "run", latency=False)
    assert not (tmp_path / "run").exists()
