"""Structured pruning of transformers: attention heads, FFN neurons and whole layers.

Works on Hugging Face BERT-style encoders (``query``/``key``/``value`` + ``output.dense``) and
Llama-style decoders (``q_proj``/``k_proj``/``v_proj``/``o_proj``, grouped-query attention),
wherever they sit inside a model (e.g. :class:`~torchslim.zoo.pretrained.SentenceEncoder`).

* Head importance (Michel et al. 2019): a gate ``g_h = 1`` multiplies each head's context
  vector before the output projection; importance is ``|dL/dg_h|`` accumulated over calibration
  batches. ``L`` is the user's ``loss_fn(output, batch)`` when given (a task loss, as in the
  paper); otherwise a label-free sensitivity: ``L = <output, r>`` with a fresh Gaussian ``r``
  per batch, whose squared gate gradient estimates ``||d output / d g_h||^2``. Scores are
  normalised per layer (L2), as in the paper, then ranked globally.
* FFN neurons: the same gates on the input of the down projection (``output.dense`` /
  ``down_proj``), i.e. a first-order Taylor importance per intermediate neuron.
* Layers: drop whole blocks from the model's layer list.

This module holds the importance only. The blocks are found by :mod:`torchslim.graph.blocks`,
which also turns a list of heads (or neurons) into the indices to keep of every projection
(``q/k/v`` rows, ``o`` columns; for GQA whole key/value heads go when every query head of their
group goes); the graph's one transactional surgery, :func:`torchslim.graph.surgery.slice_model_`
(the one :func:`torchslim.prune.prune_channels_` uses), cuts them, so shapes really shrink. With
GQA the remaining query heads must be spread evenly over the remaining key/value heads:
importance-based pruning removes the same number from every group; an explicit head list that
breaks this raises. Every edit is recorded as a ``"prune_transformer"`` plan (the heads, neurons
or layers removed), replayed by the same surgery, so ``ts.save`` / ``ts.load`` round-trip it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchslim._layerwise import materialize_batches
from torchslim._utils import evaluating, logits_of, model_device
from torchslim.errors import CheckpointError, ConfigError
from torchslim.graph.blocks import (
    AttentionSite,
    FFNSite,
    attention_sites,
    ffn_sites,
    head_keep,
    layer_list,
    neuron_keep,
)
from torchslim.graph.surgery import slice_model_

__all__ = [
    "AttentionSite",
    "FFNSite",
    "attention_sites",
    "ffn_sites",
    "head_importance",
    "neuron_importance",
    "prune_heads_",
    "prune_ffn_",
    "drop_layers_",
    "prune_heads_by_importance_",
    "prune_ffn_by_importance_",
]

KIND = "prune_transformer"


# --------------------------------------------------------------------------- importance


def _call(model: nn.Module, batch: Any) -> Any:
    b = batch.to(model_device(model))
    return model(*b.args, **b.kwargs)


def _first_tensor(out: Any) -> torch.Tensor:
    t = logits_of(out, keys=("logits", "last_hidden_state"))
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"cannot find a tensor in the model output ({type(out).__name__}); pass loss_fn=")
    return t


def _gate_importance(
    model: nn.Module,
    targets: Mapping[str, tuple[nn.Linear, int, int]],
    calibration: Iterable[Any] | None,
    batches: int,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    what: str,
) -> dict[str, torch.Tensor]:
    """|dL/dg| of gates on the input of each ``targets[name] = (linear, units, unit_size)``."""
    data = materialize_batches(calibration, batches, what)
    gates = {n: torch.ones(units, requires_grad=True) for n, (_, units, _) in targets.items()}
    acc = {n: torch.zeros(units) for n, (_, units, _) in targets.items()}
    handles = []

    def hook_for(name: str, size: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            g = gates[name].to(x.device, x.dtype)
            shaped = x.reshape(*x.shape[:-1], -1, size) * g.reshape(-1, 1)
            return (shaped.reshape(x.shape), *args[1:])

        return hook

    for n, (lin, _, size) in targets.items():
        handles.append(lin.register_forward_pre_hook(hook_for(n, size)))
    gen = torch.Generator().manual_seed(0)
    try:
        with evaluating(model):  # every module's own mode comes back after
            for batch in data:
                out = _call(model, batch)
                if loss_fn is not None:
                    loss = loss_fn(out, batch)
                    power = 1
                else:
                    t = _first_tensor(out)
                    loss = (t * torch.randn(t.shape, generator=gen).to(t.device, t.dtype)).sum()
                    power = 2
                grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
                for n, g in zip(gates, grads):
                    if g is not None:
                        acc[n] += g.detach().abs().cpu() ** power
    finally:
        for h in handles:
            h.remove()
    return {n: (a.sqrt() if loss_fn is None else a) for n, a in acc.items()}


def head_importance(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    *,
    calibration_batches: int = 8,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    normalize: bool = True,
) -> dict[str, torch.Tensor]:
    """Michel et al. (2019) head importance per attention block: ``name -> (num_heads,)``.

    Raises:
        ConfigError: no attention block found, no or empty calibration data.
    """
    sites = attention_sites(model)
    if not sites:
        raise ConfigError("no BERT-style or Llama-style attention block found in the model")
    scores = _gate_importance(
        model, {n: (s.o, s.num_heads, s.head_dim) for n, s in sites.items()}, calibration, calibration_batches, loss_fn,
        "head importance",
    )
    if normalize:
        scores = {n: s / s.norm().clamp_min(1e-12) for n, s in scores.items()}
    return scores


def neuron_importance(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    *,
    calibration_batches: int = 8,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """First-order (Taylor) importance of every FFN intermediate neuron: ``name -> (width,)``."""
    sites = ffn_sites(model)
    if not sites:
        raise ConfigError("no BERT-style or Llama-style feed-forward block found in the model")
    return _gate_importance(
        model, {n: (s.down, s.width, 1) for n, s in sites.items()}, calibration, calibration_batches, loss_fn, "neuron importance"
    )


# --------------------------------------------------------------------------- removal (the graph's surgery)


def prune_heads_(model: nn.Module, heads: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Remove attention heads: ``heads = {attention block name: [head indices]}``, in place.

    Every entry is checked before anything changes; the graph's surgery
    (:func:`~torchslim.graph.surgery.slice_model_`) then removes them all at once.

    Returns:
        Block name -> the number of query heads left.

    Raises:
        ConfigError: an unknown block, an index out of range, a prune leaving zero heads, or
            (GQA) uneven query heads per key/value group. The model is unchanged then.
    """
    sites = attention_sites(model)
    keep: dict[str, Any] = {}
    attrs: dict[str, dict[str, int]] = {}
    for name, hs in heads.items():
        if name not in sites:
            raise ConfigError(f"no attention block named {name!r}; the model's are: {', '.join(sites) or 'none'}")
        hs = list(hs)
        if hs:  # head_keep checks the indices (head_layout)
            k, a = head_keep(sites[name], hs)
            keep.update(k)
            attrs.update(a)
    if keep:
        slice_model_(model, keep, attrs=attrs)
    _record(model, {"op": "heads", "heads": {n: sorted(int(h) for h in hs) for n, hs in heads.items() if hs}})
    return {n: s.num_heads for n, s in attention_sites(model).items()}


def prune_ffn_(model: nn.Module, neurons: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Remove FFN intermediate neurons: ``neurons = {block name: [indices]}``, in place.

    Returns:
        Block name -> the intermediate width left.

    Raises:
        ConfigError: unknown block, bad index, or a prune leaving zero neurons (model unchanged).
    """
    sites = ffn_sites(model)
    keep: dict[str, Any] = {}
    for name, idx in neurons.items():
        if name not in sites:
            raise ConfigError(f"no feed-forward block named {name!r}; the model's are: {', '.join(sites) or 'none'}")
        if idx:
            keep.update(neuron_keep(sites[name], list(idx)))
    if keep:
        slice_model_(model, keep)
    _record(model, {"op": "ffn", "neurons": {n: sorted(int(i) for i in idx) for n, idx in neurons.items() if idx}})
    return {n: s.width for n, s in ffn_sites(model).items()}


def drop_layers_(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Remove whole transformer blocks by index (of the model's layer list), in place.

    Returns:
        The original indices of the blocks left.

    Raises:
        ConfigError: bad or repeated index, or dropping every block (model unchanged).
    """
    # the one layer removal: re-numbers layer_idx, cuts per-layer config lists
    from torchslim.prune.depth import _check, _remove

    _, blocks = layer_list(model)
    keep = _remove(model, _check(layers, len(blocks)))
    _record(model, {"op": "layers", "layers": sorted(set(int(i) for i in layers))})
    return keep


# --------------------------------------------------------------------------- by importance


def _count(ratio: float, total: int, what: str) -> int:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(f"{what} ratio must be a number in [0, 1); got {ratio!r}")
    return int(round(ratio * total))


def prune_heads_by_importance_(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    ratio: float,
    *,
    calibration_batches: int = 8,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> dict[str, list[int]]:
    """Prune the globally least important ``ratio`` of attention heads (Michel et al. 2019).

    At least one head (GQA: one per surviving group, the same number per group) stays in every
    block. Returns the pruned head indices per block.

    Raises:
        ConfigError: ratio outside [0, 1), no or empty calibration data (model unchanged).
    """
    sites = attention_sites(model)
    total = sum(s.num_heads for s in sites.values())
    n_prune = _count(ratio, total, "head")
    scores = head_importance(model, calibration, calibration_batches=calibration_batches, loss_fn=loss_fn)
    ranked = sorted((float(s[h]), name, h) for name, s in scores.items() for h in range(len(s)))
    per_layer: dict[str, int] = {n: 0 for n in sites}
    budget = n_prune
    for _, name, _h in ranked:
        if budget <= 0:
            break
        if per_layer[name] + 1 < sites[name].num_heads:
            per_layer[name] += 1
            budget -= 1
    plan: dict[str, list[int]] = {}
    for name, c in per_layer.items():
        site, s = sites[name], scores[name]
        if site.groups > 1:  # the same number from every key/value group
            per_group = min(c // site.num_kv_heads, site.groups - 1)
            drop = []
            for j in range(site.num_kv_heads):
                members = list(range(j * site.groups, (j + 1) * site.groups))
                members.sort(key=lambda h: float(s[h]))
                drop += members[:per_group]
        else:
            drop = sorted(range(site.num_heads), key=lambda h: float(s[h]))[:c]
        if drop:
            plan[name] = sorted(drop)
    prune_heads_(model, plan)
    return plan


def prune_ffn_by_importance_(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    ratio: float,
    *,
    calibration_batches: int = 8,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    round_to: int = 1,
) -> dict[str, list[int]]:
    """Prune ``ratio`` of every FFN block's neurons, the least important first (per block).

    ``round_to`` keeps the width a multiple of it. Returns the pruned indices per block.
    """
    sites = ffn_sites(model)
    if not sites:
        raise ConfigError("no BERT-style or Llama-style feed-forward block found in the model")
    _count(ratio, 1, "neuron")
    scores = neuron_importance(model, calibration, calibration_batches=calibration_batches, loss_fn=loss_fn)
    plan = {}
    for name, s in scores.items():
        width = sites[name].width
        keep_n = max(round_to, int(round((1 - ratio) * width / round_to)) * round_to)
        drop = torch.argsort(s)[: max(width - keep_n, 0)].tolist()
        if drop:
            plan[name] = sorted(int(i) for i in drop)
    prune_ffn_(model, plan)
    return plan


# --------------------------------------------------------------------------- plans


def _record(model: nn.Module, plan: dict[str, Any]) -> None:
    from torchslim._modelinfo import model_info, record_plan

    if model_info(model) is not None:
        record_plan(model, {"kind": KIND, **plan})


def _replay(model: nn.Module, plan: dict[str, Any]) -> None:
    op = plan.get("op")
    try:
        if op == "heads":
            prune_heads_(model, plan["heads"])
        elif op == "ffn":
            prune_ffn_(model, plan["neurons"])
        elif op == "layers":
            drop_layers_(model, plan["layers"])
        else:
            raise CheckpointError(f"{KIND} plan has unknown op {op!r} (known: heads, ffn, layers)")
    except ConfigError as exc:
        raise CheckpointError(f"cannot replay the saved {KIND} plan: {exc}") from exc


def _register() -> None:
    from torchslim._modelinfo import register_plan_kind

    register_plan_kind(KIND, _replay)


_register()
