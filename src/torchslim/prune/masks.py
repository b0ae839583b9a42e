"""Reversible weight masks: ``sparsify_``, ``finalize_`` and ``sparsity_report``.

A mask is a :mod:`torch.nn.utils.parametrize` parametrization (:class:`WeightMask`, defined in
:mod:`torchslim._masks` with :func:`set_masks_`, :func:`get_mask`, :func:`masked_weights` and
:func:`reapply_masks_`, which this module re-exports) holding a boolean buffer: the module's
``weight`` becomes ``original * mask``, where ``original`` is the *same* ``Parameter`` object
as before (optimizers keep working). Pruned entries of the original are also set to zero, so
profiles count the real non-zeros, and :class:`MaskCallback` keeps them at zero through momentum
/ Adam steps. Masks can be changed again (schedules raise the sparsity
step by step) until :func:`finalize_` bakes them in: the parametrizations go, the zeros stay,
and the model's state dict then stores each sparse weight compressed (bitmask or CSR, see
:mod:`torchslim.prune._sparse_io`), so ``ts.save`` writes a file that is really smaller.

Both steps are recorded as ``"sparsify"`` plans, so ``ts.save`` / ``ts.load`` round-trip masked
and finalized models alike.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.prune import sparsify_, finalize_, sparsity_report
    >>> model = ts.create_model("zoo:lenet300")
    >>> plan = sparsify_(model, sparsity=0.9, scope="global")
    >>> round(plan.overall, 4)
    0.9
    >>> round(sparsity_report(model).layers[0].sparsity, 2) < 1.0
    True
    >>> _ = finalize_(model)
    >>> hasattr(model.fc1, "parametrizations")
    False
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim._masks import (
    WeightMask,
    get_mask,
    mask_module,
    masked_weights,
    original,
    reapply_masks_,
    set_masks_,
    split_name,
)
from torchslim._modelinfo import FINALIZE_FIRST, refuse_applied
from torchslim._registry import get_method
from torchslim._select import Selector, check_patterns, matches
from torchslim.data import batches_of
from torchslim.errors import CheckpointError, ConfigError
from torchslim.prune import _sparse_io
from torchslim.prune.config import SparsifyConfig
from torchslim.prune.unstructured import (
    Criterion,
    ScoreContext,
    check_pattern,
    parse_pattern,
    select_masks,
)
from torchslim.train.callbacks import Callback, TrainState

__all__ = [
    "WeightMask",
    "SparsityPlan",
    "SparsityReport",
    "LayerSparsity",
    "MaskCallback",
    "prunable_weights",
    "masked_weights",
    "get_mask",
    "set_masks_",
    "reapply_masks_",
    "sparsify_",
    "finalize_",
    "sparsity_report",
]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# the mask parametrization itself lives below the families (torchslim._masks), shared with pack
_split = split_name
_mask_module = mask_module
_original = original


# what a mask cannot go on: a clustered weight is stored as a codebook (the parametrization's
# original is not the weight), so masking it would write zeros into the centroids
CANNOT_TAKE = {"pack": FINALIZE_FIRST}


def prunable_weights(model: nn.Module, modules: Sequence[str] | str | None = None) -> dict[str, nn.Module]:
    """``"layer.weight"`` -> module for the Linear/Conv weights to prune (biases and norms never).

    Args:
        modules: module names or globs (``"fc1"``, ``"features.*"``); all Linear/Conv layers by default.

    Raises:
        ConfigError: ``modules`` matches no Linear/Conv layer.
    """
    if isinstance(modules, str):
        modules = [modules]
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES) or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if modules is not None and not any(matches(name, pat) for pat in modules):
            continue
        found[f"{name}.weight" if name else "weight"] = module
    if not found:
        allowed = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
        from torchslim._modelinfo import integer_layers_note

        raise ConfigError(
            f"modules={modules!r} selects no Linear/Conv layer to prune; the model's are: {', '.join(allowed) or 'none'}"
            f"{integer_layers_note(model, 'sparsify_')}"
        )
    return found


class MaskCallback(Callback):
    """Keeps masked weights exactly zero while :func:`torchslim.fit` trains.

    After backward it zeroes the masked gradients of the originals; after every optimizer step
    it zeroes the masked originals again (momentum and Adam's moments would otherwise move them).
    """

    def on_train_begin(self, state: TrainState) -> None:
        reapply_masks_(state.model)

    def on_after_backward(self, state: TrainState) -> None:
        for name, module in masked_weights(state.model).items():
            pname = _split(name)[1]
            original = _original(module, pname)
            if original.grad is not None:
                original.grad.mul_(get_mask(module, pname))

    def on_step_end(self, state: TrainState) -> None:
        reapply_masks_(state.model)


# --------------------------------------------------------------------------- plans and reports


@dataclass
class SparsityPlan:
    """What :func:`sparsify_` did: the settings and the sparsity reached per weight.

    Attributes:
        method, scope, pattern: the criterion, ``"layer"``/``"global"`` and the pattern.
        sparsity: the requested sparsity (``None`` for N:M, where the pattern sets it).
        overrides: per-layer sparsity overrides (glob -> value).
        layers: weight name -> fraction of its entries now zero (masked).
        overall: fraction of all pruned-layer weights now masked.
        latency: with a latency ``target``: the measured ratio, runtime, threads, the Linear layers
            that run CSR (``csr_layers``), per-layer timings and every trial; else None.
    """

    method: str
    scope: str
    pattern: str
    sparsity: float | None
    overrides: dict[str, float] = field(default_factory=dict)
    layers: dict[str, float] = field(default_factory=dict)
    overall: float = 0.0
    latency: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerSparsity:
    """One row of :func:`sparsity_report`."""

    name: str
    shape: list[int]
    numel: int
    nonzero: int
    sparsity: float
    masked: bool
    storage: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SparsityReport:
    """Per-layer sparsity of the prunable weights, and totals."""

    layers: list[LayerSparsity]
    prunable_params: int
    prunable_nonzero: int
    total_params: int
    total_nonzero: int

    @property
    def overall(self) -> float:
        """Fraction of prunable weights that are zero."""
        return 1.0 - self.prunable_nonzero / max(self.prunable_params, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [r.to_dict() for r in self.layers],
            "prunable_params": self.prunable_params,
            "prunable_nonzero": self.prunable_nonzero,
            "total_params": self.total_params,
            "total_nonzero": self.total_nonzero,
            "overall": self.overall,
        }

    def table(self) -> Any:
        """A table, one row per layer: prints as plain text, renders as a rich table on a console."""
        from rich.table import Table

        from torchslim._text import printable

        t = Table(title=f"sparsity: {100 * self.overall:.2f}% of {self.prunable_params:,} prunable weights are zero")
        for col in ("layer", "shape", "params", "non-zero", "sparsity", "state"):
            t.add_column(col, justify="left" if col in ("layer", "state") else "right")
        for r in self.layers:
            state = "masked" if r.masked else (f"stored {r.storage}" if r.storage else "dense")
            t.add_row(r.name, "x".join(map(str, r.shape)), f"{r.numel:,}", f"{r.nonzero:,}", f"{100 * r.sparsity:.2f}%", state)
        return printable(t)


def sparsity_report(model: nn.Module, modules: Sequence[str] | str | None = None) -> SparsityReport:
    """Sparsity of every Linear/Conv weight (masked or not) and of the whole model.

    Example:
        >>> import torch
        >>> r = sparsity_report(torch.nn.Linear(4, 2))
        >>> (r.layers[0].name, r.layers[0].sparsity)
        ('weight', 0.0)
    """
    rows = []
    with torch.no_grad():
        for name, module in prunable_weights(model, modules).items():
            pname = _split(name)[1]
            w = getattr(module, pname)
            nz = int(torch.count_nonzero(w))
            storage = _sparse_io.sparse_storage(module).get(pname, "")
            storage = _sparse_io.best_format(w) if storage == "auto" else storage
            rows.append(
                LayerSparsity(
                    name, list(w.shape), w.numel(), nz, 1.0 - nz / max(w.numel(), 1),
                    get_mask(module, pname) is not None, storage,
                )
            )
        total = nonzero = 0
        for pname, p in model.named_parameters():
            if "parametrizations." not in pname:  # originals are counted as their effective weight
                total += p.numel()
                nonzero += int(torch.count_nonzero(p))
        for module in model.modules():
            for pname in getattr(module, "parametrizations", None) or ():
                w = getattr(module, pname)
                total += w.numel()
                nonzero += int(torch.count_nonzero(w))
    return SparsityReport(rows, sum(r.numel for r in rows), sum(r.nonzero for r in rows), total, nonzero)


# --------------------------------------------------------------------------- sparsify_ / finalize_


def _criterion(method: str | Criterion, seed: int) -> tuple[str, Criterion]:
    if isinstance(method, Criterion):
        return type(method).__name__.lower(), method
    if not isinstance(method, str):
        raise ConfigError(f"method must be a criterion name or a Criterion; got {type(method).__name__}")
    cls = get_method("prune.unstructured", method)
    return method, (cls(seed=seed) if method == "random" else cls())


def _rates(names: Iterable[str], sparsity: float | None, overrides: Mapping[str, float]) -> tuple[dict[str, float], set[str]]:
    rates, overridden = {}, set()
    for name in names:
        layer = _split(name)[0]
        for pat, value in overrides.items():
            if matches(layer, pat) or matches(name, pat):
                rates[name] = value
                overridden.add(name)
                break
        else:
            rates[name] = sparsity if sparsity is not None else 0.0
    return rates, overridden


def sparsify_(
    model: nn.Module,
    config: SparsifyConfig | Mapping[str, Any] | float | None = None,
    *,
    data: Any = None,
    calibration: Any = None,
    **overrides: Any,
) -> SparsityPlan:
    """Mask the smallest-scoring weights of ``model``'s Linear/Conv layers, in place.

    Sparsity is cumulative: a weight already masked counts as pruned first, so calling this
    again with a higher sparsity prunes further and never revives a weight (unless the new
    sparsity is lower). Magnitude gives exactly ``round(sparsity * n)`` zeros per layer (layer
    scope) or over all selected layers (global scope).

    Args:
        model: changed in place (weights get :class:`WeightMask` parametrizations).
        config: a :class:`~torchslim.prune.SparsifyConfig` (or a dict of its fields); a number
            is the sparsity (the older call form ``sparsify_(model, 0.9)``).
        data: batches for ``wanda`` (inputs) and ``snip`` / one-shot ``movement`` (labeled): a
            ``DataBundle`` (its train split) or any iterable of batches.
        calibration: the old name of ``data`` (still accepted).
        overrides: :class:`~torchslim.prune.SparsifyConfig` fields: ``sparsity`` (fraction in
            [0, 1]; ``None`` for N:M), ``method``, ``scope``, ``pattern``, ``block``, ``modules``,
            ``skip``, ``overrides`` (per-layer sparsity by pattern), ``calibration_batches``, ``seed``.

    Returns:
        A :class:`SparsityPlan` with the sparsity reached per weight.

    Raises:
        ConfigError: sparsity outside [0, 1]; an unknown method, scope, pattern or field; N > M; a
            layer whose shape the pattern cannot divide; a module pattern that selects nothing; a
            method that needs calibration without it; a clustered layer (``cluster_``; finalize
            it first). The model is unchanged then.
    """
    calibration = batches_of(data, calibration, where="sparsify_")
    if config is not None and not isinstance(config, (SparsifyConfig, Mapping)):
        if "sparsity" in overrides:
            raise ConfigError("sparsify_: sparsity given twice (positionally and as sparsity=)")
        config, overrides = None, {"sparsity": config, **overrides}
    cfg = SparsifyConfig.build(config, **overrides)
    pat = parse_pattern(cfg.pattern, cfg.block)
    sparsity, scope, overrides, calibration_batches = cfg.sparsity, cfg.scope, dict(cfg.overrides), cfg.calibration_batches
    method, seed, modules = cfg.method, cfg.seed, cfg.modules
    name, criterion = _criterion(method, seed)
    if criterion.needs_calibration and calibration is None:
        raise ConfigError(f"method {name!r} needs calibration data: pass data= a DataBundle or a DataLoader of batches")
    if scope == "global" and not criterion.comparable_across_layers:
        raise ConfigError(f"method {name!r} scores are not comparable across layers; use scope='layer'")
    names = [n for n, _ in model.named_modules()]
    Selector(modules, cfg.skip).check(names)  # a pattern selecting nothing: refused before any work
    check_patterns(list(overrides), names + [n for n, _ in model.named_parameters()], "overrides")
    targets = {w: m for w, m in prunable_weights(model, modules).items() if not any(matches(_split(w)[0], p) for p in cfg.skip)}
    if not targets:
        raise ConfigError(f"skip={list(cfg.skip)!r} leaves no Linear/Conv layer to prune")
    refuse_applied(model, list(dict.fromkeys(_split(w)[0] for w in targets)), "sparsify_", CANNOT_TAKE)
    for wname, module in targets.items():
        check_pattern(wname, getattr(module, _split(wname)[1]).shape, pat)
    latency = None
    if cfg.target is not None:  # the sparsity searched on measured latency (CSR where faster), on copies
        from torchslim._modelinfo import example_inputs
        from torchslim.prune.sparse_latency import search_sparsity

        base = cfg.replace(target=None, sparsity=0.0)
        sparsity, latency = search_sparsity(
            model, example_inputs(model), cfg.target,
            lambda copy, s: sparsify_(copy, base.replace(sparsity=s), calibration=calibration))
    rates, overridden = _rates(targets, sparsity, overrides)

    weights = {n: getattr(m, _split(n)[1]) for n, m in targets.items()}
    ctx = ScoreContext(model, targets, calibration, calibration_batches)
    scores = criterion.scores(weights, ctx)
    for n, module in targets.items():
        current = get_mask(module, _split(n)[1])
        if current is not None:
            scores[n] = scores[n].float().masked_fill(~current.to(scores[n].device), float("-inf"))
    masks = select_masks(
        scores, rates, scope=scope if pat.kind != "nm" else "layer", pattern=pat,
        per_row=criterion.per_row, layerwise=overridden,
    )
    new = set_masks_(model, masks)
    if new:
        from torchslim._modelinfo import model_info, record_plan

        if model_info(model) is not None:
            record_plan(model, {"kind": "sparsify", "action": "mask", "layers": sorted(new)})
    achieved = {n: 1.0 - float(m.float().mean()) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    overall = 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)
    return SparsityPlan(name, scope, str(pat), sparsity if pat.kind != "nm" else None, overrides, achieved, overall,
                        latency)


def finalize_(model: nn.Module, storage: str = "auto") -> SparsityReport:
    """Bake every mask into its weight and store sparse weights compressed from now on.

    The parametrizations are removed (the weight is the same ``Parameter`` object, zeros kept);
    the model's state dict, hence ``ts.save``'s file and ``ts.profile``'s ``size_bytes``, then
    holds each such weight as a bitmask or CSR (``storage``: ``"auto"`` picks the smallest per
    tensor, or ``"bitmask"``, ``"csr"``, ``"dense"``).

    Returns:
        The :func:`sparsity_report` after finalizing.

    Raises:
        ConfigError: unknown storage format (model unchanged).
    """
    if storage not in _sparse_io.FORMATS:
        raise ConfigError(f"storage must be one of {', '.join(_sparse_io.FORMATS)}; got {storage!r}")
    layers = masked_weights(model)
    _finalize_layers(model, sorted(layers), storage)
    if layers:
        from torchslim._modelinfo import model_info, record_plan

        if model_info(model) is not None:
            record_plan(model, {"kind": "sparsify", "action": "finalize", "layers": sorted(layers), "storage": storage})
    return sparsity_report(model)


def _finalize_layers(model: nn.Module, layers: Sequence[str], storage: str) -> None:
    modules = dict(model.named_modules())
    for name in layers:
        mname, pname = _split(name)
        module = modules[mname]
        if _mask_module(module, pname) is not None:
            _remove_parametrizations(module, pname)
        _sparse_io.attach_sparse_storage(module, [pname], storage)


def _remove_parametrizations(module: nn.Module, pname: str) -> None:
    """``remove_parametrizations`` that leaves deep copies of ``module`` intact.

    A deep copy of a parametrized module shares its injected class with the original, and
    removing a parametrization deletes the property from that class: finalizing a copy would
    make the original's ``weight`` vanish. Give the module a class of its own first (as
    ``pack.cluster`` does).
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    parametrize.remove_parametrizations(module, pname, leave_parametrized=True)


def _replay(model: nn.Module, plan: dict[str, Any]) -> None:
    """Re-create a saved sparsify step on a fresh model (placeholder masks; weights load after)."""
    action, layers = plan.get("action"), list(plan.get("layers", []))
    modules = dict(model.named_modules())
    for name in layers:
        mname, pname = _split(name)
        if mname not in modules or not isinstance(getattr(modules[mname], pname, None), torch.Tensor):
            raise CheckpointError(f"sparsify plan names {name!r}, which the rebuilt model does not have")
    if action == "mask":
        set_masks_(model, {n: torch.ones_like(getattr(modules[_split(n)[0]], _split(n)[1]), dtype=torch.bool) for n in layers})
    elif action == "finalize":
        _finalize_layers(model, layers, plan.get("storage", "auto"))
    else:
        raise CheckpointError(f"sparsify plan has unknown action {action!r} (known: mask, finalize)")


def _register() -> None:
    from torchslim._modelinfo import register_plan_kind

    register_plan_kind("sparsify", _replay)


_register()
