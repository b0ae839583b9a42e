"""Profiling: params, MACs/FLOPs per ATen op, bytes, peak memory, latency, comparisons."""

from torchslim.profile._formulas import Cost, op_cost
from torchslim.profile.api import (
    LatencyStats,
    LayerProfile,
    Profile,
    measure_latency,
    profile,
    register_size_estimator,
    serialized_bytes,
)
from torchslim.profile.budget import Budget
from torchslim.profile.compare import CompareRow, Comparison, compare
from torchslim.profile.latency import Timing, measure, measure_pair, speedup

__all__ = [
    "Budget",
    "Comparison",
    "CompareRow",
    "Cost",
    "LatencyStats",
    "LayerProfile",
    "Profile",
    "Timing",
    "compare",
    "measure",
    "measure_latency",
    "measure_pair",
    "op_cost",
    "profile",
    "register_size_estimator",
    "serialized_bytes",
    "speedup",
]
