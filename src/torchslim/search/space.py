"""The search space: one pruning choice per coupled channel group, optional per-layer bit widths.

Coupled layers share one choice because the channel-space analysis (``torchslim.graph.spaces``)
puts them in one group: a residual stream, a conv and the BatchNorm and consumers it feeds. Each
group is named by one of its producing modules, the key ``ts.prune_channels_(ratios=...)`` matches
it by, so a sampled configuration becomes a recipe stage as it is.

A sampled configuration is *repaired* toward the budget before it is evaluated: the kept
fraction of every group is multiplied by one global factor, found by bisection on shape-only
(meta-device) copies, until the MACs (or params) budget is met. The sampled per-group proportions
survive; trials are not wasted on configurations that miss the budget.

Example:
    >>> import torchslim as ts
    >>> from torchslim.search.space import build_space
    >>> space = build_space(ts.create_model("zoo:lenet5"))
    >>> [c.key for c in space.groups]
    ['features.0', 'features.3', 'classifier.0', 'classifier.2']
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError

__all__ = ["GroupChoice", "LayerBitsChoice", "SearchSpace", "CostModel", "build_space", "ratio_choices"]


@dataclass(frozen=True)
class GroupChoice:
    """One coupled channel group the search prunes with one ratio.

    Attributes:
        key: the producing module name that ``prune_channels_(ratios={key: r})`` matches.
        group: the group's id in the channel-space analysis.
        size: channels in the group.
        modules: every module the group's channels are bound to (informative).
    """

    key: str
    group: int
    size: int
    modules: tuple[str, ...] = ()

    @property
    def param(self) -> str:
        """The Optuna parameter name."""
        return f"prune:{self.key}"


@dataclass(frozen=True)
class LayerBitsChoice:
    """One layer whose weight bit width is searched."""

    layer: str
    choices: tuple[int, ...]

    @property
    def param(self) -> str:
        return f"bits:{self.layer}"


def ratio_choices(max_ratio: float, step: float) -> list[float]:
    """The discrete pruning ratios ``0, step, 2*step, ... <= max_ratio`` (rounded to 6 digits)."""
    n = int(math.floor(max_ratio / step + 1e-9))
    return [round(i * step, 6) for i in range(n + 1)]


@dataclass
class SearchSpace:
    """Every choice a trial makes; see :func:`build_space`.

    Attributes:
        groups: one pruning ratio per coupled channel group.
        layer_bits: one bit width per quantizable layer (empty without ``bits``).
        max_ratio, step: sampled pruning ratios are ``0, step, ... <= max_ratio``.
        quant_mode: ``"weight-only"`` or ``"static"`` when bit widths are searched.
        fixed_bits: one bit width for every quantized layer when only one is allowed.
        left_whole: groups the analysis found but the search leaves alone (their pruning breaks
            the forward, or no producer name identifies them).
    """

    groups: list[GroupChoice]
    layer_bits: list[LayerBitsChoice] = field(default_factory=list)
    max_ratio: float = 0.9
    step: float = 0.05
    quant_mode: str | None = None
    left_whole: list[int] = field(default_factory=list)
    fixed_bits: int | None = None  # one bit width for every quantized layer (nothing to search)

    def __len__(self) -> int:
        return len(self.groups) + len(self.layer_bits)

    def sample(self, trial: Any) -> dict[str, Any]:
        """Ask ``trial`` (an Optuna trial) for every choice; returns ``{"ratios", "layer_bits"}``."""
        ratios = {c.key: trial.suggest_float(c.param, 0.0, self.max_ratio, step=self.step) for c in self.groups}
        bits = {c.layer: trial.suggest_categorical(c.param, list(c.choices)) for c in self.layer_bits}
        return {"ratios": ratios, "layer_bits": bits}

    def signature(self) -> dict[str, Any]:
        """A JSON description, stored with the study so a resumed or joined study can be checked."""
        return {
            "groups": [[c.key, c.size] for c in self.groups],
            "layer_bits": [[c.layer, list(c.choices)] for c in self.layer_bits],
            "max_ratio": self.max_ratio,
            "step": self.step,
            "quant_mode": self.quant_mode,
            "fixed_bits": self.fixed_bits,
        }

    def table(self) -> Any:
        """A rich table of the choices."""
        from rich.table import Table

        t = Table(title=f"search space ({len(self)} choices)")
        for col in ("choice", "channels / layer", "values", "bound modules"):
            t.add_column(col)
        for c in self.groups:
            t.add_row(c.param, str(c.size), f"ratio 0..{self.max_ratio} step {self.step}", ", ".join(c.modules[:4]))
        for b in self.layer_bits:
            t.add_row(b.param, b.layer, "/".join(map(str, b.choices)) + " bits", "")
        return t


def _group_key(group: Any, others: list[Any]) -> str | None:
    """A producer module of ``group`` that no other group's ratio lookup would match."""
    def candidates(g: Any) -> list[str]:
        return [n.rpartition(".")[0] for n, _ in (g.producers or g.members)]

    taken = {m for g in others if g is not group for m in candidates(g)}
    for name in candidates(group):
        if name and name not in taken and not any(ch in name for ch in "*?["):
            return name
    return None


def _quantizable(model: nn.Module, mode: str) -> list[str]:
    kinds: tuple[type, ...] = (nn.Linear,) if mode == "weight-only" else (nn.Linear, nn.Conv1d, nn.Conv2d)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and n]


def build_space(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    max_ratio: float = 0.9,
    step: float = 0.05,
    ignore: Sequence[str] = (),
    bits: Sequence[int] | None = None,
    quant_mode: str = "weight-only",
    quant_layers: Sequence[str] | None = None,
) -> SearchSpace:
    """The search space of ``model``: one ratio per coupled channel group (+ bit widths).

    Args:
        model: the model to compress; not modified.
        example_inputs: inputs for the trace (default: the model's remembered inputs).
        max_ratio: largest pruning ratio a group may draw, in (0, 1).
        step: spacing of the ratio choices (e.g. 0.05 or 0.1).
        ignore: module names or globs whose channels the search leaves whole.
        bits: bit widths to choose from per layer (e.g. ``(4, 8)``); ``None``: no quantization.
        quant_mode: ``"weight-only"`` (Linear layers, packed integer weights) or ``"static"``
            (Conv and Linear, calibrated activations).
        quant_layers: globs of the layers whose bits are searched (default: every one the mode takes).

    Returns:
        A :class:`SearchSpace`.

    Raises:
        ConfigError: bad settings, or nothing to search (no prunable group and no layer to quantize).
    """
    from torchslim.graph.spaces import analyse
    from torchslim.quantize.primitives import check_bits

    if not isinstance(max_ratio, (int, float)) or isinstance(max_ratio, bool) or not 0 < max_ratio < 1:
        raise ConfigError(f"max_ratio must be in (0, 1); got {max_ratio!r}")
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not 0 < step <= max_ratio:
        raise ConfigError(f"step must be in (0, max_ratio={max_ratio}]; got {step!r}")
    if bits is not None:
        bits = tuple(sorted(set(bits)))
        if not bits:
            raise ConfigError("bits must list at least one bit width, e.g. (4, 8); or None for no quantization")
        for b in bits:
            check_bits(b, "search bits")
        if quant_mode not in ("weight-only", "static"):
            raise ConfigError(f"quant_mode must be 'weight-only' or 'static'; got {quant_mode!r}")
        if quant_mode == "weight-only" and max(bits) > 8:
            raise ConfigError(f"quant_mode='weight-only' stores 2..8-bit weights; got bits {list(bits)}")
    if example_inputs is None:
        from torchslim.zoo.spec import example_inputs as remembered

        example_inputs = remembered(model)
    cg = analyse(model, example_inputs, ignore=tuple(ignore))
    blocked = _blocked_groups(model, example_inputs, ignore)
    choices, left = [], []
    for g in cg.groups:
        key = _group_key(g, cg.groups) if g.id not in blocked else None
        if key is None or g.size < 2:
            left.append(g.id)
            continue
        choices.append(GroupChoice(key=key, group=g.id, size=g.size, modules=tuple(g.modules)))
    layer_bits: list[LayerBitsChoice] = []
    if bits is not None:
        names = _quantizable(model, quant_mode)
        if quant_layers is not None:
            names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in quant_layers)]
        layer_bits = [LayerBitsChoice(n, bits) for n in names] if len(bits) > 1 else []
        if len(bits) == 1 and not names:
            raise ConfigError(f"bits={list(bits)}: the model has no layer that quant_mode={quant_mode!r} quantizes")
    space = SearchSpace(choices, layer_bits, float(max_ratio), float(step),
                        quant_mode if bits is not None else None, left,
                        bits[0] if bits is not None and len(bits) == 1 else None)
    if len(space) == 0:
        why = f"groups {left} are left whole" if left else "the analysis found no prunable channel group"
        raise ConfigError(
            f"the search space is empty: {why} (model inputs/outputs are never pruned; ignore={list(ignore)}) "
            "and no per-layer bit widths are searched (pass bits=(4, 8) to search them)"
        )
    return space


def _blocked_groups(model: nn.Module, example_inputs: Any, ignore: Sequence[str]) -> set[int]:
    """Groups ``prune_channels_`` leaves whole (their pruning breaks the forward), probed on a copy."""
    from torchslim.graph.spaces import meta_copy, to_meta
    from torchslim.prune import prune_channels_

    shadow = meta_copy(model)
    inputs = to_meta(example_inputs) if shadow is not None else example_inputs
    shadow = shadow if shadow is not None else copy.deepcopy(model)
    try:
        plan = prune_channels_(shadow, inputs, ratio=0.5, ignore=tuple(ignore), importance=_index_importance)
    except Exception:  # noqa: BLE001 - shapes only; a real problem surfaces when a trial prunes
        return set()
    return set(plan.left_whole)


def _index_importance(model: nn.Module, groups: Any, group: Any) -> torch.Tensor:
    """Importance for shape-only copies: channel index order (the values do not matter)."""
    return torch.arange(group.size, dtype=torch.float32)


class CostModel:
    """MACs and params of the pruned model for per-group kept counts, on shape-only copies.

    Kept counts are what ``prune_channels_`` keeps for ratios ``(size - kept) / size`` (those
    ratios are exact, so the real pruning keeps exactly these counts).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, space: SearchSpace, ignore: Sequence[str] = ()) -> None:
        from torchslim.graph.spaces import analyse, meta_copy, to_meta
        from torchslim.profile import profile

        self.model = model
        self.space = space
        self.cg = analyse(model, example_inputs, ignore=tuple(ignore))
        self.by_id = {g.id: g for g in self.cg.groups}
        self._meta = meta_copy(model) is not None
        self.inputs = to_meta(example_inputs) if self._meta else example_inputs
        base = profile(meta_copy(model) if self._meta else model, self.inputs, latency=False, size=False)
        self.base = {"macs": float(base.macs), "params": float(base.params)}
        self._cache: dict[tuple[int, ...], dict[str, float]] = {}

    def cost(self, kept: Sequence[int]) -> dict[str, float]:
        """``{"macs", "params"}`` as fractions of the original for these kept counts (one per choice)."""
        key = tuple(int(k) for k in kept)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        from torchslim.graph.spaces import meta_copy
        from torchslim.graph.surgery import slice_model_
        from torchslim.profile import profile

        removed: set[int] = set()
        for c, k in zip(self.space.groups, key):
            g = self.by_id[c.group]
            removed.update(g.channels[k:])
        trial = meta_copy(self.model) if self._meta else copy.deepcopy(self.model)
        if removed:
            slice_model_(trial, self.cg.keep_indices(removed))
        p = profile(trial, self.inputs, latency=False, size=False)
        out = {"macs": p.macs / max(self.base["macs"], 1.0), "params": p.params / max(self.base["params"], 1.0)}
        self._cache[key] = out
        return out

    def kept_for(self, ratios: Mapping[str, float]) -> list[int]:
        """Kept counts of sampled ratios (``floor(size * ratio)`` channels removed per group)."""
        return [c.size - int(math.floor(c.size * float(ratios.get(c.key, 0.0)) + 1e-9)) for c in self.space.groups]

    def floor_kept(self, min_channels: int) -> list[int]:
        return [min(c.size, max(1, min_channels)) for c in self.space.groups]

    def min_cost(self, min_channels: int) -> dict[str, float]:
        """The cost when every searched group keeps only ``min_channels``: the most any budget can save."""
        return self.cost(self.floor_kept(min_channels))

    def repair(self, kept: Sequence[int], metric: str, fraction: float, *, min_channels: int = 1,
               grow: bool = True, iters: int = 20) -> list[int] | None:
        """Scale every kept fraction by one factor so ``metric`` lands at or just under ``fraction``.

        Shrinks an over-budget configuration; with ``grow`` also widens one far under the budget.
        Returns the repaired kept counts, or None when the budget cannot be met.
        """
        sizes = [c.size for c in self.space.groups]
        floor = self.floor_kept(min_channels)

        def scaled(s: float) -> list[int]:
            return [min(n, max(f, int(round(k * s)))) for k, n, f in zip(kept, sizes, floor)]

        def fits(s: float) -> bool:
            return self.cost(scaled(s))[metric] <= fraction

        now = self.cost(list(kept))[metric]
        if now <= fraction and not grow:
            return list(kept)
        if now > fraction:
            lo, hi = 0.0, 1.0  # fits(lo) is the floor, checked below
            if not fits(lo):
                return None
        else:
            lo, hi = 1.0, max(n / max(k, 1) for k, n in zip(kept, sizes))
            if fits(hi):
                return scaled(hi)
        for _ in range(iters):
            mid = (lo + hi) / 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
            if hi - lo < 2e-3:
                break
        return scaled(lo)

    def ratios_for(self, kept: Sequence[int]) -> dict[str, float]:
        """The ``prune_channels_`` ratios that keep exactly these counts."""
        return {c.key: (c.size - int(k)) / c.size for c, k in zip(self.space.groups, kept)}
