"""Wanda: one-shot pruning by weights and activations, layer by layer (Sun et al. 2023).

Wanda scores every weight of a Linear layer by ``|W_ij| * ||X_j||_2``, its magnitude times the
norm of input feature ``j`` over the calibration tokens, and prunes the lowest scores of each
output row (unstructured) or the lowest ``M - N`` of every ``M`` consecutive inputs (N:M, e.g.
2:4). There is no weight update and no retraining. Layers are pruned in execution order, each
measured on the outputs of the layers already pruned (``sequential=True``, as in the paper's code).

This is torchslim's one Wanda: :func:`wanda_scores` is the score, :func:`input_norms` measures
``||X_j||^2`` through the layer-by-layer machinery (:mod:`torchslim._layerwise`), and the
``"wanda"`` criterion of :func:`torchslim.prune.sparsify_` calls both (all layers measured on the
unpruned model, as one criterion among the others).

The result is the same reversible mask state :func:`torchslim.prune.sparsify_` leaves (a
``"sparsify"`` plan, so ``ts.save`` / ``ts.load``, ``finalize_`` and ``sparsity_report`` work).

Example:
    >>> import torch
    >>> from torchslim.prune.wanda import wanda_
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> plan = wanda_(model, 0.5, calibration=[torch.randn(16, 8)])
    >>> plan.overall
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchslim._config import ConfigDict
from torchslim._layerwise import LayerStats, linear_layers, materialize_batches, run_layerwise
from torchslim._modelinfo import refuse_applied
from torchslim._select import as_patterns
from torchslim.data import batches_of
from torchslim.errors import ConfigError
from torchslim.prune.masks import CANNOT_TAKE, SparsityPlan, _original, set_masks_
from torchslim.prune.unstructured import Pattern, check_pattern, nm_mask, parse_pattern, valid_sparsity

__all__ = ["OneShotConfig", "input_norms", "one_shot_prune_", "wanda_", "wanda_mask", "wanda_scores"]

METHODS = ("wanda", "sparsegpt")


@dataclass(frozen=True)
class OneShotConfig(ConfigDict):
    """Settings of a one-shot, post-training pruning run (Wanda or SparseGPT).

    Attributes:
        method: ``"wanda"`` or ``"sparsegpt"``.
        sparsity: fraction of each layer's weights to prune, in [0, 1] (``None`` for N:M).
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        calibration_batches: at most this many calibration batches.
        modules: names, globs or ``re:`` patterns of the Linear layers to prune (all by default).
        skip: names, globs or ``re:`` patterns of Linear layers to leave dense.
        sequential: measure each layer on the already-pruned earlier layers' outputs.
        blocksize: SparseGPT columns per lazy-update block.
        damp: SparseGPT dampening, a fraction of the Hessian's mean diagonal.
    """


    method: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    calibration_batches: int = 32
    modules: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    sequential: bool = True
    blocksize: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"OneShotConfig.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        pat = parse_pattern(self.pattern)
        if pat.kind == "block":
            raise ConfigError(f"OneShotConfig.pattern must be 'unstructured' or 'N:M'; got {self.pattern!r}")
        if pat.kind == "nm":
            if self.sparsity is not None and not math.isclose(valid_sparsity(self.sparsity), pat.sparsity or 0.0):
                raise ConfigError(f"pattern {pat} prunes exactly {pat.sparsity:g}; got sparsity={self.sparsity!r} (leave it out)")
        elif self.sparsity is None:
            raise ConfigError("OneShotConfig.sparsity is required for the unstructured pattern")
        else:
            valid_sparsity(self.sparsity)
        for name in ("calibration_batches", "blocksize"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"OneShotConfig.{name} must be a positive integer; got {v!r}")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not 0 <= self.damp < 1:
            raise ConfigError(f"OneShotConfig.damp must be a number in [0, 1); got {self.damp!r}")
        object.__setattr__(self, "modules", as_patterns(self.modules, "OneShotConfig.modules"))
        object.__setattr__(self, "skip", as_patterns(self.skip, "OneShotConfig.skip") or ())

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def rate(self) -> float:
        """The sparsity this config prunes to."""
        pat = self.parsed_pattern
        return float(pat.sparsity if pat.kind == "nm" else self.sparsity)  # type: ignore[arg-type]


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score of every weight, ``|W_ij| * ||X_j||_2``, from ``sq_norms[j] = ||X_j||^2``.

    ``j`` indexes dimension 1 of the weight: a Linear's input features, a convolution's input
    channels (the score then covers every kernel position of that channel). Float32.

    Example:
        >>> wanda_scores(torch.tensor([[1.0, -2.0]]), torch.tensor([9.0, 1.0])).tolist()
        [[3.0, 2.0]]
    """
    norms = sq_norms.detach().float().clamp_min(0).sqrt().to(weight.device)
    shape = [1, -1] + [1] * (weight.dim() - 2) if weight.dim() > 1 else [-1]
    return weight.detach().abs().float() * norms.reshape(shape)


def input_norms(
    model: nn.Module, layers: Mapping[str, nn.Module], calibration: Iterable[Any] | None, max_batches: int
) -> dict[str, torch.Tensor]:
    """``||X_j||^2`` of every input feature (channel) of each layer, on the unpruned ``model``.

    Args:
        layers: name -> Linear or convolution.
        calibration: batches of model inputs (see :func:`torchslim._layerwise.materialize_batches`).
        max_batches: at most this many batches.

    Returns:
        name -> ``(in_features,)``; a layer the batches never reach gets ones (Wanda is then magnitude).

    Raises:
        ConfigError: no or empty calibration data.
    """
    batches = materialize_batches(calibration, max_batches, "wanda")
    out: dict[str, torch.Tensor] = {}

    def keep(name: str, module: nn.Module, stats: LayerStats) -> None:
        out[name] = _norms(stats)

    run_layerwise(model, dict(layers), batches, keep, full=False, sequential=False)
    return out


def wanda_mask(weight: torch.Tensor, sq_norms: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of a ``(out, in)`` weight from Wanda scores ``|W| * sqrt(sq_norms)``.

    Unstructured: the ``round(sparsity * in)`` lowest scores of each row go. N:M: the ``M - N``
    lowest of every ``M`` consecutive inputs go.

    Example:
        >>> w = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
        >>> wanda_mask(w, torch.tensor([4.0, 1.0, 9.0, 0.0]), 0.5, Pattern()).int().tolist()
        [[1, 0, 1, 0]]
    """
    score = wanda_scores(weight, sq_norms)
    if pattern.kind == "nm":
        return nm_mask(score, pattern.n, pattern.m)
    k = round(sparsity * weight.shape[1])
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


def one_shot_prune_(
    model: nn.Module,
    config: OneShotConfig,
    calibration: Iterable[Any] | None,
    prune_layer: Any,
) -> SparsityPlan:
    """Shared driver of Wanda and SparseGPT: validate, run layer by layer, set masks, record the plan.

    ``prune_layer(weight, stats, config) -> (new_weight, keep_mask)``. On any error every weight
    is restored and no mask is set.
    """
    pat = config.parsed_pattern
    layers = linear_layers(model, config.modules, config.skip)
    refuse_applied(model, layers, f"{config.method}_", CANNOT_TAKE)  # before any change
    for n, m in layers.items():
        check_pattern(f"{n}.weight", m.weight.shape, pat)
    batches = materialize_batches(calibration, config.calibration_batches, config.method)
    backup = {n: _original(m, "weight").detach().clone() for n, m in layers.items()}
    masks: dict[str, torch.Tensor] = {}

    def process(name: str, module: nn.Linear, stats: LayerStats) -> None:
        original = _original(module, "weight")
        new_w, keep = prune_layer(module.weight.detach(), stats, config)
        with torch.no_grad():
            original.copy_(new_w.to(original.dtype) * keep)
        masks[f"{name}.weight"] = keep

    try:
        run_layerwise(model, layers, batches, process, full=config.method != "wanda", sequential=config.sequential)
        new = set_masks_(model, masks)
    except BaseException:
        with torch.no_grad():
            for n, m in layers.items():
                _original(m, "weight").copy_(backup[n])
        raise
    if new:
        from torchslim._modelinfo import model_info, record_plan

        if model_info(model) is not None:
            record_plan(model, {"kind": "sparsify", "action": "mask", "layers": sorted(new)})
    achieved = {n: 1.0 - float(k.float().mean()) for n, k in masks.items()}
    total = sum(k.numel() for k in masks.values())
    overall = 1.0 - sum(int(k.sum()) for k in masks.values()) / max(total, 1)
    return SparsityPlan(config.method, "layer", str(pat), config.sparsity if pat.kind != "nm" else None, {}, achieved, overall)


def _norms(stats: LayerStats) -> torch.Tensor:
    """The squared input norms per feature; ones for a layer the batches never reached (magnitude)."""
    return stats.sq if stats.rows else torch.ones_like(stats.sq)


def _wanda_layer(weight: torch.Tensor, stats: LayerStats, config: OneShotConfig) -> tuple[torch.Tensor, torch.Tensor]:
    keep = wanda_mask(weight, _norms(stats), config.rate, config.parsed_pattern)
    return weight, keep


def wanda_(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    pattern: str = "unstructured",
    data: Any = None,
    calibration: Iterable[Any] | None = None,
    calibration_batches: int = 32,
    modules: Sequence[str] | str | None = None,
    skip: Sequence[str] | str = (),
    sequential: bool = True,
) -> SparsityPlan:
    """Prune ``model``'s Linear layers with Wanda on calibration batches, in place.

    Args:
        model: changed in place (masks on the selected Linear weights).
        sparsity: fraction of each row to prune (unstructured); leave ``None`` for ``"N:M"``.
        pattern: ``"unstructured"`` or ``"N:M"`` such as ``"2:4"``.
        data: the batches (a ``DataBundle``: its train split; or any iterable of batches);
            ``calibration=`` is its old name, still accepted.
        calibration: batches of model inputs: tensors, ``(inputs, targets)`` pairs, or dicts of
            keyword inputs (a tokenizer's output).
        calibration_batches: at most this many batches.
        modules, skip: names, globs or ``re:`` patterns selecting the Linear layers (all by
            default; see :func:`torchslim._select.select_modules`).
        sequential: measure each layer after the earlier ones were pruned.

    Returns:
        A :class:`~torchslim.prune.masks.SparsityPlan` (method ``"wanda"``).

    Raises:
        ConfigError: bad sparsity / pattern, a layer the pattern cannot divide, no or empty
            calibration data. The model is unchanged then.
    """
    calibration = batches_of(data, calibration, where="wanda_")
    config = OneShotConfig("wanda", sparsity, pattern, calibration_batches, modules, skip, sequential)
    return one_shot_prune_(model, config, calibration, _wanda_layer)
