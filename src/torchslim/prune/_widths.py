"""Kernel-friendly kept widths for MACs / params budgets (the default when ``round_to`` is not given).

CPU and GPU kernels work on channels in blocks (oneDNN's blocked and channels-last layouts use
blocks of 8 with AVX2 and 16 with AVX-512; tensor cores want multiples of 8/16). A width that is
not a multiple of the block pads the last block: ResNet-50 pruned to half its MACs with widths
such as 45, 181, 361 and 723 ran 0.54 of the original's time in channels-last on one AVX-512
core, and with multiples of 16 (48, 176, 368, 720) at the same MACs 0.50 (latency speedup /
MACs speedup 0.94 -> 1.01, ``benchmarks/latency_budget.py``).

So, when the user gives no ``round_to``, a MACs or params budget keeps every group's width at a
multiple of :func:`multiple_of` (16 for groups of 128 channels or more, 8 for 32 or more, none
below; attention-head groups are counted in heads and are left alone) or at its full size. The
largest-remainder allocation of :func:`allocate` then hands out the removed channels one block
at a time, so the budget search still lands within its tolerance; when it cannot, the caller
falls back to single channels. An explicit ``round_to`` (``1`` included) keeps its meaning.

Example:
    >>> from types import SimpleNamespace as G
    >>> groups = [G(size=64, head_dim=None), G(size=256, head_dim=None), G(size=12, head_dim=64)]
    >>> [multiple_of(g, 16) for g in groups]
    [8, 16, 1]
    >>> allocate(groups, [19.2, 76.8, 3.6], 16, min_channels=1)
    [16, 80, 4]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_MULTIPLE", "allocate", "multiple_of"]

DEFAULT_MULTIPLE = 16  # the largest block used (AVX-512 oneDNN blocks; a multiple of AVX2's 8)
_FROM = {16: 128, 8: 32}  # block -> the smallest group held to it


def multiple_of(group: Any, cap: int) -> int:
    """The multiple a group's kept width is held to under a cap of ``cap`` (1: none).

    Attention-head groups (``head_dim`` set) count heads, already whole blocks: 1. Otherwise 16
    from 128 channels, 8 from 32 (a block is at most a quarter of the group), never above
    ``cap``; 1 for smaller groups."""
    if cap <= 1 or getattr(group, "head_dim", None) is not None:
        return 1
    return next((q for q, least in _FROM.items() if q <= cap and group.size >= least), 1)


def allocate(groups: Sequence[Any], want: Sequence[float], cap: int, *, min_channels: int) -> list[int]:
    """Channels to remove per group, close to ``want`` (floats, per group) with every kept width a
    multiple of :func:`multiple_of` or the full size; the total is the rounded sum of ``want``
    to within half a block, moving one block of one group at a time as ``want`` grows."""
    counts, steps, rema = [], [], []
    for g, w in zip(groups, want):
        q = multiple_of(g, cap)
        lowest = min(g.size, max(q, int(math.ceil(min(min_channels, g.size) / q) * q)))  # a block at least
        kept_f = max(g.size - w, float(lowest))
        hi = g.size if kept_f > g.size - 1e-9 else min(g.size, int(math.ceil(kept_f / q - 1e-9) * q))
        lo = max(lowest, int(math.floor(kept_f / q + 1e-9) * q))
        counts.append(g.size - hi)
        steps.append(max(hi - lo, 0))
        rema.append((hi - kept_f) / (hi - lo) if hi > lo else 0.0)
    deficit = sum(want) - sum(counts)  # channels still to remove, handed out by the largest remainder
    for i in sorted(range(len(counts)), key=lambda i: (-rema[i], i)):
        if steps[i] > 0 and rema[i] > 0 and deficit >= steps[i] / 2:
            counts[i] += steps[i]
            deficit -= steps[i]
    return counts
