"""Per-weight pruning criteria and the sparsity patterns that turn their scores into masks.

This is the tensor layer under :func:`torchslim.prune.sparsify_`: a *criterion* scores every
weight of the layers to prune (higher = more important), and :func:`select_masks` keeps the
highest-scoring weights under a *pattern*:

- ``"unstructured"``: any weight may go; the number pruned is ``round(sparsity * n)`` per layer
  (``scope="layer"``) or over all layers together (``scope="global"``), exactly.
- ``"N:M"`` (e.g. ``"2:4"``): in every group of ``M`` consecutive weights along the input axis
  (input channels for convolutions), the ``N`` best are kept.
- ``"block"``: tiles of ``block = (rows, cols)`` of the ``(out, in)`` weight matrix are kept or
  pruned together, scored by their mean.

Criteria (registered under ``prune.unstructured``; ``ts.list_methods("prune")`` lists them):
``magnitude``, ``random``, ``lamp`` (Lee et al. 2021), ``movement`` (Sanh et al. 2020),
``wanda`` (Sun et al. 2024; needs calibration batches) and ``snip`` (Lee et al. 2019; needs a
labeled calibration batch, meant for initialisation).

Example:
    >>> import torch
    >>> w = {"fc.weight": torch.tensor([[0.1, -2.0, 0.3, 4.0]])}
    >>> masks = select_masks(Magnitude().scores(w), 0.5)
    >>> masks["fc.weight"].int().tolist()
    [[0, 1, 0, 1]]
    >>> select_masks(Magnitude().scores(w), None, pattern="1:2")["fc.weight"].int().tolist()
    [[0, 1, 0, 1]]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._masks import original
from torchslim._registry import register_method
from torchslim._utils import evaluating, is_int, is_number, logits_of, model_device
from torchslim.errors import ConfigError

__all__ = [
    "Pattern",
    "parse_pattern",
    "select_masks",
    "Magnitude",
    "RandomScores",
    "LAMP",
    "Movement",
    "Wanda",
    "SNIP",
    "lamp_scores",
    "nm_mask",
]

Scores = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: ``kind`` is ``"unstructured"``, ``"nm"`` or ``"block"``."""

    kind: str = "unstructured"
    n: int = 0
    m: int = 0
    block: tuple[int, int] = (1, 1)

    @property
    def sparsity(self) -> float | None:
        """The sparsity the pattern implies (N:M only)."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.block[0]}x{self.block[1]}"
        return "unstructured"


_ALLOWED_PATTERNS = "'unstructured', 'N:M' (e.g. '2:4'), 'block' or 'block:RxC' (e.g. 'block:1x4')"


def parse_pattern(pattern: str | Pattern, block: Iterable[int] | None = None) -> Pattern:
    """Parse ``"unstructured"``, ``"2:4"``/``"N:M"``, ``"block"`` (with ``block``) or ``"block:4x1"``.

    Raises:
        ConfigError: unknown pattern, ``N > M``, ``N < 1`` or a non-positive block size.
    """
    if isinstance(pattern, Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise ConfigError(f"pattern must be a string, one of {_ALLOWED_PATTERNS}; got {pattern!r}")
    text = pattern.strip().lower()
    if text == "unstructured":
        return Pattern()
    nm = re.fullmatch(r"(\d+):(\d+)", text)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 1 <= n <= m:
            raise ConfigError(f"pattern {pattern!r}: N:M needs 1 <= N <= M (keep N of every M weights); got N={n}, M={m}")
        return Pattern("nm", n, m)
    bl = re.fullmatch(r"block(?::(\d+)x(\d+))?", text)
    if bl:
        if bl.group(1):
            shape = (int(bl.group(1)), int(bl.group(2)))
        else:
            shape = tuple(block) if block is not None else (1, 4)  # type: ignore[assignment]
        if len(shape) != 2 or not all(is_int(s) and s >= 1 for s in shape):
            raise ConfigError(f"block must be two positive integers (rows, cols); got {shape!r}")
        return Pattern("block", block=(int(shape[0]), int(shape[1])))
    raise ConfigError(f"unknown sparsity pattern {pattern!r}; allowed: {_ALLOWED_PATTERNS}")


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` view of a weight; conv weights ``(out, in, *k)`` become ``(out, k..., in)``."""
    if t.dim() <= 1:
        return t.reshape(1, -1)
    if t.dim() == 2:
        return t
    return t.movedim(1, -1).reshape(t.shape[0], -1)


def _from_matrix(mat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() <= 2:
        return mat.reshape(like.shape)
    moved = (like.shape[0], *like.shape[2:], like.shape[1])
    return mat.reshape(moved).movedim(-1, 1)


def check_pattern(name: str, shape: torch.Size | tuple[int, ...], pattern: Pattern) -> None:
    """Raise ``ConfigError`` if a weight of ``shape`` cannot take ``pattern``."""
    if pattern.kind == "nm":
        axis = shape[1] if len(shape) >= 2 else shape[0]
        if axis % pattern.m:
            raise ConfigError(
                f"pattern {pattern}: {name} has {axis} input features/channels, not divisible by M={pattern.m}; "
                "exclude the layer with modules=... or pick an M that divides it"
            )
    elif pattern.kind == "block":
        rows, cols = _as_matrix(torch.empty(shape, device="meta")).shape
        br, bc = pattern.block
        if rows % br or cols % bc:
            raise ConfigError(
                f"pattern {pattern}: {name} is a {rows}x{cols} matrix, not divisible into {br}x{bc} blocks; "
                "exclude the layer with modules=... or pick another block"
            )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` along the input axis.

    Example:
        >>> nm_mask(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2, 4).int().tolist()
        [[0, 1, 1, 0]]
    """
    mat = _as_matrix(scores)
    groups = mat.reshape(mat.shape[0], -1, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return _from_matrix(mask.reshape(mat.shape), scores)


def _prune_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask over ``flat`` with exactly the ``k`` lowest scores set to False."""
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, largest=False).indices] = False
    return mask


def _block_scores(scores: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    mat = _as_matrix(scores)
    br, bc = block
    r, c = mat.shape
    return mat.reshape(r // br, br, c // bc, bc).mean(dim=(1, 3))


def _expand_blocks(tile_mask: torch.Tensor, block: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    mat = tile_mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return _from_matrix(mat, like)


def select_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | Mapping[str, float] | None,
    *,
    scope: str = "layer",
    pattern: str | Pattern = "unstructured",
    per_row: bool = False,
    layerwise: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = keep) from importance ``scores`` (higher = more important).

    Args:
        scores: name -> score tensor of the weight's shape. ``-inf`` marks weights that must go
            first (already pruned).
        sparsity: fraction to prune, one value or name -> value. Ignored (may be ``None``) for N:M.
        scope: ``"layer"`` prunes each tensor to its sparsity; ``"global"`` ranks all tensors
            not in ``layerwise`` together (they must share one sparsity); scores must then be
            comparable across layers.
        pattern: see :func:`parse_pattern`.
        per_row: in layer scope, prune each output row to the sparsity (as Wanda compares).
        layerwise: names pruned on their own even in global scope (per-layer overrides).

    Raises:
        ConfigError: bad scope, or a pattern the tensor shapes cannot take.
    """
    pat = parse_pattern(pattern)
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope must be 'layer' or 'global'; got {scope!r}")
    for name, s in scores.items():
        check_pattern(name, s.shape, pat)
    if pat.kind == "nm":
        return {name: nm_mask(s, pat.n, pat.m) for name, s in scores.items()}
    if sparsity is None:
        raise ConfigError(f"pattern {pat} needs a sparsity")
    rates = {name: float(sparsity[name]) if isinstance(sparsity, Mapping) else float(sparsity) for name in scores}
    # units: elements, or block tiles
    units = {name: (_block_scores(s, pat.block) if pat.kind == "block" else s) for name, s in scores.items()}
    keep_units: dict[str, torch.Tensor] = {}
    if scope == "global":
        shared = [n for n in units if n not in set(layerwise)]
        if len({rates[n] for n in shared}) > 1:
            raise ConfigError("global scope needs one common sparsity for the globally ranked layers")
        if shared:
            device = units[shared[0]].device
            flat = torch.cat([units[n].reshape(-1).float().to(device) for n in shared])
            keep = _prune_lowest(flat, round(rates[shared[0]] * flat.numel()))
            offset = 0
            for n in shared:
                size = units[n].numel()
                keep_units[n] = keep[offset : offset + size].reshape(units[n].shape).to(units[n].device)
                offset += size
    for name, u in units.items():
        if name in keep_units:
            continue
        if per_row and pat.kind == "unstructured":
            mat = _as_matrix(u)
            k = round(rates[name] * mat.shape[1])
            if k > 0:
                idx = mat.topk(k, dim=1, largest=False).indices
                row_keep = torch.ones_like(mat, dtype=torch.bool).scatter_(1, idx, False)
            else:
                row_keep = torch.ones_like(mat, dtype=torch.bool)
            keep_units[name] = _from_matrix(row_keep, u)
        else:
            keep_units[name] = _prune_lowest(u.reshape(-1), round(rates[name] * u.numel())).reshape(u.shape)
    if pat.kind == "block":
        return {n: _expand_blocks(keep_units[n], pat.block, scores[n]) for n in scores}
    return keep_units


# --------------------------------------------------------------------------- criteria


@dataclass
class ScoreContext:
    """What a criterion may use besides the weights.

    Attributes:
        model: the model (effective, masked weights in place).
        modules: weight name (``"fc1.weight"``) -> owning module.
        calibration: an iterable of ``(inputs, targets)`` or ``inputs`` batches, or None.
        max_batches: how many calibration batches to use.
    """

    model: nn.Module | None = None
    modules: Mapping[str, nn.Module] | None = None
    calibration: Any = None
    max_batches: int = 8


class Criterion:
    """Scores every weight (higher = more important). Subclasses override :meth:`scores`."""

    needs_calibration = False
    comparable_across_layers = True
    per_row = False

    def scores(self, weights: Mapping[str, torch.Tensor], ctx: ScoreContext | None = None) -> Scores:
        raise NotImplementedError


@register_method("prune.unstructured", "magnitude", description="|w| (Han et al. 2015)")
class Magnitude(Criterion):
    """Magnitude ``|w|``: the classic criterion, and the one lottery tickets use."""

    def scores(self, weights: Mapping[str, torch.Tensor], ctx: ScoreContext | None = None) -> Scores:
        return {n: w.detach().abs() for n, w in weights.items()}


@register_method("prune.unstructured", "random", description="uniform random scores (a control)")
class RandomScores(Criterion):
    """Uniform random scores: the random-pruning control. Seeded for reproducibility."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def scores(self, weights: Mapping[str, torch.Tensor], ctx: ScoreContext | None = None) -> Scores:
        gen = torch.Generator().manual_seed(int(self.seed))
        return {n: torch.rand(w.shape, generator=gen).to(w.device) for n, w in weights.items()}


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score ``w_u^2 / sum_{v >= u} w_v^2`` (weights sorted by magnitude, Lee et al. 2021).

    Example:
        >>> [round(v, 4) for v in lamp_scores(torch.tensor([1.0, 2.0])).tolist()]  # 1/(1+4), 4/4
        [0.2, 1.0]
    """
    sq = weight.detach().reshape(-1).double() ** 2
    order = torch.argsort(sq)
    sorted_sq = sq[order]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
    out = torch.empty_like(sq)
    out[order] = sorted_sq / tail.clamp_min(torch.finfo(torch.float64).tiny)
    return out.float().reshape(weight.shape)


@register_method("prune.unstructured", "lamp", description="layer-adaptive magnitude score (Lee et al. 2021)")
class LAMP(Criterion):
    """Layer-adaptive magnitude pruning: magnitudes rescaled so a global threshold is fair to every layer."""

    def scores(self, weights: Mapping[str, torch.Tensor], ctx: ScoreContext | None = None) -> Scores:
        return {n: lamp_scores(w) for n, w in weights.items()}


def _batches(calibration: Any, limit: int) -> Iterable[tuple[Any, Any]]:
    for i, batch in enumerate(calibration):
        if i >= limit:
            return
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            yield batch[0], batch[1]
        else:
            yield batch, None


def _need(ctx: ScoreContext | None, method: str, labels: bool) -> ScoreContext:
    if ctx is None or ctx.calibration is None or ctx.model is None or ctx.modules is None:
        what = "labeled (inputs, targets) batches" if labels else "batches of inputs"
        raise ConfigError(f"method {method!r} needs calibration data: pass calibration= a DataLoader of {what}")
    return ctx


def _weight_grads(ctx: ScoreContext, weights: Mapping[str, torch.Tensor], method: str) -> Scores:
    """Sum over calibration batches of dL/dw (cross-entropy) for each named weight."""
    model = ctx.model
    assert model is not None and ctx.modules is not None  # checked by _need
    device = model_device(model)
    grads = {n: torch.zeros_like(w) for n, w in weights.items()}
    params = {n: original(ctx.modules[n], n.rsplit(".", 1)[-1]) for n in weights}  # the stored tensor, not w * mask
    seen = 0
    with evaluating(model):
        for inputs, targets in _batches(ctx.calibration, ctx.max_batches):
            if targets is None:
                raise ConfigError(f"method {method!r} needs labeled calibration batches (inputs, targets)")
            tensors = [p for p in params.values()]
            loss = F.cross_entropy(logits_of(model(inputs.to(device))), targets.to(device))
            gs = torch.autograd.grad(loss, tensors, allow_unused=True)
            for n, g in zip(params, gs):
                if g is not None:
                    grads[n] += g.detach()
            seen += 1
    if seen == 0:
        raise ConfigError(f"method {method!r} got no calibration batches")
    return grads


@register_method("prune.unstructured", "snip", description="|w * dL/dw| at initialisation (Lee et al. 2019)")
class SNIP(Criterion):
    """SNIP connection sensitivity ``|w * dL/dw|`` on labeled calibration batches (prune at init)."""

    needs_calibration = True

    def scores(self, weights: Mapping[str, torch.Tensor], ctx: ScoreContext | None = None) -> Scores:
        ctx = _need(ctx, "snip", labels=True)
        grads = _weight_grads(ctx, weights, "snip")
        return {n: (w.detach() * grads[n]).abs() for n, w in weights.items()}


@register_method("prune.unstructured", "movement", description="-sum(w * dL/dw) over fine-tuning (Sanh et al. 2020)")
class Movement(Criterion):
    """Movement pruning: keep weights moving away from zero, ``S = -sum_t w_t * dL/dw_t``.

    Scores accumulate while fine-tuning: :meth:`accumulate` adds ``-w * grad`` for the current
    step (the pruning schedules call it after every backward when the criterion is movement).
    Without accumulated scores, :meth:`scores` takes one pass over labeled calibration batches
    (a first-order estimate, not true movement).
    """

    needs_calibration = False

    def __init__(self) -> None:
        self.scores_: Scores = {}

    def accumulate(self, weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None]) -> None:
        """Add ``-w * grad`` of one optimisation step."""
        for n, w in weights.items():
            g = grads.get(n)
            if g is None:
                continue
            term = -(w.detach() * g.detach())
            self.scores_[n] = term if n not in self.scores_ else self.scores_[n] + term

    def scores(self, weights: Mapping[str, torch.Tensor], ctx: ScoreContext | None = None) -> Scores:
        if all(n in self.scores_ for n in weights):
            return {n: self.scores_[n].clone() for n in weights}
        ctx = _need(ctx, "movement", labels=True)
        grads = _weight_grads(ctx, weights, "movement")
        return {n: -(w.detach() * grads[n]) for n, w in weights.items()}


@register_method("prune.unstructured", "wanda", description="|w| * ||x||_2 per input feature (Sun et al. 2024)")
class Wanda(Criterion):
    """Wanda: ``|w_ij| * ||X_j||_2`` with input-feature norms from calibration batches.

    As in the paper, weights compete within each output row (layer scope). For convolutions
    ``X_j`` is input channel ``j`` over all positions. The scores come from
    :func:`torchslim.prune.wanda.wanda_scores` on :func:`~torchslim.prune.wanda.input_norms`
    (every layer measured on the unpruned model); :func:`~torchslim.prune.wanda.wanda_` is the
    same Wanda run layer by layer.
    """

    needs_calibration = True
    comparable_across_layers = False
    per_row = True

    def scores(self, weights: Mapping[str, torch.Tensor], ctx: ScoreContext | None = None) -> Scores:
        ctx = _need(ctx, "wanda", labels=False)
        assert ctx.model is not None and ctx.modules is not None
        # the one Wanda (prune.wanda) builds on this module's patterns: imported when scoring
        from torchslim.prune.wanda import input_norms, wanda_scores

        sq = input_norms(ctx.model, {n: ctx.modules[n] for n in weights}, ctx.calibration, ctx.max_batches)
        return {n: wanda_scores(w, sq[n]).to(w.dtype) for n, w in weights.items()}


def valid_sparsity(value: Any, what: str = "sparsity") -> float:
    """``value`` as a float in [0, 1], else ``ConfigError``."""
    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{what} must be a number in [0, 1] (fraction of weights to prune); got {value!r}")
    return float(value)
