"""Profiling: params, MACs/FLOPs per ATen op, bytes, peak memory, latency, comparisons."""

from torchslim.profile._formulas import Cost, op_cost
from torchslim.profile.api import (
    LatencyStats,
    LayerProfile,
    Profile,
    measure_latency,
    profile,
    serialized_bytes,
)
from torchslim.profile.compare import CompareRow, Comparison, compare

__all__ = [
    "Comparison",
    "CompareRow",
    "Cost",
    "LatencyStats",
    "LayerProfile",
    "Profile",
    "compare",
    "measure_latency",
    "op_cost",
    "profile",
    "serialized_bytes",
]
