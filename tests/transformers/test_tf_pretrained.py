"""pretrained:minilm: offline load, embeddings, save/load, sentence data, ONNX input names."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.data.sentences import (
    calibration_batches,
    evaluate_encoder,
    paraphrase_pairs,
    recall_at_1,
    train_sentences,
)
from torchslim.errors import ConfigError, SpecError
from torchslim.zoo import pretrained


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return ts.create_model("pretrained:minilm")


def test_minilm_embeds_normalised_and_paraphrases_are_closest(minilm, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ex = ts.example_inputs(minilm)
    assert [t.shape[0] for t in ex] == [1, 1, 1] and ex[0].dtype == torch.long
    out = minilm(*ex)
    assert out.shape == (1, 384) and torch.allclose(out.norm(dim=-1), torch.ones(1), atol=1e-5)
    a, b = paraphrase_pairs(16)
    emb = pretrained.embed(minilm, a + b)
    assert recall_at_1(emb[:16], emb[16:]) >= 0.75
    assert sum(p.numel() for p in minilm.parameters()) == 22_565_376


def test_minilm_save_load_round_trip(minilm, tmp_path) -> None:
    path = ts.save(minilm, tmp_path / "minilm")
    loaded = ts.load(path)
    ex = ts.example_inputs(minilm)
    assert torch.allclose(loaded(*ts.example_inputs(loaded)), minilm(*ex), atol=1e-6)
    assert ts.create_model(str(path)).__class__ is pretrained.SentenceEncoder


def test_unknown_pretrained_and_bad_text() -> None:
    with pytest.raises(SpecError, match="pretrained:minilm"):
        ts.create_model("pretrained:gpt17")
    with pytest.raises(ConfigError):
        pretrained.tokenize("minilm", [])
    with pytest.raises(ConfigError, match="empty"):
        calibration_batches([])
    with pytest.raises(ConfigError, match="empty"):
        calibration_batches(["", "   "])


def test_sentence_splits_are_disjoint() -> None:
    a, b = paraphrase_pairs()
    train = set(train_sentences())
    assert len(a) >= 300 and len(train) >= 1000
    assert not (set(a) | set(b)) & train
    assert all(x != y for x, y in zip(a, b))


def test_evaluate_encoder_identity(minilm) -> None:
    ref = evaluate_encoder(minilm, n_pairs=20)
    again = evaluate_encoder(minilm, ref, n_pairs=20)
    assert again["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and again["recall_drop"] == 0.0


def test_onnx_inputs_named_like_the_tokenizer(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = pretrained.SentenceEncoder(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    ids = torch.randint(1, 128, (1, 7))
    example = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    from torchslim.export.onnx import export_fp32
    from torchslim.export.ort import ort_run

    path = export_fp32(model, example, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    ids2 = torch.randint(1, 128, (3, 11))  # other batch size and sequence length
    x2 = (ids2, torch.ones_like(ids2), torch.zeros_like(ids2))
    assert torch.allclose(ort_run(path, x2), model(*x2).detach(), atol=1e-4)
