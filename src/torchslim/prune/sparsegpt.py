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

from torchslim._layerwise import LayerStats, inverse_hessian_factor
from torchslim.data import batches_of
from torchslim.prune.masks import SparsityPlan
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
    w = weight.detach().double().clone()
    rows, cols = w.shape
    hinv = inverse_hessian_factor(hessian, damp)
    dead = torch.diag(hessian) == 0
    w[:, dead] = 0
    keep = torch.ones_like(w, dtype=torch.bool)
    total = round(sparsity * w.numel()) if pattern.kind != "nm" else 0
    pruned_so_far = 0
    if pattern.kind == "nm":  # an N:M group never straddles two blocks
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d = torch.diag(h1)
        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        if pattern.kind != "nm":
            target = round(sparsity * rows * i2) if i2 < cols else total
            k = target - pruned_so_far
            if k > 0:
                sal = (w1**2 / d.reshape(1, -1) ** 2).reshape(-1)
                prune1.view(-1)[sal.topk(k, largest=False).indices] = True
            pruned_so_far += k
        for i in range(i2 - i1):
            col = w1[:, i]
            if pattern.kind == "nm" and (i1 + i) % pattern.m == 0:
                sal = w1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].reshape(1, -1) ** 2
                drop = sal.topk(pattern.m - pattern.n, dim=1, largest=False).indices
                prune1[:, i : i + pattern.m].scatter_(1, drop, True)
            q = col.clone()
            q[prune1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        keep[:, i1:i2] = ~prune1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
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
        ConfigError: bad settings, a layer the pattern cannot divide, no or empty calibration
            data. The model is unchanged then.
    """
    calibration = batches_of(data, calibration, where="sparsegpt_")
    config = OneShotConfig(
        "sparsegpt", sparsity, pattern, calibration_batches, modules, skip, sequential, blocksize, damp
    )
    return one_shot_prune_(model, config, calibration, _sparsegpt_layer)
