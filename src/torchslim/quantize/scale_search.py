"""Per-group scale search for symmetric low-bit weights (int4 and below): which step each group gets.

A symmetric signed b-bit group stores integers in ``[-2^(b-1), 2^(b-1) - 1]`` (``[-8, 7]`` for
int4) and one scale ``s``; the weight is ``q * s``. The old rule (``scale_rule="absmax"``) maps
``max|w|`` to 7.5 steps, ``s = max|w| / 7.5``: the level -8 is never reached from the group's
largest value and the grid is tied to the one outlier of the group. ``scale_rule="search"`` (the
default of weight-only :class:`~torchslim.quantize.QuantConfig`) tries a few scales per group
and keeps the one with the least squared error, weighted per input column by ``importance`` (the
input's mean square per column, the diagonal of the layer Hessian ``X^T X``; the "importance
matrix" idea of llama.cpp's imatrix quantization; uniform without data):

* ggml's Q4_0 rule ``s = m / -8`` with ``m`` the *signed* value of largest magnitude, so the
  outlier lands exactly on level -8 and all 16 levels are in use, ``max|w| / 7`` and the old
  ``max|w| / 7.5`` (so the search is never worse than any of the three);
* clipped steps, ``m r / -8`` and ``m r / 7`` for ``r`` in :data:`SEARCH_RATIOS` (the outlier
  saturates on either end of the range, the other weights get a finer step);
* for each of those, the least-squares refit of the scale on its integers,
  ``s* = sum(h w q) / sum(h q^2)`` (the best step for those integers), rounded again. On
  SmolLM2-135M's weights the refits win almost every group (the clipped steps only as refits).

Every candidate is rounded to fp16 first (the stored scale, also what GGUF's Q4_0 and
MatMulNBits hold) and judged with the integers nearest under it, so the chosen scale and the
integers are exactly what is stored. A scale may be negative (as in ggml's Q4_0): the product
``q * s`` is what every kernel and file format computes. All groups of a tensor are searched at
once: a few tensor passes per trial, 12 trials with the default ratios.

Example:
    >>> import torch
    >>> from torchslim.quantize.scale_search import search_scales, weighted_error
    >>> torch.manual_seed(0) and None
    >>> w = torch.randn(16, 4, 32)  # 16 rows, 4 groups of 32
    >>> s = search_scales(w, None, -8, 7)
    >>> tuple(s.shape), bool((s.half().float() == s).all())
    ((16, 4, 1), True)
    >>> old = (w.abs().amax(-1, keepdim=True) / 7.5).half().float()
    >>> bool((weighted_error(w, s, None, -8, 7) <= weighted_error(w, old, None, -8, 7)).all())
    True
"""

from __future__ import annotations

from typing import Any

import torch

from torchslim.errors import ConfigError
from torchslim.quantize.primitives import SCALE_RULES, QScheme, choose_qparams, nearest_ints, qrange

__all__ = ["SCALE_RULES", "SEARCH_RATIOS", "check_scale_rule", "searches", "search_scales", "weighted_error",
           "weight_qparams"]

#: shrink ratios of the clipped candidates (the outlier saturates at the end of the range)
SEARCH_RATIOS = (0.95, 0.9, 0.85)


def check_scale_rule(rule: Any, what: str = "scale_rule") -> str:
    """Validate a scale rule name and return it."""
    if not isinstance(rule, str) or rule not in SCALE_RULES:
        raise ConfigError(f"{what} must be one of {', '.join(SCALE_RULES)}; got {rule!r}")
    return rule


def searches(scheme: QScheme) -> bool:
    """Whether ``scheme``'s weight scales come from :func:`search_scales`: ``scale_rule="search"``
    on a symmetric signed scheme of at most 4 bits (wider integers keep ``max|w|``-based steps)."""
    return (getattr(scheme, "scale_rule", "absmax") == "search" and scheme.symmetric and scheme.signed
            and not scheme.narrow and scheme.bits <= 4)


def weighted_error(w: torch.Tensor, s: torch.Tensor, importance: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    """``sum(h (q s - w)^2)`` per group (last dim) with ``q`` the nearest integers under ``s``."""
    d = (nearest_ints(w, s, 0, qmin, qmax) * s - w).square_()
    if importance is not None:
        d = d * importance
    return d.sum(-1, keepdim=True)


def _fp16(s: torch.Tensor) -> torch.Tensor:
    return s.clamp(-65504.0, 65504.0).half().to(s.dtype)


@torch.no_grad()
def search_scales(w: torch.Tensor, importance: torch.Tensor | None, qmin: int, qmax: int,
                  ratios: tuple[float, ...] = SEARCH_RATIOS) -> torch.Tensor:
    """The searched scale of every group of ``w`` (groups along the last dim): shape
    ``(*w.shape[:-1], 1)``, in ``w``'s float dtype (float32 for others), every value an fp16 number.

    Args:
        w: the weights, e.g. ``(rows, groups, group_size)`` or one group per row ``(rows, g)``.
        importance: non-negative weights of the squared error, broadcastable to ``w`` (the input's
            mean square per column); ``None``: uniform.
        qmin, qmax: the integer range (``-8, 7`` for int4).
        ratios: shrink ratios of the outlier-anchored candidates.
    """
    w = w.detach()
    w = w if w.dtype in (torch.float32, torch.float64) else w.float()
    if importance is not None:
        importance = importance.to(w.dtype)
        importance = importance + 1e-6 * importance.mean().clamp_min(1e-30)  # a dead column still counts a little
    idx = w.abs().argmax(-1, keepdim=True)
    m = w.gather(-1, idx)  # the signed value of largest magnitude
    a = m.abs()
    # judged as they are and refitted: the old absmax rule, max|w| on level qmax, ggml's Q4_0 rule
    anchors = [a / ((qmax - qmin) / 2), a / qmax, m / qmin]
    # only refitted (as they are they rarely win): the outlier clipped, on either end of the range
    clipped = [m * (r / end) for r in ratios for end in (qmin, qmax)]
    best_s = _fp16(anchors[0])
    best_e = weighted_error(w, best_s, importance, qmin, qmax)

    def consider(s: torch.Tensor) -> None:
        nonlocal best_s, best_e
        e = weighted_error(w, s, importance, qmin, qmax)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, s, best_s)

    for k, c in enumerate(anchors + clipped):
        s = _fp16(c)
        if 0 < k < len(anchors):
            consider(s)
        q = nearest_ints(w, s, 0, qmin, qmax)  # least-squares refit of the step on the integers of ``s``
        hq = q if importance is None else q * importance
        num, den = (hq * w).sum(-1, keepdim=True), (hq * q).sum(-1, keepdim=True)
        consider(_fp16(torch.where(den > 0, num / den.clamp_min(1e-30), s)))
    return best_s


def weight_qparams(v: torch.Tensor, scheme: QScheme, importance: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the viewed weight ``v`` (groups along its last dim), as stored
    (the scale rounded to fp16): searched when :func:`searches` says so, else min-max."""
    if searches(scheme):
        qmin, qmax = qrange(scheme)
        scale = search_scales(v.float(), importance, qmin, qmax)
        return scale, torch.zeros_like(scale)
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    scale, zp = choose_qparams(lo.float(), hi.float(), scheme)
    return scale.half().float(), zp

