"""``ts.profile``: parameters, MACs, FLOPs, bytes, peak activation memory and latency of a model.

MACs and FLOPs come from the same dispatch-level trace structured pruning analyses, one
formula per ATen op (``_formulas.py``), so what torchslim prunes and what it counts cannot
disagree. The model is profiled as users run inference: in eval mode under ``no_grad`` (so
fused attention kernels are counted), and restored to its previous mode afterwards.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim._utils import evaluating, model_device
from torchslim.errors import ConfigError
from torchslim.graph.inputs import Inputs, as_inputs, call_model, remembered_inputs
from torchslim.graph.tracer import trace
from torchslim.profile._formulas import op_cost
from torchslim.profile.latency import Timing, measure

__all__ = [
    "LayerProfile",
    "LatencyStats",
    "Profile",
    "SIZE_FIELDS",
    "measure_latency",
    "profile",
    "register_size_estimator",
    "serialized_bytes",
]


@dataclass
class LayerProfile:
    """Cost of one module: its own parameters and the ops run directly in its forward."""

    name: str
    type: str
    params: int
    macs: int
    flops: int
    output_shape: list[int] | None = None
    calls: int = 0


@dataclass
class LatencyStats:
    """Wall-clock latency of one forward, in milliseconds: the median of the timed runs, with
    their spread (p10/p25/p75/p90), the threads in force and the CPU."""

    median: float
    mean: float
    std: float
    p10: float
    p90: float
    min: float
    max: float
    runs: int
    warmup: int
    threads: int
    batch_size: int
    device: str
    p25: float | None = None
    p75: float | None = None
    cpu: str = ""

    @classmethod
    def from_timing(cls, t: Timing, *, batch_size: int) -> LatencyStats:
        """The profile's view of one :class:`~torchslim.profile.latency.Timing`."""
        times = t.times_ms
        return cls(median=t.median_ms, mean=statistics.fmean(times), std=statistics.pstdev(times),
                   p10=t.quantile(0.1), p90=t.quantile(0.9), min=min(times), max=max(times), runs=t.runs,
                   warmup=t.warmup, threads=t.threads, batch_size=batch_size, device=t.device, p25=t.p25_ms,
                   p75=t.p75_ms, cpu=t.cpu)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Profile:
    """What ``ts.profile`` measured. ``to_dict()`` is the JSON the CLI prints."""

    params: int
    nonzero_params: int
    macs: int
    flops: int
    state_bytes: int  # parameters + buffers at their dtypes, in memory
    dense_fp32_bytes: int  # the same state as dense float32
    size_bytes: int | None  # bytes of the serialized weights file (safetensors)
    peak_activation_bytes: int
    latency_ms: LatencyStats | None
    unsupported_ops: dict[str, int]
    layers: list[LayerProfile] = field(default_factory=list)
    input_shapes: list[list[int]] = field(default_factory=list)
    # MACs by (weight, activation) bit widths, e.g. {"float": ..., "w1a1": ...}: modules declare
    # their precision with a ``torchslim_precision = (weight_bits, activation_bits)`` attribute
    macs_by_precision: dict[str, int] = field(default_factory=dict)
    ops: int = 0
    device: str = "cpu"
    # bytes of the entropy-coded ``.tslim`` file (``ts.pack``) of a weight-shared model, else None
    packed_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_ms"] = self.latency_ms.to_dict() if self.latency_ms else None
        return d

    def table(self, max_layers: int | None = 60) -> Any:
        """Per-layer rich table followed by totals."""
        from torchslim.profile.tables import profile_table

        return profile_table(self, max_layers=max_layers)

    def summary(self) -> str:
        """One line: params, MACs, size, latency."""
        from torchslim.profile.tables import human

        lat = f", {self.latency_ms.median:.2f} ms" if self.latency_ms else ""
        size = f", {human(self.size_bytes, 'B')}" if self.size_bytes is not None else ""
        return f"{human(self.params)} params, {human(self.macs)} MACs{size}{lat}"


SizeEstimator = Callable[[nn.Module], int | None]
SIZE_FIELDS = ("packed_bytes",)  # the Profile fields a size estimator may fill
_SIZE_ESTIMATORS: dict[str, SizeEstimator] = {}


def register_size_estimator(field_name: str, estimator: SizeEstimator) -> None:
    """Let a package above profile fill a size field of every :class:`Profile`.

    Profiling imports nothing above it; a family that knows another size (``pack``: the bytes
    of the ``.tslim`` file) registers its function when it is imported. ``estimator(model)``
    returns bytes, or ``None`` when it does not apply to the model. Registering again replaces.

    Raises:
        ConfigError: ``field_name`` is not one of :data:`SIZE_FIELDS`, or ``estimator`` is not callable.
    """
    if field_name not in SIZE_FIELDS:
        raise ConfigError(f"unknown size field {field_name!r}; allowed: {', '.join(SIZE_FIELDS)}")
    if not callable(estimator):
        raise ConfigError(f"estimator must be callable (model -> bytes or None); got {estimator!r}")
    _SIZE_ESTIMATORS[field_name] = estimator


def _estimated_sizes(model: nn.Module) -> dict[str, int | None]:
    return {name: (fn(model) if (fn := _SIZE_ESTIMATORS.get(name)) else None) for name in SIZE_FIELDS}


@torch.no_grad()
def _logical_params(model: nn.Module) -> tuple[int, int]:
    """Parameters and non-zeros as the model computes with them.

    A parametrized weight (a pruning mask, a shared-weight codebook) counts as the weight it
    produces, not as the tensors behind it; integer weights with scales (weight-only
    quantization, static int8 Linear and conv layers) count as the float weight they stand for. Meta tensors count as dense.
    """
    from torch.nn.utils import parametrize

    def nz(t: torch.Tensor) -> int:
        return t.numel() if t.is_meta else int(torch.count_nonzero(t))

    behind: set[int] = set()
    total = nonzero = 0
    for m in model.modules():
        if parametrize.is_parametrized(m):
            for pname, plist in m.parametrizations.items():  # type: ignore[union-attr]
                t = getattr(m, pname)
                total, nonzero = total + t.numel(), nonzero + nz(t)
                behind.update(id(p) for p in plist.parameters())
        elif hasattr(m, "dequantized_weight") and (hasattr(m, "in_features") or hasattr(m, "in_channels")):
            w = m.dequantized_weight()
            total, nonzero = total + w.numel(), nonzero + nz(w)
    for p in model.parameters():
        if id(p) not in behind:
            total, nonzero = total + p.numel(), nonzero + nz(p)
    return total, nonzero


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights written as a safetensors file (tied tensors stored once).

    The same file ``ts.save`` writes as its weights (``safetensors.torch.save_model``).
    """
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="torchslim-size-") as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_model(model, path)
        return os.path.getsize(path)


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    warmup: int = 3,
    runs: int | None = None,
    min_time_s: float = 1.0,
    max_runs: int = 200,
    threads: int | None = None,
) -> LatencyStats:
    """Median latency of ``model(example_inputs)`` after warm-up, under ``no_grad``.

    Timed by :func:`torchslim.profile.latency.measure` (the one timer). When ``runs`` is None,
    the number of timed runs is chosen so the timing takes about ``min_time_s`` seconds (at
    least 5, at most ``max_runs``). The model is run as it is (its mode is not changed); CUDA
    work is synchronised around each run.

    Raises:
        ConfigError: ``warmup`` < 0, ``runs`` < 1 or ``threads`` < 1. Nothing ran.
    """
    device = model_device(model)
    inputs = as_inputs(example_inputs).to(device)
    with torch.no_grad():
        t = measure(lambda: call_model(model, inputs), runs=runs, warmup=warmup, threads=threads, sync=device,
                    min_time_s=min_time_s, max_runs=max_runs)
    return LatencyStats.from_timing(t, batch_size=inputs.batch_size)


def _layers(model: nn.Module, tr: Any, costs: list[Any]) -> list[LayerProfile]:
    macs: dict[str, int] = defaultdict(int)
    flops: dict[str, int] = defaultdict(int)
    for op, cost in zip(tr.ops, costs):
        macs[op.module] += cost.macs
        flops[op.module] += cost.flops
    calls = Counter(c.name for c in tr.module_calls)
    shapes = {c.name: c.output_shapes for c in tr.module_calls}
    own_params = {
        name: sum(p.numel() for p in m.parameters(recurse=False)) for name, m in model.named_modules()
    }
    order: list[str] = []
    seen: set[str] = set()
    for c in tr.module_calls:
        if c.name not in seen:
            seen.add(c.name)
            order.append(c.name)
    for name in own_params:  # modules never called but holding parameters
        if name not in seen:
            order.append(name)
    rows = []
    for name in order:
        if not (macs.get(name) or flops.get(name) or own_params.get(name)):
            continue
        out = shapes.get(name) or []
        rows.append(
            LayerProfile(
                name=name or "(top)",
                type=tr.module_types.get(name, "?"),
                params=own_params.get(name, 0),
                macs=macs.get(name, 0),
                flops=flops.get(name, 0),
                output_shape=list(out[0]) if out else None,
                calls=calls.get(name, 0),
            )
        )
    return rows


def profile(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    latency: bool = True,
    size: bool = True,
    warmup: int = 3,
    runs: int | None = None,
    min_time_s: float = 1.0,
    inference: bool = True,
    threads: int | None = None,
) -> Profile:
    """Profile ``model`` on ``example_inputs``.

    Args:
        model: any module that runs eagerly. Not modified; its train/eval mode is restored.
        example_inputs: a tensor, tuple of inputs or dict of keyword inputs. ``None`` uses the
            inputs the model remembers from ``ts.create_model`` (``ts.example_inputs(model)``).
        latency: also time the forward (median of repeated runs after ``warmup``).
        size: also write the weights to a temporary safetensors file and report its bytes.
        warmup, runs, min_time_s: latency settings (see :func:`measure_latency`).
        threads: torch intra-op threads for the latency runs (restored after); ``None`` keeps
            the current setting. The result's ``latency_ms.threads`` states what was used.
        inference: profile in eval mode under ``no_grad`` (as deployed). With ``False`` the
            model is traced in its current mode with autograd on.

    Returns:
        A :class:`Profile`; ``print(p.table())`` shows the per-layer table.

    Raises:
        InputShapeError, ModelRunError: the inputs do not fit or the forward raised.

    Example:
        >>> import torch, torchslim as ts
        >>> p = ts.profile(torch.nn.Linear(10, 5), torch.randn(1, 10), latency=False)
        >>> (p.params, p.macs)
        (55, 50)
    """
    if example_inputs is None:
        example_inputs = remembered_inputs(model)
    device = model_device(model)
    inputs: Inputs = as_inputs(example_inputs).to(device)

    with evaluating(model, enabled=inference):
        tr = trace(model, inputs, grad=not inference)
        costs = [op_cost(op) for op in tr.ops]
        unsupported = Counter(op.name for op, c in zip(tr.ops, costs) if not c.supported)
        lat = (measure_latency(model, inputs, warmup=warmup, runs=runs, min_time_s=min_time_s, threads=threads)
               if latency else None)

    modules = dict(model.named_modules())
    by_precision: dict[str, int] = defaultdict(int)
    for op, c in zip(tr.ops, costs):
        if c.macs:
            prec = getattr(modules.get(op.module), "torchslim_precision", None)
            by_precision["float" if prec is None else f"w{prec[0]}a{prec[1]}"] += c.macs
    params = list(model.parameters())
    buffers = [b for b in model.buffers() if b is not None]
    n_params, nonzero = _logical_params(model)
    state = params + buffers
    return Profile(
        params=n_params,
        nonzero_params=nonzero,
        macs=sum(c.macs for c in costs),
        flops=sum(c.flops for c in costs),
        state_bytes=sum(t.numel() * t.element_size() for t in state),
        dense_fp32_bytes=sum(t.numel() * 4 for t in state),
        size_bytes=serialized_bytes(model) if size else None,
        **(_estimated_sizes(model) if size else dict.fromkeys(SIZE_FIELDS)),
        peak_activation_bytes=tr.peak_activation_bytes,
        latency_ms=lat,
        unsupported_ops=dict(unsupported),
        layers=_layers(model, tr, costs),
        input_shapes=[list(t.shape) for t in inputs.tensors()],
        macs_by_precision=dict(by_precision),
        ops=len(tr.ops),
        device=str(device),
    )
