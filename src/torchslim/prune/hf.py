"""Channel pruning of transformers models: uniform widths across layers, the config kept in step.

A transformers config holds one ``intermediate_size``, one head count, one ``hidden_size`` for
every layer, so a pruned model reloads with stock ``from_pretrained`` only when each layer keeps
the same count. :func:`choose_uniform` is the allocation ``prune_channels_`` uses for them
(``PruneConfig.uniform_layers``, on by default for transformers models): groups that play the same
part in every layer (the heads of layer ``i``, its MLP width) form a *class* and keep one count;
under ``global_ranking`` a class competes with its importance summed over its layers (k-th least
important channel of each layer, averaged). Where the config derives the head width from the
hidden width (``hidden_size // num_heads``: BERT, GPT-2, OPT, Falcon), the residual width follows
the kept heads (``hidden = heads * head_dim``) so the config can still describe the result.

:func:`hf_config_sync` rewrites ``model.config`` to the model's widths (surgery already does it
for every pruning; see :mod:`torchslim.graph.surgery`), and says when a config cannot describe
them (widths that differ across layers: ``ts.save`` / ``ts.load`` keep those).

Example:
    >>> import torch, transformers, torchslim as ts
    >>> cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
    ...                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> plan = ts.prune_channels_(model, {"input_ids": torch.randint(0, 128, (1, 8))}, ratio=0.5)
    >>> plan.config
    {'hidden_size': 32, 'intermediate_size': 64, 'num_attention_heads': 2, 'num_key_value_heads': 1}
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch import nn

from torchslim._select import matches
from torchslim.graph.spaces import ChannelGroups

__all__ = ["choose_uniform", "config_changes", "config_values", "group_ratio", "hf_config_sync", "layer_classes",
           "uniform_default"]

log = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def uniform_default(model: nn.Module, uniform_layers: bool | None) -> bool:
    """``PruneConfig.uniform_layers`` resolved: None is on for transformers models."""
    from torchslim.graph.surgery import is_hf_model

    return is_hf_model(model) if uniform_layers is None else bool(uniform_layers)


def hf_config_sync(model: nn.Module) -> Any:
    """Rewrite ``model.config`` (a transformers model) to the model's current widths.

    ``prune_channels_`` and every surgery do this already; call it after changing widths by other
    means. Returns what was set and whether stock ``from_pretrained`` rebuilds the model from the
    config (``reloadable``; ``note()`` says why not), or None for a model that is not a
    transformers model.
    """
    from torchslim.graph.surgery import sync_config

    done = sync_config(model)
    return None if done is None else done[0]


def config_values(model: nn.Module) -> dict[str, Any]:
    """The size fields of ``model.config`` (sub-configs as ``text_config.hidden_size``), for a diff."""
    from torchslim.graph.surgery import config_fields

    return config_fields(model)


def config_changes(model: nn.Module, before: dict[str, Any]) -> tuple[dict[str, int], str | None]:
    """(fields of ``model.config`` that differ from ``before``, a one-line note when the config
    cannot describe the model: also logged as a warning). Surgery has already synced the config."""
    changed = {k: v for k, v in config_values(model).items() if before.get(k) != v and type(v) is int}
    done = hf_config_sync(model)
    note = done.note() if done is not None else None
    if note:
        log.warning("%s", note)
    return changed, note


def layer_classes(cg: ChannelGroups) -> list[list[int]]:
    """Indices (into ``cg.groups``) of the groups that play the same part in each layer: same
    size and head width, and the same bound tensors once layer numbers are taken out of their
    names (``model.layers.0.mlp.up_proj.weight`` and ``model.layers.1...`` match)."""
    classes: dict[Any, list[int]] = {}
    for i, g in enumerate(cg.groups):
        names = frozenset((_LAYER_INDEX.sub("#", n), d) for n, d in g.members)
        classes.setdefault((g.size, g.head_dim, names), []).append(i)
    return list(classes.values())


def _kept_count(size: int, n_rm: int, round_to: int, min_channels: int) -> int:
    kept = size - n_rm
    if round_to > 1:
        kept = int(math.ceil(kept / round_to) * round_to)
    return max(min(size, kept), min(min_channels, size), 1)


def group_ratio(g: Any, ratios: dict[str, float] | None) -> float | None:
    """The ratio of the first ``ratios`` pattern matching a module of group ``g`` (None: none does)."""
    for pattern, r in (ratios or {}).items():
        if any(matches(n.rpartition(".")[0], pattern) for n, _ in (g.producers or g.members)):
            return r
    return None


def choose_uniform(
    model: nn.Module,
    cg: ChannelGroups,
    scores: list[torch.Tensor],
    ratio: float,
    *,
    global_ranking: bool,
    ratios: dict[str, float] | None,
    round_to: int,
    min_channels: int,
    scale: dict[int, float] | None = None,
) -> tuple[set[int], list[dict[str, Any]]]:
    """What ``prune_channels_`` removes with ``uniform_layers``: one kept count per class of
    :func:`layer_classes`; each layer removes its own least important channels.

    Returns ``(removed channels, [{"id", "size", "kept"} per group])`` like the per-group allocation.
    """
    classes = layer_classes(cg)
    kept: dict[int, int] = {}  # class index -> kept count
    if global_ranking:
        pool: list[tuple[float, int, int]] = []
        for c, members in enumerate(classes):
            normed = []
            for i in members:
                s = scores[i].double()
                normed.append(torch.sort(s / s.mean() if s.mean() > 0 else s).values)
            summed = torch.stack(normed).mean(0)  # importance of the k-th least important channel, over layers
            pool += [(float(v), c, k) for k, v in enumerate(summed.tolist())]
        pool.sort()
        total = sum(cg.groups[i].size for members in classes for i in members)
        budget = int(math.floor(total * ratio))
        removed_n = {c: 0 for c in range(len(classes))}
        for _, c, _k in pool:
            members = classes[c]
            size, cost = cg.groups[members[0]].size, len(members)
            if budget < cost:
                continue
            if _kept_count(size, removed_n[c] + 1, 1, min_channels) >= size - removed_n[c]:
                continue  # at its floor
            removed_n[c] += 1
            budget -= cost
        for c, members in enumerate(classes):
            kept[c] = _kept_count(cg.groups[members[0]].size, removed_n[c], round_to, min_channels)
    else:
        for c, members in enumerate(classes):
            size = cg.groups[members[0]].size
            want = size * ratio
            if scale:
                want = min(want * sum(scale.get(cg.groups[i].id, 1.0) for i in members) / len(members), size * 0.8)
            kept[c] = _kept_count(size, int(math.floor(want + 1e-9)), round_to, min_channels)
    _couple_hidden_to_heads(model, cg, classes, kept)
    kept_of = {i: kept[c] for c, members in enumerate(classes) for i in members}
    if ratios and not global_ranking:  # per-module ratios the user gave win (layers may then differ)
        for i, g in enumerate(cg.groups):
            r = group_ratio(g, ratios)
            if r is not None:
                kept_of[i] = _kept_count(g.size, int(math.floor(g.size * r + 1e-9)), round_to, min_channels)
    removed: set[int] = set()
    report: list[dict[str, Any]] = []
    for i, (g, s) in enumerate(zip(cg.groups, scores)):
        order = torch.argsort(s, stable=True)[: g.size - kept_of[i]].tolist()
        removed.update(g.channels[j] for j in order)
        report.append({"id": g.id, "size": g.size, "kept": kept_of[i]})
    return removed, report


def _residual_class(model: nn.Module, cg: ChannelGroups, classes: list[list[int]]) -> int | None:
    """The class of the residual stream: the group bound to the input embedding's width."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # CLIP: two towers, no one input embedding
        return None
    w = getattr(emb, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is w}
    for c, members in enumerate(classes):
        if any((n, 1) in cg.groups[i].members for i in members for n in names):
            return c
    return None


def _couple_hidden_to_heads(model: nn.Module, cg: ChannelGroups, classes: list[list[int]], kept: dict[int, int]) -> None:
    """Configs with ``head_dim = hidden_size // num_heads``: the residual keeps ``heads * head_dim``
    when heads are pruned."""
    from torchslim.graph.surgery import head_dim_free

    if head_dim_free(model) is not False:
        return
    r = _residual_class(model, cg, classes)
    if r is None:
        return
    hidden = cg.groups[classes[r][0]].size
    wanted = set()
    for c, members in enumerate(classes):
        g = cg.groups[members[0]]
        if g.head_dim is None or hidden % (g.size * g.head_dim):
            continue
        per_unit = hidden // (g.size * g.head_dim)  # query heads per prunable unit (grouped-query attention)
        wanted.add(kept[c] * per_unit * g.head_dim)
    # heads kept whole (Falcon's multi-query heads cannot be pruned): the residual is pruned all
    # the same, and the plan says the config cannot describe it
    if len(wanted) == 1 and 0 < (w := wanted.pop()) < hidden:
        kept[r] = w
