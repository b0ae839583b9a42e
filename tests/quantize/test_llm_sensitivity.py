"""Mixed precision for decoder LLMs: per-layer int4 sensitivity, and layer_bits in quantize_llm_."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torchslim.errors import ConfigError  # noqa: E402
from torchslim.graph.state import state_digest  # noqa: E402
from torchslim.quantize import quantize_llm_  # noqa: E402
from torchslim.quantize.llm_sensitivity import decoder_sensitivity, mixed_layer_bits  # noqa: E402


def _llama(layers: int = 3) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_the_layer_with_outlier_weights_is_the_most_sensitive_and_the_model_is_put_back() -> None:
    model = _llama()
    with torch.no_grad():  # layer 1 writes 40x more into the residual stream: its rounding error dominates
        model.model.layers[1].mlp.down_proj.weight *= 40
    before = state_digest(model)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    sens = decoder_sensitivity(model, ids, bits=4, group_size=32)
    assert state_digest(model) == before
    assert len(sens) == 3 and all(v >= 0 for v in sens) and max(range(3), key=lambda i: sens[i]) == 1
    bits = mixed_layer_bits(model, sens, 1)
    assert bits and all(k.startswith("model.layers.1.") for k in bits) and set(bits.values()) == {8}
    assert len(bits) == 7  # q, k, v, o, gate, up, down
    # a model that lost layer 0 since it was measured: position 0 is original layer 1
    assert set(mixed_layer_bits(_llama(2), sens, 1, layers=[1, 2])) == {k.replace("layers.1.", "layers.0.") for k in bits}


def test_quantize_llm_keeps_the_named_layers_at_their_bits() -> None:
    model = _llama()
    plan = quantize_llm_(model, method="rtn", layer_bits={"model.layers.2.mlp.down_proj": 8}, embedding_bits=None)
    assert plan.config.layer_bits == {"model.layers.2.mlp.down_proj": 8, "lm_head": 8}
    assert model.model.layers[2].mlp.down_proj.scheme.bits == 8 and model.model.layers[1].mlp.down_proj.scheme.bits == 4


def test_bad_arguments_are_refused_with_the_model_unchanged() -> None:
    model = _llama()
    before = state_digest(model)
    with pytest.raises(ConfigError, match="layer_bits names layers that are not quantized"):
        quantize_llm_(model, method="rtn", layer_bits={"model.nope": 8})
    with pytest.raises(ConfigError, match="layer_bits must map layer names to bits"):
        quantize_llm_(model, method="rtn", layer_bits=[8])
    with pytest.raises(ConfigError, match="bits must be an integer >= 2"):
        decoder_sensitivity(model, torch.zeros(1, 4, dtype=torch.long), bits=1)
    with pytest.raises(ConfigError, match="token ids must be an integer tensor"):
        decoder_sensitivity(model, torch.zeros(4))
    with pytest.raises(ConfigError, match="one index into the 2 measured layers"):
        mixed_layer_bits(model, [0.1, 0.2], 1)
    assert state_digest(model) == before
