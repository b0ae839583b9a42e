"""SparseGPT: one-shot pruning with second-order weight reconstruction (Frantar & Alistarh 2023).

For a Linear layer with calibration inputs ``X`` and Hessian ``H = 2 X^T X / n`` (dampened by
``damp * mean(diag H)``), SparseGPT walks the input columns left to right. In each block of
``blocksize`` columns it picks the weights to prune by the OBS saliency ``w^2 / [H^-1]_jj^2``
(adaptive mask selection; for N:M, among every ``M`` consecutive columns of each row), and after
zeroing column ``j`` it spreads the error onto the not-yet-visited columns,
``W[:, j+1:] -= (w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j+1:}`` (with ``H^-1`` as the upper
Cholesky factor of the inverse, as in the paper's Algorithm 1), so the layer's output on the
calibration data changes as little as possible. Layers go in execution order, each measured on
the outputs of the layers already pruned.

Unstructured sparsity is exact per layer: ``round(sparsity * numel)`` weights, distributed over
the column blocks by cumulative rounding.

Example:
    >>> import torch
    >>> from torchslim.prune.sparsegpt import sparsegpt_
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> sparsegpt_(model, pattern="2:4", calibration=[torch.randn(32, 8)]).overall
    0.5
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from torchslim._layerwise import LayerStats, inverse_hessian_factor, linear_layers, obs_sweep
from torchslim._modelinfo import refuse_applied
from torchslim.data import batches_of
from torchslim.prune.masks import CANNOT_TAKE, SparsityPlan
from torchslim.prune.unstructured import Pattern
from torchslim.prune.wanda import OneShotConfig, one_shot_prune_

__all__ = ["sparsegpt_", "sparsegpt_prune", "inverse_hessian_factor"]


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern | None = None,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one ``(out, in)`` weight with SparseGPT; return ``(new_weight, keep_mask)``.

    ``new_weight`` is zero where ``keep_mask`` is False, the surviving weights reconstructed.
    """
    pattern = pattern or Pattern()
    rows, cols = weight.shape
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    total = round(sparsity * weight.numel()) if pattern.kind != "nm" else 0
    pruned_so_far = 0
    if pattern.kind == "nm":  # an N:M group never straddles two blocks
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)

    def choose(i1: int, i2: int, w1: torch.Tensor, h1: torch.Tensor) -> None:
        # unstructured: the block's share of the target, lowest saliency w^2 / d^2 first
        nonlocal pruned_so_far
        if pattern.kind != "nm":
            target = round(sparsity * rows * i2) if i2 < cols else total
            k = target - pruned_so_far
            if k > 0:
                sal = (w1**2 / torch.diag(h1).reshape(1, -1) ** 2).reshape(-1)
                drop = torch.zeros_like(w1, dtype=torch.bool)
                drop.view(-1)[sal.topk(k, largest=False).indices] = True
                keep[:, i1:i2] = ~drop
            pruned_so_far += k

    def prune(j: int, i: int, w1: torch.Tensor, h1: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        if pattern.kind == "nm" and j % pattern.m == 0:  # N:M: each group of M chosen on the updated weights
            d = torch.diag(h1)[i : i + pattern.m]
            sal = w1[:, i : i + pattern.m] ** 2 / d.reshape(1, -1) ** 2
            drop = sal.topk(pattern.m - pattern.n, dim=1, largest=False).indices
            keep[:, j : j + pattern.m].scatter_(1, drop, False)
        q = w1[:, i].clone()
        q[~keep[:, j]] = 0
        return q

    w = obs_sweep(weight, hessian, prune, blocksize=blocksize, damp=damp, on_block=choose)
    return w.to(weight.dtype), keep


def _sparsegpt_layer(weight: torch.Tensor, stats: LayerStats, config: OneShotConfig) -> tuple[torch.Tensor, torch.Tensor]:
    h = stats.hessian(weight.device)  # the identity for a layer never called: magnitude inside SparseGPT
    return sparsegpt_prune(weight, h, config.rate, config.parsed_pattern, blocksize=config.blocksize, damp=config.damp)


def sparsegpt_(
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
    blocksize: int = 128,
    damp: float = 0.01,
) -> SparsityPlan:
    """Prune ``model``'s Linear layers with SparseGPT on calibration batches, in place.

    Args:
        model: changed in place: surviving weights are updated, pruned ones masked.
        sparsity: fraction of each layer to prune (unstructured); leave ``None`` for ``"N:M"``.
        pattern: ``"unstructured"`` or ``"N:M"`` such as ``"2:4"``.
        data: the batches (a ``DataBundle``: its train split; or any iterable of batches);
            ``calibration=`` is its old name, still accepted.
        calibration: batches of model inputs (tensors, ``(inputs, targets)`` pairs, dicts).
        calibration_batches: at most this many batches.
        modules, skip: names, globs or ``re:`` patterns selecting the Linear layers (all by
            default; see :func:`torchslim._select.select_modules`).
        sequential: measure each layer after the earlier ones were pruned.
        blocksize: columns per lazy-update block.
        damp: Hessian dampening as a fraction of its mean diagonal.

    Returns:
        A :class:`~torchslim.prune.masks.SparsityPlan` (method ``"sparsegpt"``).

    Raises:
        ConfigError: bad settings, a layer the pattern cannot divide, a clustered layer
            (``cluster_``; finalize it first), no or empty calibration data. The model is
            unchanged then.
    """
    calibration = batches_of(data, calibration, where="sparsegpt_")
    config = OneShotConfig(
        "sparsegpt", sparsity, pattern, calibration_batches, modules, skip, sequential, blocksize, damp
    )
    refuse_applied(model, linear_layers(model, config.modules, config.skip), "sparsegpt_", CANNOT_TAKE)
    return one_shot_prune_(model, config, calibration, _sparsegpt_layer)
