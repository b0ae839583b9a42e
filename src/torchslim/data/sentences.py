"""A bundled English sentence set for evaluating compressed sentence encoders offline.

``sentences.jsonl`` (generated for torchslim by ``examples/compress_bert/make_sentences.py``
from hand-written phrase pairs) holds two splits:

* ``eval``: 400 paraphrase pairs ``(a, b)``: the same event worded twice (synonyms, word order);
* ``train``: 2,400 single sentences built from events never used in ``eval``; calibration
  (Wanda, SparseGPT, GPTQ, head importance) and distillation take their text from here.

:func:`evaluate_encoder` compares a compressed encoder with the original on ``eval``: the mean
cosine between their embeddings of every sentence, and paraphrase retrieval recall@1 (for each
``a``, is its own ``b`` the nearest of all ``b``?) of both.

Example:
    >>> from torchslim.data.sentences import paraphrase_pairs, train_sentences
    >>> a, b = paraphrase_pairs()
    >>> len(a) == len(b) == 400, len(train_sentences()) >= 2000
    (True, True)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._registry import lookup
from torchslim.errors import ConfigError

__all__ = [
    "SENTENCES_FILE",
    "paraphrase_pairs",
    "train_sentences",
    "calibration_sentences",
    "calibration_batches",
    "recall_at_1",
    "evaluate_encoder",
]

SENTENCES_FILE = Path(__file__).with_name("sentences.jsonl")


def _text() -> Any:
    """The tokenizer and embedder of the ``pretrained:`` text models (``zoo.pretrained``): the zoo
    registers them with its ``pretrained`` model source, as this layer sits below the zoo."""
    return lookup("model", "pretrained").meta["text_helpers"]()


@lru_cache(maxsize=1)
def _rows() -> tuple[dict[str, str], ...]:
    if not SENTENCES_FILE.is_file():
        raise ConfigError(f"the bundled sentence set {SENTENCES_FILE} is missing; reinstall torchslim")
    with open(SENTENCES_FILE) as f:
        return tuple(json.loads(line) for line in f if line.strip())


def paraphrase_pairs(n: int | None = None) -> tuple[list[str], list[str]]:
    """The ``eval`` paraphrase pairs as two aligned lists ``(a, b)`` (the first ``n`` if given)."""
    rows = [r for r in _rows() if r["split"] == "eval"][:n]
    return [r["a"] for r in rows], [r["b"] for r in rows]


def train_sentences(n: int | None = None) -> list[str]:
    """The ``train`` sentences (disjoint from every ``eval`` event), the first ``n`` if given."""
    return [r["text"] for r in _rows() if r["split"] == "train"][:n]


def calibration_sentences(n: int = 128) -> list[str]:
    """``n`` calibration sentences: the first ``n`` of the ``train`` split."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of calibration sentences must be a positive integer; got {n!r}")
    return train_sentences(n)


def calibration_batches(
    sentences: Sequence[str] | None = None, *, model: str = "minilm", batch_size: int = 16, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Tokenized calibration batches (dicts of ``input_ids`` / ``attention_mask`` / ``token_type_ids``).

    Sentences are sorted by length before batching so a batch holds little padding (padded
    positions would otherwise count as calibration tokens).

    Args:
        sentences: the text (default: :func:`calibration_sentences`).
        model: the ``pretrained:`` model whose tokenizer to use.

    Raises:
        ConfigError: ``sentences`` is empty or holds only blank strings.
    """
    text_models = _text()
    if sentences is None:
        sentences = calibration_sentences()
    if isinstance(sentences, str):
        raise ConfigError("calibration text must be a list of sentences, not one string")
    text = [s for s in sentences if isinstance(s, str) and s.strip()]
    if not text:
        raise ConfigError(
            f"calibration text is empty ({len(sentences)} sentences, none with any text); "
            "pass a list of non-empty sentences, e.g. torchslim.data.sentences.calibration_sentences()"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}")
    tok = text_models.tokenizer(model)
    text.sort(key=lambda s: len(tok.tokenize(s)))
    return [
        text_models.tokenize(model, text[i : i + batch_size], max_length=max_length)
        for i in range(0, len(text), batch_size)
    ]


def recall_at_1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows ``i`` of ``a`` whose most cosine-similar row of ``b`` is row ``i``."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    hits = (a @ b.T).argmax(dim=1) == torch.arange(a.shape[0])
    return float(hits.float().mean())


def evaluate_encoder(
    model: nn.Module,
    reference: nn.Module | dict[str, Any] | None = None,
    *,
    name: str = "minilm",
    n_pairs: int | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Embedding fidelity and paraphrase retrieval of ``model`` against the original encoder.

    Args:
        model: a (compressed) sentence encoder taking ``(input_ids, attention_mask, token_type_ids)``.
        reference: the original model, or the dict this function returned for it (its
            embeddings are reused), or ``None`` (only recall@1 of ``model``).
        n_pairs: evaluate on the first ``n_pairs`` pairs (all 400 by default).

    Returns:
        ``{"mean_cosine", "min_cosine", "recall_at_1", "reference_recall_at_1",
        "recall_drop", "pairs", "embeddings"}`` (``embeddings``: the model's, to pass back
        as ``reference`` later; the cosine entries are ``None`` without a reference).
    """
    a, b = paraphrase_pairs(n_pairs)
    emb = _text().embed(model, a + b, name=name, batch_size=batch_size)
    out: dict[str, Any] = {"pairs": len(a), "recall_at_1": recall_at_1(emb[: len(a)], emb[len(a) :]), "embeddings": emb}
    if reference is None:
        out.update(mean_cosine=None, min_cosine=None, reference_recall_at_1=None, recall_drop=None)
        return out
    ref = reference if isinstance(reference, dict) else evaluate_encoder(reference, None, name=name, n_pairs=n_pairs, batch_size=batch_size)
    cos = torch.nn.functional.cosine_similarity(emb.float(), ref["embeddings"].float(), dim=-1)
    out.update(
        mean_cosine=float(cos.mean()), min_cosine=float(cos.min()), reference_recall_at_1=ref["recall_at_1"],
        recall_drop=ref["recall_at_1"] - out["recall_at_1"],
    )
    return out
