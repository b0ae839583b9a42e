"""Structured channel pruning that really shrinks the model: ``ts.prune_channels_``.

Finds the coupled channel groups (``torchslim.graph.spaces``), scores every channel with an
importance criterion, chooses what to remove (uniform ratio, global ranking, per-module ratios,
``round_to``, a minimum width, or a MACs / params / latency budget), and cuts it out of every
bound tensor with transactional surgery. The plan (the kept indices of every changed tensor) is
recorded on the model, so ``ts.save`` / ``ts.load`` rebuild the pruned architecture.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim._modelinfo import record_plan, register_plan_kind
from torchslim._select import Selector, renamed_argument, select_modules
from torchslim.errors import ConfigError, ModelRunError
from torchslim.graph.inputs import as_inputs
from torchslim.graph.spaces import ChannelGroups, analyse, meta_copy, to_meta
from torchslim.graph.state import clone_module, preserved
from torchslim.graph.surgery import slice_model_
from torchslim.prune._widths import DEFAULT_MULTIPLE, allocate
from torchslim.prune.config import Budget, PruneConfig
from torchslim.prune.hf import choose_uniform, config_changes, config_values, group_ratio, uniform_default
from torchslim.prune.importance import accumulate_gradients, get_importance

__all__ = ["Budget", "ChannelPlan", "PruneConfig", "latency_sensitivity", "prune_channels_", "replay_channel_plan"]

KIND = "prune_channels"


@dataclass
class ChannelPlan:
    """What ``prune_channels_`` removed; ``to_dict()`` is what ``plan.json`` stores."""

    ratio: float
    importance: str
    removed_channels: int
    total_channels: int
    groups: list[dict[str, Any]] = field(default_factory=list)  # per group: id, size, kept
    keep: dict[str, list[list[int] | None]] = field(default_factory=dict)
    budget: dict[str, Any] | None = None
    achieved: dict[str, float] = field(default_factory=dict)
    left_whole: list[int] = field(default_factory=list)  # groups whose removal breaks the forward
    attrs: dict[str, dict[str, int]] = field(default_factory=dict)  # module attributes set (head counts)
    config: dict[str, int] = field(default_factory=dict)  # transformers config fields rewritten
    allocation: str = "uniform"
    config_note: str | None = None  # why save_pretrained would not reload it (prune.hf), None when it would

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self)}


def _is_config(value: Any) -> bool:
    if isinstance(value, PruneConfig):
        return True
    names = set(PruneConfig.field_names())
    return isinstance(value, dict) and all(isinstance(k, str) and k in names for k in value)


def _left_whole(model: nn.Module, cfg: PruneConfig) -> tuple[str, ...]:
    """The module patterns whose channels stay whole: ``skip``, and every layer ``modules`` leaves out."""
    Selector(cfg.modules, cfg.skip).check(n for n, _ in model.named_modules())  # a pattern selecting nothing: refused
    if cfg.modules is None:
        return tuple(cfg.skip)
    chosen = set(select_modules(model, cfg.modules, None, kinds=None))
    others = [n for n, m in model.named_modules() if n and n not in chosen and next(m.parameters(False), None) is not None]
    return (*cfg.skip, *others)


def _kept_count(size: int, ratio: float, round_to: int, min_channels: int) -> int:
    kept = size - int(math.floor(size * ratio + 1e-9))
    if round_to > 1:
        kept = int(math.ceil(kept / round_to) * round_to)
    return max(min(size, kept), min(min_channels, size))


def _choose(
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
    uniform_layers: bool = False,
    width_multiple: int = 1,
) -> tuple[set[int], list[dict[str, Any]]]:
    if uniform_layers:  # the same count in every layer, so a transformers config describes it (prune.hf)
        return choose_uniform(model, cg, scores, ratio, global_ranking=global_ranking, ratios=ratios,
                              round_to=round_to, min_channels=min_channels, scale=scale)
    removed: set[int] = set()
    report = []
    if global_ranking:
        pool = []
        for g, s in zip(cg.groups, scores):
            norm = s / s.mean() if s.mean() > 0 else s
            pool += [(float(v), g.id, i) for i, v in enumerate(norm.tolist())]
        pool.sort()
        budget = int(math.floor(len(pool) * ratio))
        left = {g.id: g.size for g in cg.groups}
        floor = {g.id: _kept_count(g.size, 1.0, round_to, min_channels) for g in cg.groups}
        cut: dict[int, list[int]] = {g.id: [] for g in cg.groups}
        for _, gid, i in pool:
            if budget <= 0:
                break
            if left[gid] - 1 < max(floor[gid], 1):
                continue
            cut[gid].append(i)
            left[gid] -= 1
            budget -= 1
        for g, s in zip(cg.groups, scores):
            n_rm = len(cut[g.id])
            kept = _kept_count(g.size, n_rm / g.size, round_to, min_channels)
            order = torch.argsort(s)[: g.size - kept].tolist()
            removed.update(g.channels[i] for i in order)
            report.append({"id": g.id, "size": g.size, "kept": kept})
        return _keep_minimum(cg, scores, removed, report, min_channels)
    # Largest-remainder allocation: every group removes ~ratio of its channels, and the fractions
    # left over are handed out so the total moves one channel at a time as the ratio grows (a
    # budget search can then land within a channel of its target).
    want = [g.size * (r if (r := group_ratio(g, ratios)) is not None else ratio) for g in cg.groups]
    if scale:  # latency-aware: groups where a MAC costs more time give more channels
        want = [min(w * scale.get(g.id, 1.0), g.size * _MAX_SCALED_RATIO) for w, g in zip(want, cg.groups)]
    if width_multiple > 1:  # kept widths held to kernel blocks, removed a block at a time (prune._widths)
        counts = allocate(cg.groups, want, width_multiple, min_channels=min_channels)
    else:
        counts = [int(math.floor(w + 1e-9)) for w in want]
        extra = int(round(sum(want))) - sum(counts)
        by_rem = sorted(range(len(want)), key=lambda i: (counts[i] - want[i], i))
        for i in by_rem[: max(extra, 0)]:
            counts[i] += 1
    for g, s, n_rm in zip(cg.groups, scores, counts):
        kept = _kept_count(g.size, n_rm / g.size if g.size else 0.0, round_to, min_channels)
        order = _lowest(s, g.size - kept, cg.segments(g) if g.size - kept else [], min_channels)
        removed.update(g.channels[i] for i in order)
        report.append({"id": g.id, "size": g.size, "kept": g.size - len(order)})
    return _keep_minimum(cg, scores, removed, report, min_channels)


def _lowest(s: torch.Tensor, n: int, segments: list[np.ndarray], min_channels: int) -> list[int]:
    """The ``n`` channels of a group to remove: the lowest-scored, or, when the group spans the
    segments of a split/cat (:meth:`ChannelGroups.segments`), the lowest-scored of each segment in
    proportion to its size (largest remainder), each keeping ``min(min_channels, its size)``: a
    criterion that scores one segment lower (bound to fewer tensors) would otherwise empty it."""
    if n <= 0:
        return []
    if len(segments) <= 1:
        return torch.argsort(s, stable=True)[:n].tolist()
    sizes = [len(seg) for seg in segments]
    room = [sz - min(min_channels, sz) for sz in sizes]
    want = [n * sz / sum(sizes) for sz in sizes]
    take = [min(int(math.floor(w + 1e-9)), r) for w, r in zip(want, room)]
    for i in sorted(range(len(sizes)), key=lambda i: (take[i] - want[i], i)):  # largest remainders first
        if sum(take) >= n:
            break
        if take[i] < room[i]:
            take[i] += 1
    while sum(take) < n and any(t < r for t, r in zip(take, room)):  # what capped segments could not take
        i = max((i for i in range(len(sizes)) if take[i] < room[i]), key=lambda i: room[i] - take[i])
        take[i] += 1
    out: list[int] = []
    for seg, k in zip(segments, take):
        if k:
            idx = torch.as_tensor(seg, dtype=torch.long)
            out += idx[torch.argsort(s[idx], stable=True)[:k]].tolist()
    return out


def _keep_minimum(cg: ChannelGroups, scores: list[torch.Tensor], removed: set[int], report: list[dict[str, Any]],
                  min_channels: int) -> tuple[set[int], list[dict[str, Any]]]:
    """``min_channels`` for every bound tensor, not only every group: a group that spans the
    segments of a split / cat (a channel shuffle, RAFT's hidden state and context) can lose all of
    one segment's channels while keeping its own minimum. Each tensor dimension left with fewer
    than ``min(min_channels, its size)`` entries gets back its best-scored channels."""
    if not removed or min_channels < 1:
        return removed, report
    score_of: dict[int, float] = {}
    group_of: dict[int, int] = {}
    for g, s in zip(cg.groups, scores):
        for c, v in zip(g.channels, s.tolist()):
            score_of[c] = float(v)
            group_of[c] = g.id
    back: set[int] = set()
    masks = cg.removed_masks(removed)
    for name, dims in cg.param_atoms.items():
        for d, atoms in enumerate(dims):
            if atoms is None or len(atoms) == 0:
                continue
            gone = masks[name][d]
            need = min(min_channels, len(gone)) - int((~gone).sum())
            if need <= 0:
                continue
            # the removed positions, best channel first; a position with several drivers needs them all
            roots = cg.roots(name, d)
            raw = cg.uf.roots(atoms)
            cands = []
            for i in np.flatnonzero(gone).tolist():
                drv = cg.drivers.get(int(raw[i])) if cg.drivers else None
                chans = [c for c in (drv if drv and len(drv) > 1 else (int(roots[i]),)) if c in removed]
                if chans:
                    cands.append((-max(score_of.get(c, 0.0) for c in chans), i, chans))
            for _, _, chans in sorted(cands)[:need]:
                back.update(chans)
    if not back:
        return removed, report
    removed = removed - back
    regained: dict[int, int] = {}
    for c in back:
        regained[group_of.get(c, -1)] = regained.get(group_of.get(c, -1), 0) + 1
    report = [{**r, "kept": r["kept"] + regained.get(r["id"], 0)} for r in report]
    return _keep_minimum(cg, scores, removed, report, min_channels)  # a channel back can free others: re-check


_MAX_SCALED_RATIO = 0.8  # latency-aware allocation never removes more than this fraction of a group


def latency_sensitivity(model: nn.Module, cg: ChannelGroups, inputs: Any, *, round_to: int = 8,
                        runs: int = 20) -> dict[int, float]:
    """Measured CPU seconds saved per MAC removed, per group, when half of the group is removed.

    Every conv / linear / norm layer bound to a group is timed on its own, on an input of the
    shape it sees in the model, whole and with the group's channels halved (kept widths rounded
    to ``round_to``); the group's saving is the sum over its layers. Each distinct layer shape is
    timed once (median of ``runs`` after one warm-up call, by the one timer
    :func:`torchslim.profile.latency.measure`), at the current ``torch.get_num_threads()``.
    """
    from torchslim._utils import evaluating
    from torchslim.graph.inputs import as_inputs, call_model
    from torchslim.profile.latency import measure

    kinds = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, kinds):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, n=name: shapes.setdefault(n, tuple(args[0].shape)) and None))
    try:
        with torch.no_grad(), evaluating(model):  # every module's own mode comes back after
            call_model(model, as_inputs(inputs))
    finally:
        for h in hooks:
            h.remove()
    cache: dict[Any, tuple[float, int]] = {}

    def cost(mod: nn.Module, shape: tuple[int, ...]) -> tuple[float, int]:
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            width = mod.weight.shape[1] * getattr(mod, "groups", 1) if mod.weight.dim() > 1 else mod.weight.shape[0]
            shape = (shape[0], width, *shape[2:])
        elif mod.weight is not None:
            shape = (*shape[:-1], mod.weight.shape[-1])
        key = (type(mod), tuple(mod.weight.shape) if mod.weight is not None else None, shape, getattr(mod, "stride", 0),
               getattr(mod, "groups", 1))
        if key not in cache:
            x = torch.randn(shape)
            with torch.no_grad():
                out = mod(x)  # also the warm-up call
                seconds = measure(lambda: mod(x), runs=runs, warmup=0).median_ms / 1e3
            w = mod.weight
            macs = out.numel() * (w[0].numel() if w is not None and w.dim() > 1 else 0)
            cache[key] = (seconds, macs)
        return cache[key]

    out: dict[int, float] = {}
    for g in cg.groups:
        kept = _kept_count(g.size, 0.5, round_to, 1)
        if kept == g.size:
            continue
        keep_all = cg.keep_indices(set(g.channels[kept:]))
        owners = sorted({n.rpartition(".")[0] for n, _ in g.members})
        saved_t = saved_macs = 0.0
        for path in owners:
            try:
                mod = model.get_submodule(path) if path else model
            except AttributeError:
                continue
            if not isinstance(mod, kinds) or path not in shapes or getattr(mod, "weight", None) is None:
                continue
            t_full, m_full = cost(mod, shapes[path])
            small = clone_module(mod)
            prefix = path + "."
            sub = {n[len(prefix):]: k for n, k in keep_all.items() if n.startswith(prefix) and "." not in n[len(prefix):]}
            try:
                slice_model_(small, sub)
                t_small, m_small = cost(small, shapes[path])
            except Exception:  # noqa: BLE001 - a layer we cannot time alone adds nothing
                continue
            saved_t += t_full - t_small
            saved_macs += m_full - m_small
        if saved_macs > 0:
            out[g.id] = max(saved_t, 0.0) / saved_macs
    return out


def latency_scales(sens: dict[int, float], cg: ChannelGroups, power: float = 1.0) -> dict[int, float]:
    """Per-group multipliers of the pruning ratio: (seconds per MAC / the median over groups) ** power,
    clipped to [1/4, 4] so that timing noise never leaves a group whole or empties it."""
    if not sens:
        return {}
    vals = sorted(sens.values())
    mid = vals[len(vals) // 2] or max(vals) or 1.0
    return {g.id: min(max((sens.get(g.id, mid) / mid) ** power, 0.25), 4.0) for g in cg.groups}


def _trial(model: nn.Module, cg: ChannelGroups, inputs: Any) -> tuple[nn.Module, Any]:
    """A throw-away copy to try a removal on: shapes only (meta device) when the model allows."""
    if cg.meta_ok:
        shadow = meta_copy(model)
        if shadow is not None:
            return shadow, to_meta(inputs)
    return clone_module(model), inputs


def _breaking_groups(model: nn.Module, cg: ChannelGroups, scores: list[torch.Tensor], inputs: Any,
                     opts: dict[str, Any]) -> set[int]:
    """Groups whose pruning makes the forward fail (probed at ratio 0.5 on copies)."""
    probe = {**opts, "global_ranking": False, "ratios": None}
    removed, _ = _choose(model, cg, scores, 0.5, **probe)
    if not removed:
        return set()
    try:
        report = _choose(model, cg, scores, 0.5, **probe)[1]
        trial, trial_inputs = _trial(model, cg, inputs)
        slice_model_(trial, cg.keep_indices(removed), example_inputs=trial_inputs, attrs=_head_attrs(model, cg, report))
        return set()
    except ModelRunError:
        pass
    bad = set()
    for g in cg.groups:
        mine = removed.intersection(g.channels)
        if not mine:
            continue
        report = [{"id": g.id, "size": g.size, "kept": g.size - len(mine)}]
        trial, trial_inputs = _trial(model, cg, inputs)
        try:
            slice_model_(trial, cg.keep_indices(mine), example_inputs=trial_inputs, attrs=_head_attrs(model, cg, report))
        except ModelRunError:
            bad.add(g.id)
    return bad


_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "num_key_value_heads")
_HEAD_WIDTHS = ("all_head_size", "inner_dim", "hidden_size_per_partition", "attn_dim", "split_size")
# widths some models keep as Python ints and reshape with (torchvision's ViT: ``reshape(n, self.hidden_dim, -1)``)
_WIDTHS = ("hidden_dim", "hidden_size", "embed_dim", "d_model", "n_embd", "embed_dims")


def _ancestors(owners: set[str]) -> set[str]:
    out: set[str] = set()
    for o in owners:
        parts = o.split(".") if o else []
        out.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    return out


def _head_attrs(model: nn.Module, cg: ChannelGroups, report: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """New head counts / widths for the modules whose heads or widths were pruned."""
    out: dict[str, dict[str, int]] = {}
    kept_of = {r["id"]: r["kept"] for r in report}
    for g in cg.groups:
        kept = kept_of.get(g.id, g.size)
        if kept == g.size:
            continue
        owners = {n.rpartition(".")[0] for n, _ in g.members}
        if g.head_dim is None:
            for path in sorted(_ancestors(owners)):
                mod = model.get_submodule(path) if path else model
                if isinstance(mod, nn.MultiheadAttention):
                    continue  # surgery sets its widths from its tensors
                new = {a: kept for a in _WIDTHS if type(getattr(mod, a, None)) is int and getattr(mod, a) == g.size}
                if new:
                    out.setdefault(path, {}).update(new)
            continue
        parents = {o.rpartition(".")[0] for o in owners} | {o.rpartition(".")[0].rpartition(".")[0] for o in owners}
        for path in sorted(parents):
            try:
                mod = model.get_submodule(path) if path else model
            except AttributeError:
                continue
            new = {}
            for a in _HEAD_COUNTS:
                if getattr(mod, a, None) == g.size and isinstance(getattr(mod, a), int):
                    new[a] = kept
            for a in _HEAD_WIDTHS:
                if getattr(mod, a, None) == g.size * g.head_dim:
                    new[a] = kept * g.head_dim
            if new:
                out.setdefault(path, {}).update(new)
    return out


def _keep_lists(keep: dict[str, list[torch.Tensor | None]]) -> dict[str, list[list[int] | None]]:
    return {n: [None if k is None else k.tolist() for k in dims] for n, dims in keep.items()}


def _measure(model: nn.Module, inputs: Any, metric: str) -> float:
    from torchslim.profile import profile

    p = profile(model, inputs, latency=metric == "latency", size=False, runs=None if metric == "latency" else 1, min_time_s=0.3)
    return float(p.latency_ms.median) if metric == "latency" else float(getattr(p, metric))


def _budget_ratio(model: nn.Module, cg: ChannelGroups, scores: list[torch.Tensor], opts: dict[str, Any], inputs: Any,
                  target: Budget) -> tuple[float, dict[str, Any]]:
    """The pruning ratio meeting a MACs / params budget (bisection on shape-only trials) and
    ``achieved``; widths held to kernel blocks (``opts["width_multiple"]``) first, single channels
    when blocks cannot meet the budget. ``opts`` is left with the setting used."""
    metric = target.metric
    base_model, base_inputs = _trial(model, cg, inputs)
    base = _measure(base_model, base_inputs, metric)
    got = "nothing"
    for multiple in dict.fromkeys((opts.get("width_multiple", 1), 1)):
        opts["width_multiple"] = multiple
        lo, hi, best = 0.0, 0.99, None
        for _ in range(24):
            mid = (lo + hi) / 2
            removed, report = _choose(model, cg, scores, mid, **opts)
            trial, trial_inputs = _trial(model, cg, inputs)
            slice_model_(trial, cg.keep_indices(removed), attrs=_head_attrs(model, cg, report))
            frac = _measure(trial, trial_inputs, metric) / base
            if frac > target.fraction:
                lo = mid
            else:
                hi = mid
                best = (mid, frac)
            if abs(frac - target.fraction) <= target.tolerance * target.fraction and frac <= target.fraction * (1 + target.tolerance):
                best = (mid, frac)
                break
        if best is not None and abs(best[1] - target.fraction) <= max(target.tolerance * target.fraction, 0.02):
            achieved: dict[str, Any] = {metric: best[1]}
            if multiple > 1:
                achieved["width_multiple"] = multiple
            return best[0], achieved
        got = got if best is None else f"{best[1]:.3f}"
    raise ConfigError(f"budget {metric}={target.fraction} cannot be met by pruning this model's prunable channels "
                      f"(closest reachable: {got} of the original); the model is unchanged")


def prune_channels_(
    model: nn.Module,
    config: PruneConfig | dict[str, Any] | None = None,
    *,
    example_inputs: Any = None,
    data: Any = None,
    **overrides: Any,
) -> ChannelPlan:
    """Remove channels from ``model`` in place; shapes really shrink.

    Args:
        model: the model; modified in place (same module objects, smaller tensors).
        config: a :class:`~torchslim.prune.PruneConfig` (or a dict of its fields). The old call
            form ``prune_channels_(model, example_inputs, ratio=...)`` still works: a second
            argument that is not a config is taken as the example inputs.
        example_inputs: inputs for the trace (default: the model's remembered inputs).
        data: labelled batches for gradient-based criteria (``taylor``): a ``DataBundle`` (its train
            split) or any iterable of ``(x, y)``; calibration data for ``activation`` (batches of
            model inputs, or a text data spec for a decoder LLM).
        overrides: :class:`~torchslim.prune.PruneConfig` fields (``ratio=0.5``, ``target=``,
            ``importance=``, ``global_ranking=``, ``ratios=``, ``modules=``, ``skip=``,
            ``round_to=``, ``min_channels=``, ``allocation=``); ``ignore=`` is the deprecated
            name of ``skip=``.

    Returns:
        A :class:`ChannelPlan` (also recorded on the model for ``ts.save``).

    Raises:
        ConfigError: bad ratio, unknown criterion or field, a module pattern that selects
            nothing, a budget that cannot be met. The model is unchanged.
        UnsupportedOpError: an op with no channel rule; the model is unchanged.

    Example:
        >>> import torch, torchslim as ts
        >>> m = ts.create_model("zoo:lenet300")
        >>> plan = ts.prune_channels_(m, ratio=0.5)
        >>> m.fc1.out_features, m.fc2.out_features, m.fc3.out_features
        (150, 50, 10)
    """
    if config is not None and not _is_config(config):
        if example_inputs is not None:
            raise ConfigError("prune_channels_: example inputs given twice (positionally and as example_inputs=)")
        example_inputs, config = config, None
    if "ignore" in overrides:
        overrides["skip"] = renamed_argument(overrides.get("skip", ()), overrides.pop("ignore"), old_name="ignore",
                                             new_name="skip", where="prune_channels_", default=())
    cfg = PruneConfig.build(config, **overrides)
    if (cfg.ratio is None) == (cfg.target is None):
        raise ConfigError("give exactly one of ratio= (a fraction in [0, 1)) or target=ts.Budget(...)")
    ratio, target, importance, allocation = cfg.ratio, cfg.target, cfg.importance, cfg.allocation
    global_ranking, ratios, round_to, min_channels = cfg.global_ranking, cfg.ratios, cfg.round_to, cfg.min_channels
    on_latency = target is not None and target.metric == "latency"
    round_to = round_to if round_to is not None else "auto" if on_latency else 1  # measured widths under a latency budget
    if round_to == "auto" and target is not None and not on_latency:
        raise ConfigError("round_to='auto' (widths the runtime runs fastest) needs ratio= or a latency budget; "
                          "give an integer round_to with a MACs / params budget")
    crit = get_importance(importance)
    if example_inputs is None:
        from torchslim._modelinfo import example_inputs as remembered

        example_inputs = remembered(model)

    # Everything before the surgery (analysis, scoring, trials, a budget search) leaves the model
    # as it was, also when it fails or refuses (graph.state); the surgery is all or nothing.
    with preserved(model, example_inputs, guard_writes=False):
        ignore = _left_whole(model, cfg)
        from torchslim._modelinfo import refuse_integer_layers

        refuse_integer_layers(model, "prune_channels_", skip=select_modules(model, ignore, None, kinds=None) if ignore else ())
        cg = analyse(model, example_inputs, skip=ignore)
        if callable(getattr(crit, "calibrated", None)):  # measured on calibration data (activation)
            crit = crit.calibrated(model, data)
        if getattr(crit, "needs_gradients", False):
            if data is None:
                raise ConfigError(f"importance {importance!r} needs gradients: pass data= (labelled batches)")
            model.__dict__["_torchslim_taylor"] = accumulate_gradients(model, data)
        try:
            scores = [crit(model, cg, g) for g in cg.groups]
        finally:
            model.__dict__.pop("_torchslim_taylor", None)
        for g, s in zip(cg.groups, scores):
            if not isinstance(s, torch.Tensor) or s.shape != (g.size,):
                raise ConfigError(f"importance returned {getattr(s, 'shape', type(s))} for group {g.id}; expected ({g.size},)")
        opts = dict(global_ranking=global_ranking, ratios=ratios, round_to=1 if round_to == "auto" else round_to,
                    min_channels=min_channels,
                    uniform_layers=uniform_default(model, cfg.uniform_layers))
        if cfg.round_to is None and target is not None and not on_latency and not global_ranking:
            opts["width_multiple"] = DEFAULT_MULTIPLE  # MACs / params budget: widths in kernel blocks (prune._widths)
        # Shapes a model computes in Python (e.g. ``x.reshape(B, N, 3, heads, C // heads)``) are not
        # in the trace: find the groups whose removal breaks the forward and leave them whole.
        blocked = _breaking_groups(model, cg, scores, example_inputs, opts)
        if blocked:
            scores = [s for g, s in zip(cg.groups, scores) if g.id not in blocked]
            cg.groups = [g for g in cg.groups if g.id not in blocked]
        scale: dict[int, float] = {}
        if allocation == "latency":
            scale = latency_scales(latency_sensitivity(model, cg, example_inputs, round_to=max(opts["round_to"], 8)), cg)
            opts["scale"] = scale

        achieved: dict[str, Any] = {}
        chosen = None
        if on_latency or round_to == "auto":  # measured in the budget's runtime (prune.latency_budget)
            from torchslim.prune.latency_budget import rounded_choice, search_latency

            if on_latency:
                ratio, chosen, achieved = search_latency(model, cg, scores, opts, example_inputs, target,
                                                         auto_round=round_to == "auto")
            else:
                *chosen, moves = rounded_choice(model, cg, scores, float(ratio), opts, as_inputs(example_inputs),
                                                "eager", None, None)
                achieved["widths_moved"] = moves
        elif target is not None:
            ratio, achieved = _budget_ratio(model, cg, scores, opts, example_inputs, target)

    removed, report = chosen if chosen is not None else _choose(model, cg, scores, float(ratio), **opts)
    keep = cg.keep_indices(removed)
    attrs = _head_attrs(model, cg, report)
    config_before = config_values(model)
    slice_model_(model, keep, example_inputs=example_inputs, attrs=attrs)  # syncs a transformers config
    config_fields, config_note = config_changes(model, config_before)

    plan = ChannelPlan(
        allocation=allocation,
        ratio=float(ratio),
        importance=importance if isinstance(importance, str) else type(importance).__name__,
        removed_channels=len(removed),
        total_channels=sum(g.size for g in cg.groups),
        groups=report,
        keep=_keep_lists(keep),
        budget=target.to_dict() if target is not None else None,
        achieved=achieved,
        left_whole=sorted(blocked),
        attrs=attrs,
        config=config_fields,
        config_note=config_note,
    )
    if keep:
        record_plan(model, plan.to_dict())
    return plan


def replay_channel_plan(model: nn.Module, plan: dict[str, Any]) -> None:
    """Re-create a saved channel pruning on a freshly built model (shapes only)."""
    slice_model_(model, plan.get("keep", {}), attrs=plan.get("attrs") or None)  # syncs a transformers config


register_plan_kind(KIND, replay_channel_plan)
