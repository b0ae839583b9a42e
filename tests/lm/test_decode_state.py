"""DecodeState: one generation's KV cache on an ONNX decoder (updated in place on a fused file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from torchslim.errors import ConfigError  # noqa: E402
from torchslim.export.onnx_decoder import OnnxDecoder, export_onnx_decoder  # noqa: E402


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["fused", "reference"])
def decoder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("dec") / "d.onnx"
    model = _llama()
    export_onnx_decoder(model, path, fused=request.param == "fused")
    return OnnxDecoder(path, threads=1), model


def _growing(dec: OnnxDecoder, prompt: np.ndarray, steps: np.ndarray) -> list[np.ndarray]:
    """Logits of a prefill then one-token steps, through step_numpy's growing cache."""
    b, n = prompt.shape
    logits, past = dec.step_numpy(prompt, dec.empty_past(b), np.ones((b, n), np.int64))
    outs = [logits.copy()]
    for i in range(steps.shape[1]):
        logits, past = dec.step_numpy(steps[:, i:i + 1], past, np.ones((b, n + i + 1), np.int64))
        outs.append(logits.copy())
    return outs


def test_state_gives_the_growing_caches_logits_bit_for_bit(decoder):
    dec, model = decoder
    g = np.random.default_rng(0)
    prompt, steps = g.integers(0, 64, (2, 7)), g.integers(0, 64, (2, 5))
    ref = _growing(dec, prompt, steps)
    state = dec.start(2, 7 + 5 + 3)  # spare positions are never read
    assert state.in_place is (dec.metadata["graph"] == "fused")
    got = [state.step(prompt)] + [state.step(steps[:, i:i + 1]) for i in range(steps.shape[1])]
    assert state.length == 12
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    with torch.no_grad():  # and the whole sequence matches the torch model
        full = model(torch.from_numpy(np.concatenate([prompt, steps], 1))).logits.numpy()
    np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-4, rtol=1e-4)


def test_the_fused_cache_is_written_in_place(decoder):
    dec, _ = decoder
    if dec.metadata["graph"] != "fused":
        pytest.skip("the reference graph's cache grows")
    state = dec.start(1, 10)
    keys = state._buffers[0].numpy()  # a view of the buffer ONNX Runtime reads and writes
    assert not keys.any()
    state.step(np.array([[1, 2, 3]]))
    assert keys[:, :, :3].any() and not keys[:, :, 3:].any()
    state.step(np.array([[4]]))
    assert keys[:, :, 3].any() and not keys[:, :, 4:].any()


def test_rewind_decodes_again_from_the_prompt(decoder):
    dec, _ = decoder
    state = dec.start(1, 8)
    state.step(np.array([[5, 6, 7]]))
    first = [state.step(np.array([[t]])) for t in (8, 9)]
    state.rewind(3)
    again = [state.step(np.array([[t]])) for t in (8, 9)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    state.rewind(0)  # a 4-token prefill: the same logits up to float rounding (other matmul shapes)
    np.testing.assert_allclose(state.step(np.array([[5, 6, 7, 8]]))[:, -1], first[0][:, -1], atol=1e-5, rtol=1e-5)
    assert state.length == 4


def test_bad_use_is_refused_in_one_line(decoder):
    dec, _ = decoder
    state = dec.start(1, 4)
    state.step(np.array([[1, 2, 3]]))
    with pytest.raises(ConfigError, match="holds 4 tokens; 3 are in it and 2 more"):
        state.step(np.array([[1, 2]]))
    assert state.length == 3  # the refused step changed nothing
    with pytest.raises(ConfigError, match=r"ids must be \(1, tokens\)"):
        state.step(np.array([[1], [2]]))
    with pytest.raises(ConfigError, match="rewind length must be an integer in \\[0, 3\\]"):
        state.rewind(4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="capacity must be an integer >= 1"):
            dec.start(1, bad)
    with pytest.raises(ConfigError, match="batch must be an integer >= 1"):
        dec.start(0, 4)
