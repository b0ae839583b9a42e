"""The configs of the pruning verbs: :class:`PruneConfig` (``prune_channels_``), :class:`Budget`
and :class:`SparsifyConfig` (``sparsify_``).

Each is a frozen value, checked when built, that round-trips to JSON; the verbs, the recipe
stages and the CLI flags all read their defaults from here.

Example:
    >>> cfg = PruneConfig(ratio=0.5, skip=("fc3",), round_to=8)
    >>> PruneConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> SparsifyConfig(pattern="2:4").sparsity
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torchslim._config import ConfigDict
from torchslim._registry import get_method
from torchslim._select import as_patterns
from torchslim._utils import is_number
from torchslim.errors import ConfigError
from torchslim.profile.budget import Budget
from torchslim.prune.importance import get_importance
from torchslim.prune.unstructured import Criterion, parse_pattern, valid_sparsity

__all__ = ["ALLOCATIONS", "SCOPES", "Budget", "PruneConfig", "SparsifyConfig"]

ALLOCATIONS = ("uniform", "latency")
SCOPES = ("layer", "global")


def _ratio_map(value: Any, what: str) -> dict[str, float]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{what} must map module names or globs to fractions; got {value!r}")
    return dict(value)


@dataclass(frozen=True)
class PruneConfig(ConfigDict):
    """What :func:`~torchslim.prune.prune_channels_` removes.

    Attributes:
        ratio: fraction of each group's channels to remove, in [0, 1) (or give ``target``).
        target: a :class:`Budget` instead of ``ratio``: the ratio is searched until the pruned
            model's MACs / params / latency is within the budget's tolerance.
        importance: a registered criterion (``l1``, ``l2``, ``bn_scale``, ``fpgm``, ``taylor``,
            ``lamp``, ``random``) or a callable ``(model, groups, group) -> scores`` (not JSON).
        global_ranking: rank channels across groups (scores normalised per group).
        ratios: per-module ratios by name, glob or ``re:`` of the producing module.
        modules: only the channels of these modules are pruned (``None``: every module).
        skip: modules (names, globs, ``re:``) whose channels are left whole (was ``ignore``).
        round_to: kept widths are rounded up to a multiple of this (8 suits CPU/GPU kernels), or
            ``"auto"``: moved to nearby widths the runtime runs fastest, measured
            (:mod:`torchslim.prune.latency_budget`). ``None``: ``"auto"`` under a latency budget; under
            a MACs / params budget multiples of 16 (groups of 128+) or 8 (32+), falling back to
            single channels if blocks miss the budget (:mod:`torchslim.prune._widths`); else 1.
        min_channels: never keep fewer channels than this in a group.
        allocation: ``"uniform"`` or ``"latency"`` (each group's ratio scaled by its measured cost).
        uniform_layers: the same kept count in every layer for groups that play the same part in
            each layer (layer ``i``'s attention heads, its MLP width...), chosen by importance
            summed across layers under ``global_ranking``, so that a transformers config can
            describe the result (stock ``save_pretrained`` -> ``from_pretrained``). ``None``: on
            for transformers models, off otherwise.
    """

    ratio: float | None = None
    target: Budget | None = None
    importance: Any = "l2"
    global_ranking: bool = False
    ratios: dict[str, float] | None = None
    modules: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    round_to: int | str | None = None
    min_channels: int = 1
    allocation: str = "uniform"
    uniform_layers: bool | None = None

    def __post_init__(self) -> None:
        if self.ratio is not None and self.target is not None:
            raise ConfigError("PruneConfig: give one of ratio= (a fraction in [0, 1)) or target=Budget(...), not both")
        if self.ratio is not None and (not is_number(self.ratio) or not 0 <= self.ratio < 1):
            raise ConfigError(f"PruneConfig.ratio must be a fraction in [0, 1); got {self.ratio!r}")
        if isinstance(self.target, dict):
            object.__setattr__(self, "target", Budget.from_dict(self.target))
        if self.target is not None and not isinstance(self.target, Budget):
            raise ConfigError(f"PruneConfig.target must be a Budget; got {type(self.target).__name__}")
        if isinstance(self.importance, str):
            get_importance(self.importance)  # an unknown name: ConfigError with the close match
        elif not callable(self.importance):
            raise ConfigError(f"PruneConfig.importance must be a criterion name or a callable; got {self.importance!r}")
        if not isinstance(self.global_ranking, bool):
            raise ConfigError(f"PruneConfig.global_ranking must be True or False; got {self.global_ranking!r}")
        if self.ratios is not None:
            object.__setattr__(self, "ratios", _ratio_map(self.ratios, "PruneConfig.ratios"))
            for pattern, r in self.ratios.items():
                as_patterns(pattern, "PruneConfig.ratios")
                if not is_number(r) or not 0 <= r < 1:
                    raise ConfigError(f"PruneConfig.ratios[{pattern!r}] must be in [0, 1); got {r!r}")
        object.__setattr__(self, "modules", as_patterns(self.modules, "PruneConfig.modules"))
        object.__setattr__(self, "skip", as_patterns(self.skip, "PruneConfig.skip", none_ok=False))
        for name in ("round_to", "min_channels"):
            v = getattr(self, name)
            if name == "round_to" and v in (None, "auto"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                allowed = "an integer >= 1, 'auto' or None" if name == "round_to" else "an integer >= 1"
                raise ConfigError(f"PruneConfig.{name} must be {allowed}; got {v!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"PruneConfig.allocation must be one of {', '.join(ALLOCATIONS)}; got {self.allocation!r}")
        if self.uniform_layers is not None and not isinstance(self.uniform_layers, bool):
            raise ConfigError(f"PruneConfig.uniform_layers must be True, False or None (automatic); got {self.uniform_layers!r}")
        if self.allocation == "latency" and self.global_ranking:
            raise ConfigError("allocation='latency' sets per-group ratios itself: it cannot be combined with global_ranking")


@dataclass(frozen=True)
class SparsifyConfig(ConfigDict):
    """What :func:`~torchslim.prune.sparsify_` masks.

    Attributes:
        sparsity: fraction of weights to prune, in [0, 1]; ``None`` for an N:M pattern (implied).
        method: ``"magnitude"``, ``"random"``, ``"lamp"``, ``"movement"``, ``"wanda"``, ``"snip"``
            or a :class:`~torchslim.prune.unstructured.Criterion` instance (not JSON).
        scope: ``"layer"`` or ``"global"``.
        pattern: ``"unstructured"``, ``"N:M"`` such as ``"2:4"``, ``"block"`` or ``"block:RxC"``.
        block: block shape ``(rows, cols)`` for ``pattern="block"`` (default ``(1, 4)``).
        modules: module names, globs or ``re:`` patterns to prune (every Linear/Conv by default).
        skip: modules to leave dense.
        overrides: per-layer sparsity, pattern of module name -> value (pruned layer-wise).
        calibration_batches: at most this many calibration batches.
        seed: seed of the ``random`` criterion.
        target: a latency :class:`Budget` instead of ``sparsity`` (``Budget(latency=0.5,
            runtime="eager")``): the sparsity is searched on measured latency with the layers that
            run faster as CSR converted (:mod:`torchslim.prune.sparse_latency`); only runtimes with
            a sparse kernel take it (eager PyTorch: CSR ``nn.Linear``), the others are refused.
    """

    sparsity: float | None = None
    method: Any = "magnitude"
    scope: str = "layer"
    pattern: str = "unstructured"
    block: tuple[int, ...] | None = None
    modules: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    overrides: dict[str, float] = field(default_factory=dict)
    calibration_batches: int = 8
    seed: int = 0
    target: Budget | None = None

    def __post_init__(self) -> None:
        pat = parse_pattern(self.pattern, self.block)
        if isinstance(self.target, dict):
            object.__setattr__(self, "target", Budget.from_dict(self.target))
        if self.target is not None:
            if not isinstance(self.target, Budget):
                raise ConfigError(f"SparsifyConfig.target must be a Budget; got {type(self.target).__name__}")
            if self.target.latency is None:
                raise ConfigError("sparsify_ takes a latency Budget only (Budget(latency=F, runtime='eager')); "
                                  "for a share of the weights give sparsity= instead")
            if self.sparsity is not None:
                raise ConfigError("sparsify_: give one of sparsity= or target=Budget(latency=...), not both")
            if pat.kind != "unstructured":
                raise ConfigError(f"a latency Budget needs pattern='unstructured' (the CSR kernel); got {pat}")
            from torchslim.prune.sparse_latency import check_sparse_runtime

            check_sparse_runtime(self.target.runtime)
        if pat.kind == "nm":
            if self.sparsity is not None and not math.isclose(valid_sparsity(self.sparsity), pat.sparsity or 0.0):
                raise ConfigError(
                    f"pattern {pat} prunes exactly {pat.sparsity:g} of the weights; got sparsity={self.sparsity!r} (leave it out)"
                )
            object.__setattr__(self, "sparsity", pat.sparsity)
        elif self.sparsity is None:
            if self.target is None:
                raise ConfigError(f"sparsify_ needs sparsity= a number in [0, 1] (or target=Budget(latency=...)) "
                                  f"for pattern {pat}")
        else:
            object.__setattr__(self, "sparsity", valid_sparsity(self.sparsity))
        if self.block is not None:
            object.__setattr__(self, "block", tuple(self.block))
        if isinstance(self.method, str):
            get_method("prune.unstructured", self.method)  # unknown: ConfigError with the close match
        elif not isinstance(self.method, Criterion):
            raise ConfigError(f"method must be a criterion name or a Criterion; got {type(self.method).__name__}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be 'layer' or 'global'; got {self.scope!r}")
        object.__setattr__(self, "modules", as_patterns(self.modules, "modules"))
        object.__setattr__(self, "skip", as_patterns(self.skip, "skip", none_ok=False))
        overrides = _ratio_map(self.overrides or {}, "overrides")
        for key, value in overrides.items():
            as_patterns(key, "overrides")
            valid_sparsity(value, f"overrides[{key!r}]")
        object.__setattr__(self, "overrides", overrides)
        c = self.calibration_batches
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError(f"calibration_batches must be a positive integer; got {c!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer; got {self.seed!r}")
