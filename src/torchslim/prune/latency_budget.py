"""Latency budgets for ``prune_channels_``, measured in the runtime the model ships to.

``prune_channels_(model, target=ts.Budget(latency=0.5, runtime="onnxruntime", threads=1))`` keeps
half of the original's latency *as measured in ONNX Runtime*, not as guessed from MACs. Every
measurement is paired: the original and the candidate are prepared in the budget's runtime and
timed in one interleaved run (:func:`torchslim.export.runtime_latency.latency_ratio`), with the
inputs repeated to ``batch`` rows and ``threads`` intra-op threads; the ratio is the median over
rounds of candidate / original in the same round (:func:`paired_ratio`), so load drift cancels.
Preparing a runtime costs seconds (an ONNX export, a ``torch.compile``, a ``.pte``), so the search
is short:

1. the pruning ratio -> MACs fraction map is cheap (shapes only) and monotone; latency is close
   to a straight line in the MACs fraction (with an offset: what pruning cannot touch);
2. the first trial assumes latency falls like MACs; each later one fits the line through the two
   measured points that bracket the budget (or the newest point and the original at (1, 1)),
   solves it for the MACs fraction of the budget and maps that back to a ratio (regula falsi on
   measured points, kept inside the bracket);
3. it stops when a measured ratio is within the budget's tolerance, or after ``MAX_TRIALS``. The
   closest measured point is kept if it is within ``max(tolerance, 0.05)`` of the budget (the
   two nearest misses are first measured again with twice the runs); otherwise a one-line
   ``ConfigError`` says the closest measured ratio and why (the model is unchanged).

For ``eager`` and ``compile`` with ``memory_format=None``, the original is timed once in both
layouts (interleaved) and the faster one is used for the whole search (``achieved`` says which).

Widths (``round_to="auto"``, the default under a latency budget): each cut group's kept width may
move to a nearby width (a multiple of 4, 8 or 16 up to ~12% above it or the next multiple of 8,
or at most ~3% below) that the runtime runs fastest, measured on the group's costliest layer
producing its channels and the costliest one reading them (a runtime's blocked layouts may like a
width on one side only) with :func:`~torchslim.export.runtime_latency.fastest_widths` /
``layer_latency`` (cached per machine); ``achieved["widths_moved"]`` lists the moves.

Example:
    >>> import torch
    >>> x = batched(torch.randn(2, 3), 5)
    >>> tuple(x.args[0].shape)
    (5, 3)
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

import torch
from torch import nn

from torchslim._compile import compile_room
from torchslim.errors import ConfigError
from torchslim.graph.inputs import Inputs, as_inputs

__all__ = ["MAX_TRIALS", "auto_widths", "batched", "compile_room", "faster_memory_format", "paired_ratio", "search_latency"]

MAX_TRIALS = 8  # measured trials of one search (each prepares two models in the runtime)
ACCEPT = 0.05  # a result within this fraction of the budget is kept when the tolerance is tighter
_MAX_RATIO = 0.95
_RUNS = 15
_TIE = 0.01  # widths whose latency is within 1% of the fastest count as fast; the widest of them wins


def paired_ratio(original: Any, candidate: Any) -> float:
    """The median over rounds of candidate / original time in the same round (load drift cancels);
    the ratio of the medians when the runs cannot be paired.

    Example:
        >>> from types import SimpleNamespace as T
        >>> paired_ratio(T(times_ms=(10.0, 20.0, 10.0), median_ms=10.0), T(times_ms=(5.0, 10.0, 6.0), median_ms=6.0))
        0.5
    """
    o, c = tuple(original.times_ms), tuple(candidate.times_ms)
    if o and len(o) == len(c) and min(o) > 0:
        return float(statistics.median(ci / oi for ci, oi in zip(c, o)))
    return float(candidate.median_ms / max(original.median_ms, 1e-9))


def batched(inputs: Any, batch: int | None) -> Inputs:
    """``inputs`` with every tensor's first dimension repeated (cyclically) to ``batch`` rows."""
    x = as_inputs(inputs)
    if batch is None:
        return x

    def rows(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] == batch or t.shape[0] == 0:
            return t
        return t[torch.arange(batch) % t.shape[0]]

    return Inputs(tuple(rows(a) for a in x.args), {k: rows(v) for k, v in x.kwargs.items()})


class _ChannelsLast(nn.Module):
    """A channels-last copy of a model that also converts its 4-D inputs (for one interleaved run)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        conv = lambda t: t.contiguous(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and t.dim() == 4 else t  # noqa: E731
        return self.inner(*(conv(a) for a in args), **{k: conv(v) for k, v in kwargs.items()})


def faster_memory_format(model: nn.Module, inputs: Inputs, runtime: str, threads: int | None,
                         memory_format: str | None) -> tuple[str | None, dict[str, float]]:
    """The layout the search measures in, and the original's milliseconds in each layout timed.

    The file runtimes choose their own layouts (None); a given ``memory_format`` is kept; a model
    without 4-D inputs stays contiguous; otherwise both layouts are timed interleaved."""
    if runtime not in ("eager", "compile"):
        return None, {}
    if memory_format is not None:
        return memory_format, {}
    if not any(t.dim() == 4 for t in inputs.tensors()):
        return "contiguous", {}
    from torchslim.export.runtime_latency import paired_latency

    t = paired_latency({"contiguous": model, "channels_last": _ChannelsLast(model)}, inputs, runtime,
                       threads=threads, runs=_RUNS, warmup=2)
    ms = {k: float(v.median_ms) for k, v in t.items()}
    return min(ms, key=ms.__getitem__), ms


# ---- widths ----------------------------------------------------------------------------------------------------
def _layer_inputs(model: nn.Module, inputs: Inputs) -> dict[str, list[int]]:
    from torchslim.export.runtime_latency import layer_input_shapes

    return layer_input_shapes(model, inputs)


def _cost(mod: nn.Module, shape: list[int]) -> float:
    if isinstance(mod, nn.Linear):
        return float(mod.weight.numel()) * math.prod(shape[:-1])
    return float(mod.weight.numel()) * math.prod(shape[2:]) / math.prod(mod.stride)


def _layers(model: nn.Module, group: Any, shapes: dict[str, list[int]]) -> dict[str, tuple[str, nn.Module]]:
    """The layers a group's width is timed on: its costliest convolution / linear layer producing
    the group's channels (``out``), the costliest one reading them (``in``) and a depthwise
    convolution of the group (``dw``), where the group has them. A runtime's kernels may like a
    width as an output and not as an input (blocked layouts), so both sides are timed."""
    best: dict[str, tuple[float, str, nn.Module]] = {}
    for pname, dim in group.members:
        path, _, leaf = pname.rpartition(".")
        if leaf != "weight" or path not in shapes:
            continue
        mod = model.get_submodule(path)
        conv = isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if not (conv or isinstance(mod, nn.Linear)):
            continue
        if conv and mod.groups > 1:
            role = "dw" if dim == 0 and mod.groups == mod.in_channels == mod.out_channels else None
        else:
            role = "out" if dim == 0 else "in" if dim == 1 else None
        if role is None:
            continue
        cost = _cost(mod, shapes[path])
        if role not in best or cost > best[role][0]:
            best[role] = (cost, path, mod)
    return {role: (path, mod) for role, (_, path, mod) in best.items()}


def _probe(role: str, mod: nn.Module, shape: list[int], size: int, width: int) -> tuple[nn.Module, list[int]] | None:
    """``mod`` rebuilt with the group's ``size`` channels cut to ``width`` on its ``role`` side, and its input shape."""
    if role == "out":
        return None  # fastest_widths varies output widths itself
    if isinstance(mod, nn.Linear):
        factor = 1 if mod.in_features < 2 * size or mod.in_features % size else mod.in_features // size
        new_in = mod.in_features - (size - width) * factor
        return nn.Linear(new_in, mod.out_features, bias=mod.bias is not None), [*shape[:-1], new_in]
    new_in = mod.in_channels - (size - width)
    if new_in < 1:
        return None
    out, groups = (new_in, new_in) if role == "dw" else (mod.out_channels, 1)
    from torchslim.export.runtime_latency import conv_class

    conv = conv_class(mod)(new_in, out, mod.kernel_size, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                     groups=groups, bias=mod.bias is not None)
    return conv, [shape[0], new_in, *shape[2:]]


def _candidates(kept: int, size: int) -> list[int]:
    """Nearby widths: multiples of 4, 8 and 16 up to ~12% above ``kept`` (the next multiple of 8
    always), and at most ~3% below.

    Example:
        >>> _candidates(19, 64), _candidates(100, 256), _candidates(64, 64)
        ([19, 20, 24], [100, 104, 112], [64])
    """
    reach = kept + max(7, math.ceil(kept / 8))  # the next multiple of 8 is always a candidate
    up = {w for m in (4, 8, 16) if (w := min(size, int(math.ceil(kept / m) * m))) <= reach}
    margin = max(1, kept // 32)  # never more than ~3% below the allocation's width
    down = {w for m in (4, 8, 16) if kept - margin <= (w := kept // m * m) < kept and w >= 1}
    return sorted({kept, *up, *down})


def auto_widths(model: nn.Module, cg: Any, report: list[dict[str, Any]], inputs: Inputs, runtime: str,
                threads: int | None, memory_format: str | None) -> tuple[dict[int, int], list[dict[str, Any]]]:
    """Measured width rounding: ``({group id: kept width}, moves)`` for every cut group.

    A group's kept width may move to a nearby width (see :func:`_candidates`) that its layers
    (:func:`_layers`: the costliest producer and reader, a depthwise convolution) run fastest in
    ``runtime``, summed; among widths within 1% of the fastest the widest wins, so a width goes
    down only when that is clearly faster."""
    from torchslim.export.runtime_latency import fastest_widths, layer_latency

    shapes = _layer_inputs(model, inputs)
    kept_of = {r["id"]: r["kept"] for r in report}
    out: dict[int, int] = {}
    moves: list[dict[str, Any]] = []
    for g in cg.groups:
        kept = kept_of.get(g.id, g.size)
        out[g.id] = kept
        if kept >= g.size:
            continue
        layers = _layers(model, g, shapes)
        widths = _candidates(kept, g.size)
        if not layers or len(widths) < 2:
            continue
        fmt = memory_format if memory_format == "channels_last" else None
        ms = dict.fromkeys(widths, 0.0)
        for role, (path, mod) in layers.items():
            if role == "out":
                for w, t in fastest_widths(mod, shapes[path], widths, runtime, threads=threads, memory_format=fmt).items():
                    ms[w] += t
                continue
            for w in widths:
                built = _probe(role, mod, shapes[path], g.size, w)
                if built is not None:
                    ms[w] += layer_latency(built[0], built[1], runtime, threads=threads, memory_format=fmt)
        path = layers.get("out", next(iter(layers.values())))[0]
        fastest = min(ms.values())
        width = max(w for w, t in ms.items() if t <= fastest * (1 + _TIE))
        if width != kept:
            out[g.id] = width
            moves.append({"group": g.id, "layer": path, "from": kept, "to": width,
                          "ms": {str(w): round(t, 4) for w, t in ms.items()}})
    return out, moves


def choose_widths(cg: Any, scores: list[torch.Tensor], widths: dict[int, int],
                  min_channels: int) -> tuple[set[int], list[dict[str, Any]]]:
    """The channels to remove so that every group keeps ``widths[group id]`` (its best-scored)."""
    from torchslim.prune.channels import _keep_minimum, _lowest

    removed: set[int] = set()
    report = []
    for g, s in zip(cg.groups, scores):
        n = g.size - widths.get(g.id, g.size)
        order = _lowest(s, n, cg.segments(g) if n else [], min_channels)
        removed.update(g.channels[i] for i in order)
        report.append({"id": g.id, "size": g.size, "kept": g.size - len(order)})
    return _keep_minimum(cg, scores, removed, report, min_channels)


def rounded_choice(model: nn.Module, cg: Any, scores: list[torch.Tensor], ratio: float, opts: dict[str, Any],
                   inputs: Inputs, runtime: str, threads: int | None,
                   memory_format: str | None) -> tuple[set[int], list[dict[str, Any]], list[dict[str, Any]]]:
    """``_choose`` at ``ratio`` with the kept widths moved by :func:`auto_widths`: (removed, report, moves)."""
    from torchslim.prune.channels import _choose

    removed, report = _choose(model, cg, scores, ratio, **opts)
    if opts.get("uniform_layers"):  # a transformers config must still describe the result: no per-group moves
        return removed, report, []
    widths, moves = auto_widths(model, cg, report, inputs, runtime, threads, memory_format)
    if not moves:
        return removed, report, []
    removed, report = choose_widths(cg, scores, widths, opts["min_channels"])
    return removed, report, moves


# ---- the search ------------------------------------------------------------------------------------------------
def search_latency(model: nn.Module, cg: Any, scores: list[torch.Tensor], opts: dict[str, Any], example_inputs: Any,
                   target: Any, *, auto_round: bool) -> tuple[float, tuple[set[int], list[dict[str, Any]]], dict[str, Any]]:
    """The pruning ratio whose measured latency meets ``target`` (a latency :class:`~torchslim.Budget`).

    Returns ``(ratio, (removed, report), achieved)``; ``achieved`` holds the measured ``latency``
    ratio, ``runtime``, ``threads``, ``memory_format`` and the search's trials. Raises a one-line
    ``ConfigError`` when no measured point is within ``max(tolerance, 0.05)`` of the budget.
    """
    if target.runtime in ("compile", "compile-int8"):
        with compile_room():
            return _search(model, cg, scores, opts, example_inputs, target, auto_round=auto_round)
    return _search(model, cg, scores, opts, example_inputs, target, auto_round=auto_round)


def _search(model: nn.Module, cg: Any, scores: list[torch.Tensor], opts: dict[str, Any], example_inputs: Any,
            target: Any, *, auto_round: bool) -> tuple[float, tuple[set[int], list[dict[str, Any]]], dict[str, Any]]:
    from torchslim.export.runtime_latency import check_runtime, latency_ratio, runtime_unavailable
    from torchslim.graph.state import clone_module
    from torchslim.graph.surgery import slice_model_
    from torchslim.prune.channels import _choose, _head_attrs, _measure, _trial

    runtime, _, threads = check_runtime(target.runtime, target.memory_format, target.threads)
    why = runtime_unavailable(runtime, model)
    if why:
        raise ConfigError(f"latency budget in {runtime}: {why}")
    threads = threads if threads is not None else torch.get_num_threads()
    goal, tol = float(target.fraction), float(target.tolerance)
    inputs = batched(example_inputs, target.batch)
    fmt, fmt_ms = faster_memory_format(model, inputs, runtime, threads, target.memory_format)
    timing_fmt = fmt if fmt == "channels_last" else None

    shadow, shadow_in = _trial(model, cg, example_inputs)
    base_macs = _measure(shadow, shadow_in, "macs") or 1.0
    macs_at: dict[float, float] = {}

    def macs(ratio: float) -> float:  # the coordinate latency is fitted on: shapes only, cheap
        key = round(ratio, 5)
        if key not in macs_at:
            removed, report = _choose(model, cg, scores, ratio, **opts)
            trial, trial_in = _trial(model, cg, example_inputs)
            slice_model_(trial, cg.keep_indices(removed), attrs=_head_attrs(model, cg, report))
            macs_at[key] = _measure(trial, trial_in, "macs") / base_macs
        return macs_at[key]

    def ratio_for(m: float, lo: float, hi: float) -> float:  # the ratio whose MACs fraction is m (bisection)
        for _ in range(14):
            mid = (lo + hi) / 2
            if macs(mid) > m:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    points: list[dict[str, Any]] = []  # measured trials

    def run(ratio: float) -> dict[str, Any]:
        if auto_round:
            removed, report, moves = rounded_choice(model, cg, scores, ratio, opts, inputs, runtime, threads, fmt)
        else:
            (removed, report), moves = _choose(model, cg, scores, ratio, **opts), []
        p = {"ratio": ratio, "macs": macs(ratio), "choice": (removed, report), "moves": moves}
        p["latency"] = timed(p, _RUNS)
        points.append(p)
        return p

    def timed(p: dict[str, Any], runs: int) -> float:
        removed, report = p["choice"]
        cand = clone_module(model)
        slice_model_(cand, cg.keep_indices(removed), attrs=_head_attrs(model, cg, report))
        _, t = latency_ratio(model, cand, inputs, runtime, threads=threads, runs=runs, memory_format=timing_fmt)
        return paired_ratio(t["original"], t["candidate"])

    lo_r, hi_r = 0.0, _MAX_RATIO  # bracket in ratio: latency above the budget at lo_r, at or below at hi_r
    anchor = {"ratio": 0.0, "macs": 1.0, "latency": 1.0}  # the original
    above, below = anchor, None
    floor_macs = macs(_MAX_RATIO)
    # first guess: latency falls like MACs
    ratio = _MAX_RATIO if goal <= floor_macs else ratio_for(goal, 0.0, _MAX_RATIO)
    why_not = ""
    sides: list[bool] = []  # above the budget, per trial
    for _ in range(MAX_TRIALS):
        p = run(ratio)
        if abs(p["latency"] - goal) <= tol * goal:
            break
        if p["latency"] > goal:
            above, lo_r = p, max(lo_r, ratio)
            if ratio >= _MAX_RATIO - 1e-3:
                why_not = (f"pruning every prunable group by {_MAX_RATIO:.0%} still costs {p['latency']:.3f} "
                           f"(what pruning cannot touch: other layers, runtime overhead)")
                break
        else:
            below, hi_r = p, min(hi_r, ratio)
        sides.append(p["latency"] > goal)
        a, b = (above, below) if below is not None else (anchor, p)
        stalled = below is not None and len(sides) >= 3 and sides[-1] == sides[-2] == sides[-3]
        if stalled:  # regula falsi keeps landing on one side (a kink or a jump): halve the bracket
            nxt = (lo_r + hi_r) / 2
        elif b["macs"] < a["macs"] - 1e-9 and b["latency"] < a["latency"] - 1e-9:  # the line through them, solved
            m = a["macs"] + (goal - a["latency"]) * (b["macs"] - a["macs"]) / (b["latency"] - a["latency"])
            nxt = ratio_for(min(max(m, floor_macs), 1.0), lo_r, hi_r)
        else:  # noise made latency rise with pruning: halve the bracket
            nxt = (lo_r + hi_r) / 2
        if below is not None and not lo_r < nxt < hi_r:
            nxt = (lo_r + hi_r) / 2
        if any(abs(nxt - q["ratio"]) < 1e-3 for q in points) or hi_r - lo_r < 1e-3:
            why_not = "the ratios left between the measured points differ by less than one channel"
            break
        ratio = nxt
    best = min(points, key=lambda q: abs(q["latency"] - goal))
    if abs(best["latency"] - goal) > max(tol, ACCEPT) * goal:  # near misses measured again, twice as long
        for q in sorted(points, key=lambda q: abs(q["latency"] - goal))[:2]:
            if abs(q["latency"] - goal) <= 2 * max(tol, ACCEPT) * goal:
                q["first_latency"], q["latency"] = q["latency"], timed(q, 2 * _RUNS)
        best = min(points, key=lambda q: abs(q["latency"] - goal))
    if abs(best["latency"] - goal) > max(tol, ACCEPT) * goal:
        tried = ", ".join(f"{q['ratio']:.3f} -> {q['latency']:.3f}" for q in points)
        reason = why_not or f"{len(points)} measured trials did not settle within {max(tol, ACCEPT):.0%}"
        if below is not None and above is not anchor and not why_not.startswith("pruning every"):
            reason += (f"; latency jumps from {above['latency']:.3f} at pruning ratio {lo_r:.3f} to {below['latency']:.3f} "
                       f"at {hi_r:.3f} (kernel choices change with widths; or a noisy machine)")
        raise ConfigError(
            f"latency budget {goal:g} in {runtime} ({threads} thread(s)) cannot be met: the closest measured ratio is "
            f"{best['latency']:.3f} of the original (trials, pruning ratio -> latency ratio: {tried}); {reason}; the model is unchanged")
    achieved: dict[str, Any] = {
        "latency": best["latency"], "runtime": runtime, "threads": threads, "memory_format": fmt or "runtime's own",
        "batch": target.batch, "trials": len(points),
        "trial_ratios": [{"ratio": round(q["ratio"], 4), "latency": round(q["latency"], 4),
                          **({"first_latency": round(q["first_latency"], 4)} if "first_latency" in q else {})}
                         for q in points],
    }
    if fmt_ms:
        achieved["memory_format_ms"] = {k: round(v, 4) for k, v in fmt_ms.items()}
    if auto_round:
        achieved["widths_moved"] = best["moves"]
    return best["ratio"], best["choice"], achieved
