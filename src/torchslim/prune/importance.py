"""Channel importance criteria for structured pruning: a criterion is a callable on a group.

``criterion(model, groups, group) -> tensor[group.size]``: one score per channel of the group,
higher = more important. Scores aggregate every tensor bound to the channel (the producing conv's
filter, the next layer's input columns, BN scales...), each tensor normalised by its mean so
that large layers do not drown small ones. Registered under ``prune.importance``:
``ts.list_methods("prune.importance")``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim._registry import get_method, register_method
from torchslim.data import batches_of
from torchslim.graph.spaces import ChannelGroup, ChannelGroups
from torchslim.graph.surgery import resolve

__all__ = [
    "GroupImportance",
    "MagnitudeImportance",
    "BNScaleImportance",
    "RandomImportance",
    "FPGMImportance",
    "TaylorImportance",
    "LAMPImportance",
    "get_importance",
]


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module, attr = resolve(model, name)
    return getattr(module, attr)


def _positions(cg: ChannelGroups, group: ChannelGroup, name: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions along ``dim``, channel index in the group for each position) for one member."""
    pos, chan = cg.positions(group, name, dim)
    return torch.from_numpy(pos), torch.from_numpy(chan)


def _per_channel(cg: ChannelGroups, group: ChannelGroup, model: nn.Module, values: Any, *, weights_only: bool = True,
                 norm: int = 2, tag: str = "w") -> torch.Tensor:
    """Sum over members of (per-position reduction of ``values(tensor)``) scattered to channels.

    The per-position reductions are cached on ``cg`` per (tensor, dim, norm, tag): a tensor bound
    to many groups (a DenseNet conv reading a concatenation) is reduced once.
    """
    cache = cg.__dict__.setdefault("_reductions", {})
    score = torch.zeros(group.size, dtype=torch.float64)
    for name, dim in group.members:
        t = _tensor(model, name)
        if weights_only and t.dim() < 2:
            continue
        key = (name, dim, norm, tag)
        red = cache.get(key)
        if red is None:
            v = values(name, t)
            if v is None:
                cache[key] = red = torch.empty(0)
            else:
                v = v.detach().abs().float()
                other = [d for d in range(v.dim()) if d != dim]
                red = (v.pow(norm).sum(dim=other) if other else v.pow(norm)).double().cpu()
                cache[key] = red
        if red.numel() == 0:
            continue
        pos, chan = _positions(cg, group, name, dim)
        if len(pos) == 0:
            continue
        contrib = torch.zeros(group.size, dtype=torch.float64).index_add_(0, chan, red[pos])
        mean = contrib.mean()
        score += contrib / mean if mean > 0 else contrib
    return score


class GroupImportance:
    """Base class: ``__call__(model, groups, group) -> scores`` (higher = keep)."""

    needs_gradients = False

    def __call__(self, model: nn.Module, cg: ChannelGroups, group: ChannelGroup) -> torch.Tensor:
        raise NotImplementedError


@register_method("prune.importance", "l1", description="sum of |w| over every tensor bound to the channel")
class MagnitudeImportance(GroupImportance):
    """L-p norm of the weights bound to each channel, aggregated over the group."""

    def __init__(self, p: int = 1) -> None:
        self.p = p

    def __call__(self, model: nn.Module, cg: ChannelGroups, group: ChannelGroup) -> torch.Tensor:
        score = _per_channel(cg, group, model, lambda n, t: t, norm=self.p)
        if not score.any():  # a group bound only to 1-D tensors (norm scales, biases)
            score = _per_channel(cg, group, model, lambda n, t: t, weights_only=False, norm=self.p, tag="all")
        return score


@register_method("prune.importance", "l2", description="sum of w^2 over every tensor bound to the channel")
class L2Importance(MagnitudeImportance):
    """Squared L2 norm of the weights bound to each channel (group-aggregated)."""

    def __init__(self) -> None:
        super().__init__(p=2)


@register_method("prune.importance", "bn_scale", description="|gamma| of the BatchNorm scales (network slimming)")
class BNScaleImportance(GroupImportance):
    """Network slimming (Liu 2017): the absolute BatchNorm scale; L1 when the group has no BN."""

    def __call__(self, model: nn.Module, cg: ChannelGroups, group: ChannelGroup) -> torch.Tensor:
        types = cg.trace.module_types

        def bn(name: str, t: torch.Tensor) -> torch.Tensor | None:
            mod = name.rpartition(".")[0]
            return t if ("BatchNorm" in types.get(mod, "") and name.endswith("weight")) else None

        score = _per_channel(cg, group, model, bn, weights_only=False, norm=1, tag="bn")
        return score if score.any() else MagnitudeImportance(1)(model, cg, group)


@register_method("prune.importance", "random", description="uniform random scores (a baseline)")
class RandomImportance(GroupImportance):
    """Random scores from a seeded generator (a baseline every paper should beat)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, model: nn.Module, cg: ChannelGroups, group: ChannelGroup) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + group.id)
        return torch.rand(group.size, generator=g, dtype=torch.float64)


@register_method("prune.importance", "fpgm", description="distance to the other filters (geometric median, He 2019)")
class FPGMImportance(GroupImportance):
    """FPGM (He 2019): filters near the geometric median of their layer are redundant.

    Score = summed Euclidean distance of a channel's producing filter to all other filters of
    the same producer; the most central (smallest score) go first.
    """

    def __call__(self, model: nn.Module, cg: ChannelGroups, group: ChannelGroup) -> torch.Tensor:
        score = torch.zeros(group.size, dtype=torch.float64)
        for name, dim in group.producers or group.members:
            t = _tensor(model, name)
            if t.dim() < 2:
                continue
            pos, chan = _positions(cg, group, name, dim)
            if len(pos) < 2:
                continue
            f = t.detach().double().cpu().movedim(dim, 0)[pos].flatten(1)
            d = torch.cdist(f, f).sum(1)
            contrib = torch.zeros(group.size, dtype=torch.float64).index_add_(0, chan, d)
            mean = contrib.mean()
            score += contrib / mean if mean > 0 else contrib
        return score if score.any() else MagnitudeImportance(2)(model, cg, group)


@register_method("prune.importance", "taylor", description="first-order Taylor |w * dL/dw| (Molchanov 2017/2019)")
class TaylorImportance(GroupImportance):
    """First-order Taylor terms of the loss: sum over the channel's coupled weights of |w * dL/dw|.

    Needs gradients: ``prune_channels_(..., importance="taylor", data=loader)`` runs a few
    batches and accumulates them. This is the weight form of Molchanov's criterion (2019) with
    the per-weight terms summed in absolute value (an L1 norm of ``w * g``), not the square of
    their signed sum that the paper uses per filter: terms of opposite sign within one channel do
    not cancel, which ranks channels more stably from a few batches.
    """

    needs_gradients = True

    def __call__(self, model: nn.Module, cg: ChannelGroups, group: ChannelGroup) -> torch.Tensor:
        grads = getattr(model, "_torchslim_taylor", None)
        if grads is None:
            raise RuntimeError("taylor importance needs accumulated gradients (pass data=...)")

        def wg(name: str, t: torch.Tensor) -> torch.Tensor | None:
            g = grads.get(name)
            return None if g is None else t.detach().cpu() * g

        return _per_channel(cg, group, model, wg, norm=1, tag="taylor")


@register_method("prune.importance", "lamp", description="layer-adaptive magnitude (Lee 2021) on group L2 scores")
class LAMPImportance(GroupImportance):
    """LAMP (Lee 2021): score^2 divided by the sum of the scores^2 not smaller than it."""

    def __call__(self, model: nn.Module, cg: ChannelGroups, group: ChannelGroup) -> torch.Tensor:
        s = MagnitudeImportance(2)(model, cg, group)
        order = torch.argsort(s)
        sorted_s = s[order]
        tail = torch.flip(torch.cumsum(torch.flip(sorted_s, [0]), 0), [0])
        lamp = torch.empty_like(s)
        lamp[order] = sorted_s / tail.clamp_min(1e-30)
        return lamp


def get_importance(name: str | GroupImportance, **kwargs: Any) -> GroupImportance:
    """A criterion by registered name (``ts.list_methods('prune.importance')``) or the object itself."""
    if isinstance(name, GroupImportance) or callable(name) and not isinstance(name, (str, type)):
        return name  # type: ignore[return-value]
    cls = get_method("prune.importance", str(name))
    return cls(**kwargs) if kwargs else cls()


def accumulate_gradients(model: nn.Module, batches: Any, loss_fn: Any = None, max_batches: int = 8) -> dict[str, torch.Tensor]:
    """Sum of parameter gradients over up to ``max_batches`` labelled batches (model not changed).

    ``batches``: a ``DataBundle`` (its train split) or any iterable of ``(x, y)`` batches.
    """
    batches = batches_of(batches, where="prune_channels_")
    loss_fn = loss_fn or nn.functional.cross_entropy
    from torchslim._utils import evaluating, model_device

    device = model_device(model)
    grads: dict[str, torch.Tensor] = {}
    saved = {n: (p.grad, p.requires_grad) for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(True)
        with evaluating(model), torch.enable_grad():
            for i, (x, y) in enumerate(batches):
                if i >= max_batches:
                    break
                out = model(x.to(device))
                loss_fn(out if isinstance(out, torch.Tensor) else out[0], y.to(device)).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.detach().cpu().clone()
    finally:
        for n, p in model.named_parameters():
            p.grad, rg = saved[n]
            p.requires_grad_(rg)
    return grads

