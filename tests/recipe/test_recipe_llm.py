"""The llm-int4 recipe on a small random Llama: quantize_llm, then the ONNX decoder and GGUF targets,
each scored by held-out perplexity against the original shipped the same way."""

from __future__ import annotations

import json

import pytest
import torch

import torchslim as ts

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("gguf")




def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture
def tiny_spec(llama_spec, monkeypatch):
    """A file spec of a random 2-layer Llama over bytes, and the byte tokenizer it is read with."""
    import torchslim.lm
    import torchslim.lm.evaluate as evaluate

    spec = llama_spec()
    real = evaluate.resolve_tokenizer

    def bytes_tokenizer(model, tokenizer=None):
        return tokenizer if tokenizer is not None else _bytes

    monkeypatch.setattr(evaluate, "resolve_tokenizer", bytes_tokenizer)
    monkeypatch.setattr(torchslim.lm, "resolve_tokenizer", bytes_tokenizer)
    assert real is not bytes_tokenizer
    return spec


def test_llm_int4_recipe_ships_an_onnx_decoder_and_a_gguf_file_scored_by_perplexity(tiny_spec, tmp_path) -> None:
    recipe = ts.load_recipe("llm-int4").to_dict()
    assert recipe["stages"][0]["quantize_llm"]["method"] == "gptq" and recipe["goals"]["max_perplexity_increase"] == 0.06
    recipe["stages"][0]["quantize_llm"].update(method="rtn", rotate=False)  # no calibration: the test is about the shipping
    recipe["stages"][1]["export"].update(perplexity_tokens=200, check=False)
    result = ts.compress(tiny_spec, recipe, data="shakespeare", out=tmp_path / "run", latency=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["original", "quantize_llm", "export"]
    onnx, gguf = report["deployed"]["onnx"], report["deployed"]["gguf"]
    assert onnx["format"] == "onnx" and gguf["format"] == "gguf"
    for target in (onnx, gguf):
        assert 0 < target["size_bytes"] < target["original_size_bytes"]  # int4 / int8 files against float ones
    assert onnx["decoder"]["matmul_nbits"] and gguf["types"].get("Q4_0", 0) > 0
    # the ONNX decoder is scored itself, on held-out text; its original is the float decoder
    ppl, base = onnx["perplexity"], onnx["original_perplexity"]
    assert ppl["data"] == base["data"] == "shakespeare[test]" and ppl["tokens"] == base["tokens"] > 100
    assert base["perplexity"] == pytest.approx(report["perplexity_before"], rel=1e-3)  # float ONNX = float torch
    assert ppl["perplexity"] == pytest.approx(report["perplexity_after"], rel=2e-2)  # int4 ONNX = int4 torch
    (goal,) = [g for g in report["goals"] if g["name"] == "max_perplexity_increase"]
    assert goal["basis"] == "onnx runtime"
    assert goal["value"] == pytest.approx(ppl["perplexity"] / base["perplexity"] - 1)
    assert result.files["onnx"].endswith("model.onnx") and result.files["gguf"].endswith("model.gguf")
    again = ts.load(tmp_path / "run" / "model").eval()  # the saved int4 model replays to the same logits
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, result.model.eval()(ids).logits)


def test_gguf_target_and_llm_recipe_are_refused_for_a_classifier(tmp_path) -> None:
    from torchslim.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"stage 1 \(quantize_llm\) is for decoder LLMs .* LeNet300 is not one"):
        ts.compress("zoo:lenet300", "llm-int4", data="digits", out=tmp_path / "run", latency=False)

    recipe = {"version": 1, "stages": [{"export": {"formats": ["gguf"]}}]}
    with pytest.raises(RecipeError, match="'gguf' is for decoder LLMs"):
        ts.compress("zoo:lenet300", recipe, data="digits", out=tmp_path / "run", latency=False)
    assert not (tmp_path / "run").exists()
