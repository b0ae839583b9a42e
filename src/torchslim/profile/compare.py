"""``ts.compare(before, after)``: the ratios of two profiles measured in the same run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchslim.profile.api import Profile

__all__ = ["CompareRow", "Comparison", "compare"]

_METRICS = (
    "params",
    "nonzero_params",
    "macs",
    "flops",
    "dense_fp32_bytes",
    "size_bytes",
    "packed_bytes",
    "peak_activation_bytes",
)


@dataclass(frozen=True)
class CompareRow:
    metric: str
    before: float | None
    after: float | None
    ratio: float | None  # after / before (None when either is unknown or before is 0)
    # latency only: half the interquartile range (p25..p75; p10..p90 where the quartiles are not
    # known) of the timed runs, the "±" of the tables; else None
    spread_before: float | None = None
    spread_after: float | None = None

    @property
    def within_spread(self) -> bool:
        """The difference is inside the measured spread (latency rows with both spreads known):
        ``|after - before| <= spread_before + spread_after``."""
        if None in (self.before, self.after, self.spread_before, self.spread_after):
            return False
        return abs(self.after - self.before) <= self.spread_before + self.spread_after  # type: ignore[operator]


@dataclass(frozen=True)
class Comparison:
    rows: tuple[CompareRow, ...]

    def __getitem__(self, metric: str) -> CompareRow:
        for r in self.rows:
            if r.metric == metric:
                return r
        raise KeyError(metric)

    def ratio(self, metric: str) -> float | None:
        """``after / before`` of ``metric`` (e.g. ``'macs'``, ``'latency_ms'``)."""
        return self[metric].ratio

    def to_dict(self) -> dict[str, Any]:
        return {r.metric: {"before": r.before, "after": r.after, "ratio": r.ratio} for r in self.rows}

    def table(self) -> Any:
        from torchslim.profile.tables import compare_table

        return compare_table(self)


def compare(before: Profile, after: Profile) -> Comparison:
    """Ratios ``after / before`` for params, MACs, FLOPs, bytes, memory and median latency."""
    rows = []
    for m in _METRICS:
        b, a = getattr(before, m), getattr(after, m)
        rows.append(CompareRow(m, b, a, (a / b) if (a is not None and b) else None))
    lb = before.latency_ms.median if before.latency_ms else None
    la = after.latency_ms.median if after.latency_ms else None
    rows.append(CompareRow("latency_ms", lb, la, (la / lb) if (la is not None and lb) else None,
                           _spread(before), _spread(after)))
    return Comparison(tuple(rows))


def _spread(p: Profile) -> float | None:
    lat = p.latency_ms
    if lat is None:
        return None
    if lat.p25 is not None and lat.p75 is not None:
        return (lat.p75 - lat.p25) / 2
    return (lat.p90 - lat.p10) / 2
