"""Calibration batches for the data-driven pruning criteria of decoders (activation importance,
block influence): text specs become token windows of the calibration split, anything else is
taken as batches of model inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim._layerwise import materialize_batches
from torchslim._utils import evaluating, is_int, model_device
from torchslim.errors import ConfigError
from torchslim.graph.inputs import Inputs

#: token windows drawn from a text data spec: this many tokens each, this many rows a batch
WINDOW = 256
BATCH_ROWS = 4
#: batches taken at most from an iterable of model inputs
MAX_BATCHES = 256

_ACCEPTS = ("a text data spec ('shakespeare', 'text:PATH'), a TextBundle, token ids (batch, tokens), "
            "or an iterable of model inputs")


def calibration_batches(model: nn.Module, data: Any, *, tokenizer: Any = None, max_tokens: int = 2048,
                        what: str = "this criterion") -> list[Inputs]:
    """``data`` as a list of :class:`~torchslim.graph.inputs.Inputs` to run through ``model``.

    A text data spec or bundle gives ``max_tokens // 256`` windows of 256 tokens (fewer tokens
    when ``max_tokens`` is smaller) drawn, seeded, from its calibration (``train``) split and
    tokenized with ``tokenizer`` (default: the tokenizer of the ``pretrained:`` LLM the model was
    built from); the held-out split is never read. A 2-D integer tensor is token ids, split into
    batches of 4 rows; a list of already made :class:`Inputs` or any iterable of batches is taken
    as it is (at most 256 batches).

    Raises:
        ConfigError: no data, data of another kind, a bad ``max_tokens``, no tokenizer known.
    """
    if data is None:
        raise ConfigError(f"{what} needs calibration data: pass data= ({_ACCEPTS})")
    if not is_int(max_tokens) or max_tokens < 2:
        raise ConfigError(f"max_tokens must be an integer >= 2; got {max_tokens!r}")
    from torchslim.data import DataBundle, load_data
    from torchslim.data.text import TextBundle

    if isinstance(data, str):
        data = load_data(data)
    if isinstance(data, TextBundle):
        from torchslim.lm.evaluate import resolve_tokenizer

        length = min(WINDOW, int(max_tokens))
        ids = data.calibration_sequences(resolve_tokenizer(model, tokenizer), max(1, int(max_tokens) // length), length)
        return [Inputs((rows,)) for rows in ids.split(BATCH_ROWS)]
    if isinstance(data, DataBundle) and not data.labeled:
        raise ConfigError(f"data {data.spec!r} is neither text nor labelled batches; give {_ACCEPTS}")
    if isinstance(data, DataBundle):
        data = data.loader("train", 32, shuffle=False)
    if isinstance(data, torch.Tensor) and not data.is_floating_point() and data.dim() in (1, 2):
        rows = data.long().reshape(-1, data.shape[-1])
        return [Inputs((r,)) for r in rows.split(BATCH_ROWS)]
    return materialize_batches(data, MAX_BATCHES, what)


def example_of(batches: list[Inputs], tokens: int = 16) -> Inputs:
    """A small example input for a trace: the first row of the first batch, its first ``tokens``
    tokens when it is a batch of token ids."""
    first = batches[0]
    if len(first.args) == 1 and not first.kwargs and isinstance(first.args[0], torch.Tensor):
        x = first.args[0]
        if not x.is_floating_point() and x.dim() == 2:
            return Inputs((x[:1, :tokens],))
        return Inputs((x[:1],))
    return first


@torch.no_grad()
def run_batches(model: nn.Module, batches: list[Inputs]) -> None:
    """Run every batch through ``model`` in eval mode without gradients (hooks collect what they need)."""
    device = model_device(model)
    kwargs = {"use_cache": False} if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache") else {}
    with evaluating(model):
        for b in batches:
            b = b.to(device)
            model(*b.args, **{**kwargs, **b.kwargs})
