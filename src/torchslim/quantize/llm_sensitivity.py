"""Mixed precision for decoder LLMs: which decoder layers lose the most when rounded to low bits.

:func:`decoder_sensitivity` measures it, one decoder layer at a time: every ``nn.Linear`` of that
layer alone is rounded to ``bits`` (symmetric, groups of ``group_size``: the grid round-to-nearest
uses) and the model's next-token distributions on calibration windows (the text's ``train``
split, never the held-out one) are compared with the float model's: the mean KL divergence per
token (never negative, unlike a loss difference, and it sees every token's distribution, not only
the right token's probability). The weights are put back bit for bit after each
layer. :func:`mixed_layer_bits` turns the measurement into ``quantize_llm_``'s ``layer_bits``: the
``n`` most sensitive layers keep ``high`` bits (int8), the others get the body's bits.

On SmolLM2-135M the divergence is far from uniform across its 30 layers (the first and the last
layers dominate), which is why keeping a few of them in int8 buys more perplexity per byte than
int4 everywhere with a larger group (``benchmarks/llm_prune.py`` searches over ``n``).

Example:
    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...                                num_attention_heads=4, num_key_value_heads=2)
    >>> torch.manual_seed(0); model = transformers.LlamaForCausalLM(cfg).eval()  # doctest: +ELLIPSIS
    <...>
    >>> sens = decoder_sensitivity(model, torch.randint(0, 64, (2, 16)), bits=2)
    >>> len(sens)
    3
    >>> sorted(mixed_layer_bits(model, sens, 1))[0].startswith("model.layers.")
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._utils import evaluating, is_int
from torchslim.errors import ConfigError
from torchslim.graph.blocks import layer_list

__all__ = ["decoder_sensitivity", "mixed_layer_bits"]


def _rounded(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    out, cols = w.shape
    g = group if cols % group == 0 else cols
    x = w.float().reshape(out, cols // g, g)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    return (torch.round(x / scale).clamp(-qmax - 1, qmax) * scale).reshape(out, cols).to(w.dtype)


def _batches(model: nn.Module, data: Any, windows: int, length: int, seed: int, tokenizer: Any) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.is_floating_point():
            raise ConfigError(f"token ids must be an integer tensor (batch, tokens); got {tuple(data.shape)} {data.dtype}")
        return [data]
    from torchslim.quantize.llm import llm_calibration

    return llm_calibration(model, data, tokenizer=tokenizer, windows=windows, length=length, batch_size=1, seed=seed)


def _log_probs(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for ids in batches:
        o = model(ids)
        logits = o.logits if hasattr(o, "logits") else o[0] if isinstance(o, tuple) else o
        out.append(F.log_softmax(logits.float(), dim=-1))
    return out


def _kl(reference: Sequence[torch.Tensor], model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Mean over tokens of KL(float model || this model) of the next-token distributions."""
    total, count = 0.0, 0
    for ref, got in zip(reference, _log_probs(model, batches)):
        total += float((ref.exp() * (ref - got)).sum())
        count += ref.shape[0] * ref.shape[1]
    return total / max(count, 1)


@torch.no_grad()
def decoder_sensitivity(model: nn.Module, data: Any, *, bits: int = 4, group_size: int = 32, windows: int = 8,
                        length: int = 128, seed: int = 0, tokenizer: Any = None) -> list[float]:
    """Per decoder layer: how far the model's next-token distributions move (mean KL divergence
    from the float model's, nats per token) when that layer alone is rounded to ``bits`` (groups of
    ``group_size``), on calibration text.

    Args:
        model: a decoder LLM with float weights; left exactly as it was.
        data: a text data spec / ``TextBundle`` (``windows`` windows of ``length`` tokens of its
            ``train`` split) or token ids ``(batch, tokens)``.
        tokenizer: for text (default: the model's own, for a ``pretrained:`` LLM).

    Raises:
        ConfigError: bad numbers, no layer list, integer weights already, no text.
    """
    for name, v, lo in (("bits", bits, 2), ("group_size", group_size, 1), ("windows", windows, 1), ("length", length, 2)):
        if not is_int(v) or v < lo or (name == "bits" and v > 8):
            raise ConfigError(f"{name} must be an integer >= {lo}{' and <= 8' if name == 'bits' else ''}; got {v!r}")
    _, layers = layer_list(model)
    batches = _batches(model, data, windows, length, seed, tokenizer)
    with evaluating(model):
        reference = _log_probs(model, batches)
        out = []
        for block in layers:
            linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
            if any(not m.weight.is_floating_point() for m in linears):
                raise ConfigError("decoder_sensitivity measures float layers; this model is quantized already")
            saved = [m.weight.detach().clone() for m in linears]
            try:
                for m in linears:
                    m.weight.copy_(_rounded(m.weight, bits, group_size))
                out.append(_kl(reference, model, batches))
            finally:
                for m, w in zip(linears, saved):
                    m.weight.copy_(w)
    return out


def mixed_layer_bits(model: nn.Module, sensitivity: Sequence[float], n: int, high: int = 8,
                     layers: Sequence[int] | None = None) -> dict[str, int]:
    """``layer_bits`` for :func:`~torchslim.quantize.quantize_llm_`: every Linear of the ``n`` most
    sensitive decoder layers at ``high`` bits. ``layers`` maps the model's current layer positions to
    indices of ``sensitivity`` (a model that lost layers since it was measured: the kept indices)."""
    prefix, blocks = layer_list(model)
    index = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
    if len(index) != len(blocks) or any(not 0 <= i < len(sensitivity) for i in index):
        raise ConfigError(f"layers must give one index into the {len(sensitivity)} measured layers for each of the "
                          f"model's {len(blocks)} layers; got {list(index)}")
    if not is_int(n) or n < 0:
        raise ConfigError(f"n must be an integer >= 0; got {n!r}")
    ranked = sorted(range(len(blocks)), key=lambda j: -float(sensitivity[index[j]]))[:n]
    bits: dict[str, int] = {}
    for j in ranked:
        for name, m in blocks[j].named_modules():
            if isinstance(m, nn.Linear):
                bits[f"{prefix}.{j}.{name}"] = int(high)
    return bits
