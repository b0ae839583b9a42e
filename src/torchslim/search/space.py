"""The search space: one pruning choice per coupled channel group, optional per-layer bits and ranks.

Coupled layers share one choice because the channel-space analysis (``torchslim.graph.spaces``)
puts them in one group: a residual stream, a conv and the BatchNorm and consumers it feeds. Each
group is named by one of its producing modules, the key ``ts.prune_channels_(ratios=...)`` matches
it by, so a sampled configuration becomes a recipe stage as it is.

Optional per-layer ranks: each Linear / Conv2d may be factorized (``ts.factorize_``: SVD for
Linear, Tucker-2 or SVD for Conv2d) keeping a sampled fraction of its full rank, taken *after*
channel pruning (of the pruned layer's rank); ``1.0`` leaves the layer as it is.

What a configuration costs, and how a sample is repaired toward the budget, is
:class:`torchslim.search.cost.CostModel`.

Example:
    >>> import torchslim as ts
    >>> from torchslim.search.space import build_space
    >>> space = build_space(ts.create_model("zoo:lenet5"))
    >>> [c.key for c in space.groups]
    ['features.0', 'features.3', 'classifier.0', 'classifier.2']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim._select import as_patterns, check_patterns, matches, renamed_argument
from torchslim.errors import ConfigError

__all__ = ["GroupChoice", "LayerBitsChoice", "LayerRankChoice", "SearchSpace", "build_space", "ratio_choices",
           "RANK_METHODS"]

RANK_METHODS = ("tucker", "svd")  # factorizations of Conv2d the search may use (Linear: always svd)


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


@dataclass(frozen=True)
class LayerRankChoice:
    """One layer whose rank is searched: the fraction of its (pruned) full rank kept.

    Attributes:
        layer: the module name (a Linear, or a Conv2d with ``groups=1``).
        choices: fractions in (0, 1]; ``1.0`` leaves the layer as it is.
        method: the ``factorize_`` method: ``"svd"`` (Linear, or Conv2d as a matrix) or ``"tucker"``.
    """

    layer: str
    choices: tuple[float, ...]
    method: str

    @property
    def param(self) -> str:
        return f"rank:{self.layer}"


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
        layer_ranks: one rank fraction per factorizable layer (empty without ``ranks``).
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
    layer_ranks: list[LayerRankChoice] = field(default_factory=list)

    def __len__(self) -> int:
        """The number of choices a trial makes (a rank with one allowed fraction is not a choice)."""
        return len(self.groups) + len(self.layer_bits) + sum(len(c.choices) > 1 for c in self.layer_ranks)

    def sample(self, trial: Any) -> dict[str, Any]:
        """Ask ``trial`` (an Optuna trial) for every choice; returns ``{"ratios", "layer_bits", "ranks"}``."""
        ratios = {c.key: trial.suggest_float(c.param, 0.0, self.max_ratio, step=self.step) for c in self.groups}
        bits = {c.layer: trial.suggest_categorical(c.param, list(c.choices)) for c in self.layer_bits}
        ranks = {c.layer: float(trial.suggest_categorical(c.param, list(c.choices))) for c in self.layer_ranks}
        return {"ratios": ratios, "layer_bits": bits, "ranks": ranks}

    def rank_method(self, layer: str) -> str:
        """The ``factorize_`` method of a layer whose rank is searched."""
        for c in self.layer_ranks:
            if c.layer == layer:
                return c.method
        raise KeyError(layer)

    def signature(self) -> dict[str, Any]:
        """A JSON description, stored with the study so a resumed or joined study can be checked."""
        sig: dict[str, Any] = {
            "groups": [[c.key, c.size] for c in self.groups],
            "layer_bits": [[c.layer, list(c.choices)] for c in self.layer_bits],
            "max_ratio": self.max_ratio,
            "step": self.step,
            "quant_mode": self.quant_mode,
            "fixed_bits": self.fixed_bits,
        }
        if self.layer_ranks:  # absent without ranks, so studies from before ranks existed still match
            sig["layer_ranks"] = [[c.layer, list(c.choices), c.method] for c in self.layer_ranks]
        return sig

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
        for r in self.layer_ranks:
            t.add_row(r.param, r.layer, "/".join(f"{f:g}" for f in r.choices) + f" of full rank ({r.method})", "")
        from torchslim._text import printable

        return printable(t)  # plain text under print(), the rich table on a console


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
    skip: Sequence[str] | str = (),
    bits: Sequence[int] | None = None,
    quant_mode: str = "weight-only",
    quant_layers: Sequence[str] | None = None,
    ranks: Sequence[float] | None = None,
    rank_layers: Sequence[str] | None = None,
    conv_rank_method: str = "tucker",
    ignore: Sequence[str] | None = None,
) -> SearchSpace:
    """The search space of ``model``: one ratio per coupled channel group (+ bit widths, ranks).

    Args:
        model: the model to compress; not modified.
        example_inputs: inputs for the trace (default: the model's remembered inputs).
        max_ratio: largest pruning ratio a group may draw, in (0, 1).
        step: spacing of the ratio choices (e.g. 0.05 or 0.1).
        skip: module names, globs or ``re:`` patterns whose channels the search leaves whole
            (the ``skip=`` of :func:`~torchslim.prune.prune_channels_`; ``ignore=`` is its
            deprecated old name).
        bits: bit widths to choose from per layer (e.g. ``(4, 8)``); ``None``: no quantization.
        quant_mode: ``"weight-only"`` (Linear layers, packed integer weights) or ``"static"``
            (Conv and Linear, calibrated activations).
        quant_layers: names, globs or ``re:`` patterns of the layers whose bits are searched
            (default: every one the mode takes).
        ranks: fractions of each layer's full rank to choose from per layer, e.g. ``(0.25, 0.5, 1.0)``
            (``1.0``: leave the layer alone); ``None``: no factorization. Taken of the layer as
            channel pruning left it.
        rank_layers: names, globs or ``re:`` patterns of the Linear / Conv2d layers whose rank is
            searched (default: all with
            ``groups=1`` and a full rank of at least 2).
        conv_rank_method: how a Conv2d is factorized: ``"tucker"`` (Tucker-2) or ``"svd"``.

    Returns:
        A :class:`SearchSpace`.

    Raises:
        ConfigError: bad settings, or nothing to search (no prunable group, no layer to quantize or
            factorize).
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
    rank_choices = _check_ranks(ranks, conv_rank_method)
    skip = renamed_argument(skip, ignore, old_name="ignore", new_name="skip", where="build_space", default=())
    ignore = as_patterns(skip, "skip") or ()  # below: the graph's name for the same list
    quant_layers, rank_layers = as_patterns(quant_layers, "quant_layers"), as_patterns(rank_layers, "rank_layers")
    names = [n for n, _ in model.named_modules()]
    for field_name, patterns in (("skip", ignore), ("quant_layers", quant_layers), ("rank_layers", rank_layers)):
        check_patterns(patterns, names, field_name)  # before any trace
    if example_inputs is None:
        from torchslim._modelinfo import example_inputs as remembered

        example_inputs = remembered(model)
    cg = analyse(model, example_inputs, skip=tuple(ignore))
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
            names = [n for n in names if any(matches(n, p) for p in quant_layers)]
        layer_bits = [LayerBitsChoice(n, bits) for n in names] if len(bits) > 1 else []
        if len(bits) == 1 and not names:
            raise ConfigError(f"bits={list(bits)}: the model has no layer that quant_mode={quant_mode!r} quantizes")
    layer_ranks: list[LayerRankChoice] = []
    if rank_choices is not None:
        layer_ranks = _rank_layers(model, rank_choices, rank_layers, conv_rank_method)
    space = SearchSpace(choices, layer_bits, float(max_ratio), float(step),
                        quant_mode if bits is not None else None, left,
                        bits[0] if bits is not None and len(bits) == 1 else None, layer_ranks)
    if len(space) == 0:
        why = f"groups {left} are left whole" if left else "the analysis found no prunable channel group"
        raise ConfigError(
            f"the search space is empty: {why} (model inputs/outputs are never pruned; skip={list(ignore)}), "
            "no per-layer bit widths are searched (pass bits=(4, 8) to search them) and no ranks "
            "(pass ranks=(0.25, 0.5, 1.0))"
        )
    return space


def _check_ranks(ranks: Sequence[float] | None, method: str) -> tuple[float, ...] | None:
    if method not in RANK_METHODS:
        raise ConfigError(f"conv_rank_method must be one of {', '.join(RANK_METHODS)}; got {method!r}")
    if ranks is None:
        return None
    if isinstance(ranks, str) or not isinstance(ranks, Sequence):
        raise ConfigError(f"ranks must be a list of fractions of full rank in (0, 1], e.g. (0.25, 0.5, 1.0); "
                          f"got {ranks!r}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ConfigError(f"ranks: {r!r} is not a fraction of full rank in (0, 1] (1.0 leaves a layer alone)")
    out = tuple(sorted({round(float(r), 6) for r in ranks}))
    if not out:
        raise ConfigError("ranks must list at least one fraction of full rank, e.g. (0.25, 0.5, 1.0); or None")
    return out


def _rank_method(module: nn.Module, conv_method: str) -> Any:
    """The ``factorize_`` method object for ``module`` (its registered strategy)."""
    from torchslim._registry import get_method

    return get_method("lowrank.method", "svd" if isinstance(module, nn.Linear) else conv_method)()


def _rank_layers(model: nn.Module, choices: tuple[float, ...], globs: Sequence[str] | None,
                 conv_method: str) -> list[LayerRankChoice]:
    out = []
    for name, m in model.named_modules():
        if not name or not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if globs is not None and not any(matches(name, g) for g in globs):
            continue
        method = _rank_method(m, conv_method)
        if method.unsupported(m) is None and max(method.max_ranks(m)) >= 2:
            out.append(LayerRankChoice(name, choices, method.name))
    if not out:
        raise ConfigError(f"ranks={list(choices)}: no Linear or Conv2d (groups=1, full rank >= 2) layer "
                          f"{'matches rank_layers=' + repr(list(globs)) if globs is not None else 'in the model'}")
    return out


def _blocked_groups(model: nn.Module, example_inputs: Any, ignore: Sequence[str]) -> set[int]:
    """Groups ``prune_channels_`` leaves whole (their pruning breaks the forward), probed on a copy."""
    from torchslim.graph.spaces import meta_copy, to_meta
    from torchslim.prune import prune_channels_

    shadow = meta_copy(model)
    inputs = to_meta(example_inputs) if shadow is not None else example_inputs
    shadow = shadow if shadow is not None else copy.deepcopy(model)
    try:
        plan = prune_channels_(shadow, example_inputs=inputs, ratio=0.5, skip=tuple(ignore), importance=_index_importance)
    except Exception:  # noqa: BLE001 - shapes only; a real problem surfaces when a trial prunes
        return set()
    return set(plan.left_whole)


def _index_importance(model: nn.Module, groups: Any, group: Any) -> torch.Tensor:
    """Importance for shape-only copies: channel index order (the values do not matter)."""
    return torch.arange(group.size, dtype=torch.float32)
