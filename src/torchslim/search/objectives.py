"""What a search optimises and what it must respect: objectives, budgets, and how they are measured.

Metrics (every one is measured for every trial and kept with it):

* ``accuracy`` — validation accuracy (fraction) after a short fine-tune (``evaluation="finetune"``),
  after BatchNorm recalibration (``"bn"``: a few forward passes in train mode, no gradients), or
  straight after compression (``"none"``). Maximised.
* ``macs``, ``params`` — of the compressed model, as fractions of the original (``ts.profile``).
* ``size`` — bytes of the compressed model's weights file, as a fraction of the original's.
* ``latency`` — median forward latency, as a fraction of the original's; the two models are timed
  in alternating rounds in the same process (:func:`paired_latency`). Only measured when an
  objective or the budget names it.

Every metric but accuracy is minimised. A budget such as ``macs=0.3`` bounds metrics as fractions
of the original.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from torchslim._utils import evaluating, model_device, training
from torchslim.errors import ConfigError

__all__ = [
    "METRICS",
    "COST_METRICS",
    "parse_budget",
    "parse_objectives",
    "directions",
    "bn_recalibrate_",
    "validation_accuracy",
    "measure",
    "paired_latency",
]

METRICS = ("accuracy", "macs", "params", "size", "latency")
COST_METRICS = ("macs", "params", "size", "latency")
_REPAIRABLE = ("macs", "params")  # shape-only metrics the sampler's configurations are scaled toward


def parse_budget(budget: Any) -> dict[str, float]:
    """A budget as ``{metric: fraction}``.

    Accepts ``"macs=0.3"``, ``"macs=0.3,latency=0.5"``, a mapping, a ``ts.Budget``, or None (no
    budget). Fractions are of the original model and must be in (0, 1].

    Raises:
        ConfigError: unknown metric, a fraction out of (0, 1], or a malformed string.

    Example:
        >>> parse_budget("macs=0.3")
        {'macs': 0.3}
    """
    if budget is None:
        return {}
    if hasattr(budget, "metric") and hasattr(budget, "fraction"):  # ts.Budget
        return {budget.metric: float(budget.fraction)}
    items: Iterable[tuple[str, Any]]
    if isinstance(budget, str):
        pairs = []
        for part in (p.strip() for p in budget.split(",")):
            if not part:
                continue
            name, eq, value = part.partition("=")
            if not eq:
                raise ConfigError(f"budget {budget!r}: write METRIC=FRACTION pairs, e.g. 'macs=0.3' or 'macs=0.3,latency=0.5'")
            try:
                pairs.append((name.strip().lower(), float(value)))
            except ValueError:
                raise ConfigError(f"budget {part!r}: {value!r} is not a number; write e.g. 'macs=0.3'") from None
        items = pairs
    elif isinstance(budget, Mapping):
        items = budget.items()
    else:
        raise ConfigError(f"budget must be a string like 'macs=0.3', a dict or a ts.Budget; got {type(budget).__name__}")
    out: dict[str, float] = {}
    for name, value in items:
        if name not in COST_METRICS:
            raise ConfigError(f"budget metric {name!r} is not known; allowed: {', '.join(COST_METRICS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
            raise ConfigError(f"budget {name}={value!r} must be a fraction of the original model in (0, 1]")
        if name in out:
            raise ConfigError(f"budget names {name!r} twice")
        out[name] = float(value)
    return out


def parse_objectives(objectives: Any) -> tuple[str, ...]:
    """Objectives as a tuple of metric names (``"accuracy,latency"`` or a sequence).

    Raises:
        ConfigError: empty, unknown or repeated metric.
    """
    if objectives is None:
        return ("accuracy",)
    names = [s.strip().lower() for s in objectives.split(",")] if isinstance(objectives, str) else list(objectives)
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"objectives must name at least one of {', '.join(METRICS)}")
    for n in names:
        if n not in METRICS:
            raise ConfigError(f"objective {n!r} is not known; allowed: {', '.join(METRICS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"objectives repeat a metric: {names}")
    return tuple(names)


def directions(objectives: tuple[str, ...]) -> list[str]:
    """Optuna study directions of the objectives."""
    return ["maximize" if o == "accuracy" else "minimize" for o in objectives]


def repair_metric(budget: Mapping[str, float]) -> str | None:
    """The budget metric sampled configurations are scaled toward (MACs first, then params)."""
    for m in _REPAIRABLE:
        if m in budget:
            return m
    return None


def bn_recalibrate_(model: nn.Module, loader: Iterable[Any], batches: int) -> int:
    """Re-estimate every BatchNorm's running statistics from ``batches`` batches, in place.

    The cheap accuracy proxy of pruning searches: after channels are removed, the old statistics
    no longer match. Forward passes run in train mode under ``no_grad``; the weights do not change.
    Every module's mode and every BatchNorm's momentum are restored after.

    Returns:
        The number of batches run (0 when the model has no BatchNorm).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [(m, m.momentum) for m in bns]
    device = model_device(model)
    done = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches seen
        with training(model), torch.no_grad():
            for batch in loader:
                if done >= batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
                done += 1
    finally:
        for m, mom in momenta:
            m.momentum = mom
    return done


def validation_accuracy(model: nn.Module, data: Any, batch_size: int = 256) -> float:
    """Accuracy on ``data``'s validation split (the test split stays for the final report)."""
    from torchslim.train import evaluate

    return float(evaluate(model, data.loader("val", batch_size=batch_size))["accuracy"])


def measure(model: nn.Module, example_inputs: Any) -> dict[str, float]:
    """Absolute ``macs``, ``params`` and ``size`` (bytes of the weights file)."""
    from torchslim.profile import profile

    p = profile(model, example_inputs, latency=False)
    return {"macs": float(p.macs), "params": float(p.params), "size": float(p.size_bytes or 0)}


def paired_latency(reference: nn.Module, model: nn.Module, example_inputs: Any, *, rounds: int = 3,
                   min_time_s: float = 0.05) -> tuple[float, float]:
    """Median latencies (ms) of ``model`` and ``reference``, measured side by side.

    The two are timed call by call, interleaved (``profile.latency.measure_pair``), so a machine
    whose load drifts during a search slows both alike and their ratio stays honest; each gets
    the median of its runs (the one statistic of every torchslim latency). The number of runs
    is chosen so each model runs about ``rounds * min_time_s`` seconds (at least ``5 * rounds``,
    at most 200). Both run in eval mode under ``no_grad``.

    Returns:
        ``(model_ms, reference_ms)``.
    """
    from torchslim.graph.inputs import as_inputs, call_model
    from torchslim.profile.latency import measure, measure_pair

    device = model_device(model)
    ref_in = as_inputs(example_inputs).to(model_device(reference))
    mine_in = as_inputs(example_inputs).to(device)
    with evaluating(reference), evaluating(model), torch.no_grad():
        run_ref = lambda: call_model(reference, ref_in)  # noqa: E731
        run_mine = lambda: call_model(model, mine_in)  # noqa: E731
        probe = max(measure(run_ref, runs=1, warmup=1, sync=device).median_ms, 1e-3)
        runs = int(min(200, max(5 * rounds, rounds * min_time_s * 1e3 / probe)))
        ref, mine = measure_pair(run_ref, run_mine, runs=runs, warmup=2, sync=device,
                                 runtimes=("reference", "model"))
    return mine.median_ms, ref.median_ms


def fractions(absolute: Mapping[str, float], base: Mapping[str, float]) -> dict[str, float]:
    """Each cost metric as a fraction of the original's."""
    return {k: absolute[k] / base[k] for k in COST_METRICS if k in absolute and base.get(k)}
