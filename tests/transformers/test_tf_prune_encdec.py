"""Channel pruning of encoder-decoders (T5, BART, Whisper), CLIP and ALBERT's shared layers.

Their hidden states are outputs (``encoder_last_hidden_state``, CLIP's tower outputs), so their
residual widths are the interface and stay; heads (self- and cross-attention) and MLP widths are
pruned. At ratio 0.5 each keeps at most 0.6 of its MACs, its outputs keep their structure, and
backward runs. T5 sets its head width apart (``d_kv``), so its config describes the result and it
reloads with stock ``from_pretrained``; the others tie the head width to the hidden width, and the
plan says their config cannot describe pruned heads.
"""

from __future__ import annotations

import pytest
import torch

import torchslim as ts

transformers = pytest.importorskip("transformers")
tf = transformers

V = 128


def _ids(length: int = 8) -> torch.Tensor:
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(0))


def _t5():
    m = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                                  decoder_start_token_id=0))
    return m, {"input_ids": _ids(), "decoder_input_ids": _ids(5)}


def _bart():
    m = tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2,
                                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                                      decoder_ffn_dim=128, max_position_embeddings=32))
    return m, {"input_ids": _ids(), "decoder_input_ids": _ids(5)}


def _whisper():
    m = tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1))
    return m, {"input_features": torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0)), "decoder_input_ids": _ids(5)}


def _clip():
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                           patch_size=8),
        projection_dim=32)
    return tf.CLIPModel(cfg), {"input_ids": _ids(), "pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def _albert():
    m = tf.AlbertModel(tf.AlbertConfig(vocab_size=V, embedding_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, max_position_embeddings=32))
    return m, {"input_ids": _ids()}


MODELS = {"t5": _t5, "bart": _bart, "whisper": _whisper, "clip": _clip, "albert": _albert}


def _tensors(out) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_encoder_decoders_clip_albert_prune(name: str) -> None:
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model.eval()
    with torch.no_grad():
        before_out = model(**x)
    before = ts.profile(model, x, latency=False, size=False).macs
    plan = ts.prune_channels_(model, x, ratio=0.5)
    assert ts.profile(model, x, latency=False, size=False).macs / before <= 0.6
    with torch.no_grad():
        out = model(**x)
    assert list(out.keys()) == list(before_out.keys())
    assert _tensors(out) == _tensors(before_out)  # logits, embeddings and exposed hidden states keep their shapes
    model.train()
    out = model(**x)
    sum(v.float().sum() for v in out.values() if isinstance(v, torch.Tensor)).backward()
    if name == "albert":  # one layer module shared by every layer: pruned once, used three times
        assert len(model.encoder.albert_layer_groups[0].albert_layers) == 1
        assert model.encoder.albert_layer_groups[0].albert_layers[0].ffn.out_features == 64
    if name == "t5":
        assert plan.config == {"d_ff": 64, "num_heads": 2} and plan.config_note is None
    else:
        assert plan.config_note is not None and "cannot describe" in plan.config_note


def test_t5_reloads_with_stock_from_pretrained(tmp_path) -> None:
    """Self- and cross-attention heads go together (T5 reuses one position bias across layers)."""
    torch.manual_seed(0)
    model, x = _t5()
    model.eval()
    ts.prune_channels_(model, x, ratio=0.5)
    assert model.decoder.block[0].layer[1].EncDecAttention.q.out_features == 32
    with torch.no_grad():
        ref = model(**x).logits
    model.save_pretrained(tmp_path)
    stock = tf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(stock(**x).logits, ref, atol=1e-5)
