"""Depth pruning of decoder LLMs: block influence (ShortGPT) and removal of whole layers.

Block influence (Men et al. 2024, "ShortGPT"): a decoder layer that barely turns its input hidden
state into something else can go. On calibration tokens,
``BI_i = 1 - mean over tokens of cos(h_in, h_out)`` for layer ``i``, with ``h_in`` the hidden
state entering the layer and ``h_out`` the one leaving it (residual included); the layers with
the lowest influence are removed first.

:func:`remove_layers_` deletes layers from the model's layer list and keeps it a stock
transformers model: each remaining attention's ``layer_idx`` (its slot in the KV cache) is
re-numbered, ``config.num_hidden_layers`` set, and every per-layer list of the config
(``layer_types``: sliding / full attention of Gemma-3, Qwen2 ...) cut the same way, so
``save_pretrained`` reloads with ``AutoModelForCausalLM.from_pretrained`` and ``generate`` builds
its cache from the config. The removal is recorded as a ``"prune_depth"`` plan that ``ts.load``
replays.

Example:
    >>> import torch, transformers
    >>> from torchslim.prune import block_influence, remove_layers_
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> len(block_influence(model, torch.randint(0, 64, (2, 16))))
    4
    >>> remove_layers_(model, [1, 2])
    [0, 3]
    >>> model.config.num_hidden_layers, [l.self_attn.layer_idx for l in model.model.layers]
    (2, [0, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torchslim._modelinfo import record_plan, register_plan_kind
from torchslim._utils import is_int
from torchslim.errors import CheckpointError, ConfigError
from torchslim.prune._calib import calibration_batches, run_batches

__all__ = ["block_influence", "decoder_layers", "remove_layers_"]

KIND = "prune_depth"


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of a decoder's layers: ``model.model.layers`` for transformers decoders, else
    the first ``ModuleList`` named layers / layer / h / blocks.

    Raises:
        ConfigError: the model has no such list.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return "model.layers", layers
    from torchslim.graph.blocks import layer_list

    return layer_list(model)


def _hidden(x: Any) -> torch.Tensor | None:
    """The hidden state in a layer's output (a tensor, or the first item of a tuple)."""
    if isinstance(x, (tuple, list)) and x:
        x = x[0]
    return x if isinstance(x, torch.Tensor) and x.is_floating_point() else None


def block_influence(model: nn.Module, data: Any, *, tokenizer: Any = None, max_tokens: int = 2048) -> list[float]:
    """ShortGPT block influence of every decoder layer: ``1 - mean cos(layer input, layer output)``.

    Args:
        model: a decoder (``model.model.layers`` or a layer list the module doc names); not changed.
        data: calibration data: a text data spec (``"shakespeare"``: windows of its calibration
            split), a ``TextBundle``, token ids ``(batch, tokens)``, or batches of model inputs.
        tokenizer: for a text spec (default: the model's own, for a ``pretrained:`` LLM).
        max_tokens: tokens drawn from a text spec.

    Returns:
        One value per layer, in layer order (near 0: the layer hardly changes its input).

    Raises:
        ConfigError: no layer list, no or bad calibration data, a layer whose hidden state the
            hooks cannot read.
    """
    _, layers = decoder_layers(model)
    batches = calibration_batches(model, data, tokenizer=tokenizer, max_tokens=max_tokens, what="block_influence")
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def hook_for(i: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            h_in = _hidden(args[0] if args else kwargs.get("hidden_states"))
            h_out = _hidden(out)
            if h_in is None or h_out is None or h_in.shape != h_out.shape:
                raise ConfigError(f"block_influence: cannot read the hidden state entering and leaving layer {i} "
                                  f"({type(module).__name__})")
            cos = torch.nn.functional.cosine_similarity(h_in.detach().double(), h_out.detach().double(), dim=-1)
            sums[i] += float(cos.sum())
            counts[i] += cos.numel()

        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        run_batches(model, batches)
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / c if c else 0.0 for s, c in zip(sums, counts)]


def _configs(model: nn.Module) -> list[Any]:
    """The config objects that describe the layer list: the model's, and its text config (Gemma-3)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    out = [cfg]
    get = getattr(cfg, "get_text_config", None)
    text = get() if callable(get) else None
    if text is not None and text is not cfg:
        out.append(text)
    return out


def _check(layers: Any, n: int) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ConfigError(f"layers must be a list of layer indices (integers in [0, {n})); got {layers!r}")
    bad = [i for i in layers if not is_int(i) or not 0 <= int(i) < n]
    if bad:
        raise ConfigError(f"layer indices must be integers in [0, {n}); got {bad}")
    idx = [int(i) for i in layers]
    if len(set(idx)) != len(idx):
        dup = sorted({i for i in idx if idx.count(i) > 1})
        raise ConfigError(f"layer indices must be distinct; {dup} given more than once")
    if len(idx) >= n:
        raise ConfigError(f"removing layers {sorted(idx)} leaves none of the {n}; keep at least one")
    return sorted(idx)


def _remove(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Remove the checked ``layers``; returns the original indices kept."""
    _, blocks = decoder_layers(model)
    n = len(blocks)
    gone = set(layers)
    keep = [i for i in range(n) if i not in gone]
    configs = _configs(model)
    # every per-layer list of the config (layer_types, ...) is cut like the layer list
    cuts = [(c, k, type(v)([v[i] for i in keep])) for c in configs for k, v in vars(c).items()
            if isinstance(v, (list, tuple)) and len(v) == n and not k.startswith("_")]
    kept = [blocks[i] for i in keep]
    for i in range(n - 1, -1, -1):
        del blocks[i]
    for j, blk in enumerate(kept):
        blocks.append(blk)
        for m in blk.modules():
            if is_int(getattr(m, "layer_idx", None)):
                m.layer_idx = j
    for c in configs:
        if hasattr(c, "num_hidden_layers"):
            c.num_hidden_layers = len(keep)
    for c, k, v in cuts:
        setattr(c, k, v)
    return keep


def remove_layers_(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Delete decoder layers ``layers`` (indices into the layer list) from ``model``, in place.

    The remaining layers' ``layer_idx`` are re-numbered, ``config.num_hidden_layers`` and every
    per-layer list of the config (``layer_types``) follow, and the removal is recorded (plan kind
    ``"prune_depth"``) so ``ts.save`` / ``ts.load`` rebuild it. An empty list changes nothing.

    Returns:
        The original indices of the layers kept.

    Raises:
        ConfigError: an index that is not an integer in range, an index given twice, or a removal
            of every layer. Nothing is checked after a change: the model is then unchanged.
    """
    name, blocks = decoder_layers(model)
    n = len(blocks)
    idx = _check(layers, n)
    if not idx:
        return list(range(n))
    keep = _remove(model, idx)
    record_plan(model, {"kind": KIND, "layers": idx, "num_layers": n, "list": name})
    return keep


def _replay(model: nn.Module, plan: dict[str, Any]) -> None:
    _, blocks = decoder_layers(model)
    if len(blocks) != plan.get("num_layers", len(blocks)):
        raise CheckpointError(f"cannot replay the saved {KIND} plan: it removed layers of a {plan.get('num_layers')}-layer "
                              f"list, the rebuilt model has {len(blocks)}")
    try:
        _remove(model, _check(plan.get("layers", []), len(blocks)))
    except ConfigError as exc:
        raise CheckpointError(f"cannot replay the saved {KIND} plan: {exc}") from exc


register_plan_kind(KIND, _replay)
