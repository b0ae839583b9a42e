"""Ranks for a latency budget (``factorize_(..., target=ts.Budget(latency=0.6, runtime=...))``),
chosen by measured gain rather than MACs.

MACs say a Tucker-2 or SVD factorization at half the rank is faster; the runtime may disagree
(three small convolutions on a 224x224 map gain little over one, a 1x1 layer with few channels
only gets slower). So the planner measures, in the budget's runtime, threads and memory format:

1. **Per layer**: the layer as it is and its factorized form at a ladder of candidate ranks
   (fractions of full rank, multiples of 8 past 16), each on the input shape the layer really
   gets, timed together in one interleaved run and cached per machine
   (:func:`torchslim.export.runtime_latency.module_latencies`). A layer whose factorized form is
   not faster at any rank is left whole and the plan says so.
2. **Allocation**: starting from the whole model, the greedy step that saves the most measured
   milliseconds per unit of energy lost (the squared singular values dropped, the bound on the
   kernel's squared relative error) is taken until the estimated savings meet the budget; then
   layers are given back rank where the estimate allows.
3. **Correction**: the whole model is timed paired against the original (``latency_ratio``); the
   ratio of measured to estimated savings corrects the target (once two measured allocations
   bracket the budget, the target is interpolated between them) and the allocation is redone, for
   a few rounds. The result is the least compressed measured allocation within the budget; if none
   is, the fastest allocation is measured and, when still over, the call is refused in one line
   naming the closest ratio reached and why.

Nothing here changes the model: trials run on a copy whose layers get structure-only
factorized blocks (latency does not depend on the weights).

**A rank rule checked in a runtime** (``factorize_(..., energy=0.9, runtime="onnxruntime")``):
the rule (energy, MACs / params targets, fixed ranks) chooses each layer's ranks as usual; then
:func:`check_faster` times every chosen layer as it is against its factorized form at exactly those
ranks, on the input shape it really gets (the example inputs' batch, every call summed), in one
interleaved run per layer through the same per-machine cache. A layer whose factorized form does
not save at least :data:`MIN_GAIN` of its time is left whole, the measured figures in the reason.
Lower ranks are not tried: they would break the rule's promise (the energy kept, the MACs target),
and the layers this catches are the small ones whose cost is the runtime's per-op overhead, which
no rank removes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim._utils import evaluating, model_device
from torchslim.errors import ConfigError
from torchslim.lowrank._base import Factorization

__all__ = ["FRACTIONS", "LatencyResult", "SpeedCheck", "check_faster", "LayerTiming", "Option", "allocate", "candidate_ranks", "energy_lost",
           "input_shapes", "next_need", "plan", "speedup_words"]

# candidate ranks: these fractions of each mode's full rank (multiples of 8 once past 16)
FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2, 5 / 8, 3 / 4)
MIN_GAIN = 0.05  # a factorized form counts as faster when it saves at least this fraction of the layer's time
MIN_BAND = 0.05  # a measured latency ratio within 5% of the budget is on target (shared CPUs vary that much)
ROUNDS = 4  # paired whole-model measurements that correct the estimate
LAYER_RUNS, LAYER_WARMUP = 7, 1
MODEL_RUNS, MODEL_WARMUP = 11, 2  # at least; a fast model gets more rounds (MODEL_SECONDS of it, up to MAX_RUNS)
MODEL_SECONDS, MAX_RUNS = 0.5, 51
CHECK_RUNS, CHECK_WARMUP = 41, 3  # a rank rule's check: one layer against one factorized form, more rounds


@dataclass
class Option:
    """One rank choice of a layer: its ranks, measured ms (all calls) and the energy it loses."""

    ranks: tuple[int, ...]
    ms: float
    lost: float


@dataclass
class LayerTiming:
    """A layer's measured forms: as it is (``ms``) and the faster factorized ``options``."""

    name: str
    shapes: list[list[int]]
    ms: float
    options: list[Option] = field(default_factory=list)
    fastest: Option | None = None  # the fastest form tried, faster or not

    def saved(self, opt: Option | None) -> float:
        return 0.0 if opt is None else self.ms - opt.ms


@dataclass
class LatencyResult:
    """What :func:`plan` decided: ranks per layer, the layers left whole (and why), the report."""

    ranks: dict[str, tuple[int, ...]]
    layer_ms: dict[str, tuple[float, float]]
    skipped: list[tuple[str, str]]
    report: dict[str, Any]


def input_shapes(model: nn.Module, names: list[str], inputs: Any) -> dict[str, list[list[int]]]:
    """The shape of each named layer's input at every call in one forward of ``inputs``."""
    from torchslim.graph.inputs import as_inputs, call_model

    shapes: dict[str, list[list[int]]] = {n: [] for n in names}
    handles = []
    for n in names:
        def hook(mod: nn.Module, args: Any, n: str = n) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes[n].append(list(args[0].shape))
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        with evaluating(model), torch.no_grad():
            call_model(model, as_inputs(inputs).to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return shapes


def batched(inputs: Any, batch: int | None) -> Any:
    """``inputs`` with every tensor's first dimension repeated to ``batch`` rows (None: as given)."""
    from torchslim.graph.inputs import Inputs, as_inputs

    if batch is None:
        return inputs
    x = as_inputs(inputs)

    def rows(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] == batch:
            return t
        return t[:1].expand(batch, *t.shape[1:]).contiguous()

    return Inputs(tuple(rows(a) for a in x.args), {k: rows(v) for k, v in x.kwargs.items()})


def candidate_ranks(method: Factorization, module: nn.Module) -> list[tuple[int, ...]]:
    """The rank ladder timed for ``module``: :data:`FRACTIONS` of full rank, below full rank."""
    top = method.max_ranks(module)
    out: list[tuple[int, ...]] = []
    for f in FRACTIONS:
        ranks = tuple(min(m, 8 * round(r / 8)) if r >= 16 else r for r, m in zip(method.scaled(module, f), top))
        if ranks != tuple(top) and ranks not in out:
            out.append(ranks)
    return out


def energy_lost(energies: list[torch.Tensor], ranks: tuple[int, ...]) -> float:
    """Fraction of the squared singular values dropped at ``ranks`` (summed over modes; a single
    rank over several modes, as CP's, is held to the worst mode)."""
    lost = []
    for i, e in enumerate(energies):
        total = float(e.sum())
        r = ranks[i] if len(ranks) == len(energies) else ranks[0]
        kept = float(e[: max(1, min(r, e.numel()))].sum())
        lost.append(max(0.0, 1.0 - kept / total) if total > 0 else 0.0)
    return sum(lost) if len(ranks) == len(energies) else max(lost)


def _layer_signature(module: nn.Module) -> dict[str, Any]:
    sig: dict[str, Any] = {"type": type(module).__name__, "bias": getattr(module, "bias", None) is not None,
                           "dtype": str(module.weight.dtype)}
    if isinstance(module, nn.Linear):
        sig.update(shape=[module.out_features, module.in_features])
    else:
        sig.update(shape=list(module.weight.shape), stride=list(module.stride), padding=str(module.padding),
                   dilation=list(module.dilation), groups=module.groups, padding_mode=module.padding_mode)
    return sig


def time_layer(method: Factorization, name: str, module: nn.Module, shapes: list[list[int]], energies: list[torch.Tensor],
               runtime: str, threads: int, memory_format: str | None) -> LayerTiming:
    """The layer and its factorized forms at :func:`candidate_ranks`, timed on each input shape."""
    from torchslim.export.runtime_latency import module_latencies

    sig = _layer_signature(module)
    ladder = candidate_ranks(method, module)
    forms: dict[str, tuple[nn.Module, Any]] = {"whole": (module, {"layer": sig})}
    for ranks in ladder:
        seq = method.build(module, ranks)
        forms["x".join(map(str, ranks))] = (seq, {"factorized": method.name, "layer": sig, "ranks": list(ranks)})
    total: dict[str, float] = {k: 0.0 for k in forms}
    for shape in shapes:
        ms = module_latencies(forms, shape, runtime, threads=threads, memory_format=memory_format,
                              runs=LAYER_RUNS, warmup=LAYER_WARMUP)
        for k, v in ms.items():
            total[k] += v
    lt = LayerTiming(name, shapes, total["whole"])
    for ranks in ladder:
        opt = Option(ranks, total["x".join(map(str, ranks))], energy_lost(energies, ranks))
        if lt.fastest is None or opt.ms < lt.fastest.ms:
            lt.fastest = opt
        if opt.ms <= lt.ms * (1.0 - MIN_GAIN):
            lt.options.append(opt)
    lt.options.sort(key=lambda o: -o.ms)
    return lt


def allocate(layers: list[LayerTiming], need_ms: float) -> tuple[dict[str, Option | None], float]:
    """Options that save at least ``need_ms`` (estimated) losing the least energy per ms saved
    (greedy, then rank given back where the savings allow); ``(choice, estimated saved ms)``."""
    choice: dict[str, Option | None] = {lt.name: None for lt in layers}
    saved = 0.0
    while saved < need_ms:
        best: tuple[float, LayerTiming, Option] | None = None
        for lt in layers:
            cur = choice[lt.name]
            for opt in lt.options:
                gain = lt.saved(opt) - lt.saved(cur)
                if gain <= 0:
                    continue
                cost = opt.lost - (cur.lost if cur is not None else 0.0)
                score = gain / max(cost, 1e-12)
                if best is None or score > best[0]:
                    best = (score, lt, opt)
        if best is None:
            break  # every layer at its fastest form
        _, lt, opt = best
        saved += lt.saved(opt) - lt.saved(choice[lt.name])
        choice[lt.name] = opt
    # give back rank: the layer losing the most first, to the form losing least that still fits
    for lt in sorted(layers, key=lambda x: -(choice[x.name].lost if choice[x.name] else 0.0)):
        cur = choice[lt.name]
        if cur is None:
            continue
        for opt in [None, *lt.options]:
            lost = opt.lost if opt is not None else 0.0
            if lost < cur.lost and saved - lt.saved(cur) + lt.saved(opt) >= need_ms:
                saved += lt.saved(opt) - lt.saved(cur)
                choice[lt.name] = cur = opt
                break
    return choice, saved


def next_need(points: list[tuple[float, float]], f: float, ms0: float, ms1: float, max_saved: float) -> float:
    """The estimated savings to ask for next, from the measured allocations ``points`` (estimated ms
    saved, measured ratio; the last one measured at ``ms0`` -> ``ms1``): between the closest two that
    bracket ``f`` by linear interpolation, else the last estimate scaled by measured / estimated
    savings (all the way to the fastest forms when nothing was gained)."""
    above = [p for p in points if p[1] > f]
    below = [p for p in points if p[1] < f]
    if above and below:
        a = max(above, key=lambda p: p[0])  # the most saving allocation still too slow
        b = min(below, key=lambda p: p[0])  # the least saving one fast enough
        if a[0] < b[0] and a[1] > b[1]:
            return a[0] + (a[1] - f) * (b[0] - a[0]) / (a[1] - b[1])
        return (a[0] + b[0]) / 2
    est, _ = points[-1]
    real = ms0 - ms1
    if est <= 0 or real <= 0:
        return max_saved
    return (1.0 - f) * ms0 * est / real


def _describe(budget: Any, threads: int) -> str:
    fmt = f", {budget.memory_format}" if budget.memory_format else ""
    return f"{budget.runtime} ({threads} thread{'s' if threads != 1 else ''}{fmt})"


def _cpu_runtime(model: nn.Module, runtime: str, memory_format: str | None, threads: int | None, *,
                 what: tuple[str, str], hint: str = "") -> tuple[str, str | None, int]:
    """``(runtime, memory_format, threads)`` checked for timing ``model`` (threads resolved to a
    number); one-line ConfigErrors for a bad setting, a model off the CPU, a runtime not installed.
    ``what``: how the messages name the work (``"... is measured"``, ``"cannot ... in R"``)."""
    from torchslim.export.runtime_latency import check_runtime, runtime_unavailable

    runtime, memory_format, threads = check_runtime(runtime, memory_format, threads)
    if model_device(model).type != "cpu":
        raise ConfigError(f"{what[0]} on the CPU runtimes; the model is on {model_device(model)} "
                          f"(move it to the CPU first{hint})")
    why = runtime_unavailable(runtime, model)
    if why:
        raise ConfigError(f"cannot {what[1]} in {runtime}: {why}")
    return runtime, memory_format, threads if threads is not None else torch.get_num_threads()


def plan(model: nn.Module, method: Factorization, layers: list[tuple[str, nn.Module]], inputs: Any,
         budget: Any) -> LatencyResult:
    """Ranks that bring ``model``'s measured latency within ``budget`` (see the module docstring).

    Raises:
        ConfigError: no example inputs, no layer faster factorized, or the budget unreachable (the
            closest measured ratio said); the model is never changed.
    """
    from torchslim.export.runtime_latency import latency_ratio, paired_latency
    from torchslim.graph.state import clone_module

    if inputs is None:
        raise ConfigError("a latency budget needs example inputs (pass example_inputs=, or build the model with "
                          "ts.create_model)")
    runtime, memory_format, n = _cpu_runtime(model, budget.runtime, budget.memory_format, budget.threads,
                                             what=("a latency budget is measured", "measure a latency budget"))
    where = _describe(budget, n)
    inputs = batched(inputs, budget.batch)
    f = budget.fraction
    band = max(float(budget.tolerance), MIN_BAND)
    names = [name for name, _ in layers]
    shapes = input_shapes(model, names, inputs)
    timings: list[LayerTiming] = []
    skipped: list[tuple[str, str]] = []
    for name, module in layers:
        if not shapes[name]:
            skipped.append((name, "not called in a forward of the example inputs"))
            continue
        lt = time_layer(method, name, module, shapes[name], method.mode_energies(module), runtime, n, memory_format)
        if lt.options:
            timings.append(lt)
        else:
            best = lt.fastest
            detail = (f"; fastest {best.ms:.3g} ms at ranks {list(best.ranks)} vs {lt.ms:.3g} ms as it is"
                      if best is not None else "; no rank below full rank")
            skipped.append((name, f"not faster factorized in {where} at any rank tried{detail}"))
    if not timings:
        raise ConfigError(f"latency budget {f} in {where} cannot be reached with method {method.name!r}: none of the "
                          f"{len(layers)} selected layers is faster factorized at any rank tried; the model is unchanged")

    t0 = paired_latency({"original": model}, inputs, runtime, threads=n, runs=MODEL_RUNS, warmup=MODEL_WARMUP,
                        memory_format=memory_format)["original"].median_ms
    runs = max(MODEL_RUNS, min(MAX_RUNS, int(MODEL_SECONDS * 1000 / max(t0, 1e-3))))  # short forwards: more rounds
    trial = clone_module(model)
    originals = {lt.name: trial.get_submodule(lt.name) for lt in timings}

    def measure(choice: dict[str, Option | None]) -> tuple[float, float, float]:
        for lt in timings:
            opt = choice[lt.name]
            _swap(trial, lt.name, originals[lt.name] if opt is None else method.build(originals[lt.name], opt.ranks))
        ratio, t = latency_ratio(model, trial, inputs, runtime, threads=n, runs=runs, warmup=MODEL_WARMUP,
                                 memory_format=memory_format)
        return ratio, t["original"].median_ms, t["candidate"].median_ms

    rounds: list[dict[str, Any]] = []
    tried: list[tuple[dict[str, Option | None], float]] = []
    need = (1.0 - f) * t0
    points: list[tuple[float, float]] = []  # (estimated ms saved, measured ratio) of each measured allocation
    max_saved = sum(lt.saved(lt.options[-1]) for lt in timings)
    for _ in range(ROUNDS):
        choice, est = allocate(timings, need)
        key = _key(choice)
        if any(_key(c) == key for c, _ in tried):
            break  # the correction lands on an allocation already measured
        ratio, ms0, ms1 = measure(choice)
        tried.append((choice, ratio))
        rounds.append({"estimated_ratio": round(1.0 - est / max(ms0, 1e-9), 4), "measured_ratio": round(ratio, 4),
                       "original_ms": ms0, "factorized_ms": ms1,
                       "layers": sum(o is not None for o in choice.values())})
        if f * (1 - band) <= ratio <= f * (1 + band):
            break
        points.append((est, ratio))
        need = next_need(points, f, ms0, ms1, max_saved)
    fits = [(c, r) for c, r in tried if r <= f * (1 + band)]
    if not fits:
        fastest = {lt.name: lt.options[-1] for lt in timings}
        if not any(_key(c) == _key(fastest) for c, _ in tried):
            ratio, ms0, ms1 = measure(fastest)
            tried.append((fastest, ratio))
            rounds.append({"estimated_ratio": round(1.0 - max_saved / max(ms0, 1e-9), 4),
                           "measured_ratio": round(ratio, 4), "original_ms": ms0, "factorized_ms": ms1,
                           "layers": len(timings)})
            if ratio <= f * (1 + band):
                fits = [(fastest, ratio)]
    if not fits:
        closest = min(r for _, r in tried)
        raise ConfigError(
            f"latency budget {f} in {where} cannot be reached with method {method.name!r}: the closest measured "
            f"ratio is {closest:.3f} (every profitable layer at its fastest rank; {len(skipped)} of {len(layers)} "
            f"layers are not faster factorized); raise the budget, select more layers or use another method; "
            "the model is unchanged"
        )
    choice, ratio = max(fits, key=lambda cr: cr[1])  # the least compressed allocation within the budget
    index = next(i for i, (c, _) in enumerate(tried) if c is choice)
    by_name = {lt.name: lt for lt in timings}
    ranks: dict[str, tuple[int, ...]] = {}
    layer_ms: dict[str, tuple[float, float]] = {}
    for name, opt in choice.items():
        lt = by_name[name]
        if opt is None:
            skipped.append((name, f"left whole: the budget was met by layers that lose less energy per ms saved "
                                  f"(factorized it could save up to {lt.saved(lt.options[-1]):.3g} of {lt.ms:.3g} ms)"))
        else:
            ranks[name] = opt.ranks
            layer_ms[name] = (lt.ms, opt.ms)
    report = {
        "budget": f, "runtime": runtime, "threads": n, "memory_format": memory_format, "batch": budget.batch,
        "band": band, "measured_ratio": round(ratio, 4), "on_target": f * (1 - band) <= ratio <= f * (1 + band),
        "original_ms": rounds[index]["original_ms"], "factorized_ms": rounds[index]["factorized_ms"],
        "estimated_ratio": rounds[index]["estimated_ratio"],
        "rounds": rounds, "skipped": [name for name, _ in skipped],
    }
    return LatencyResult(ranks, layer_ms, skipped, report)


@dataclass
class SpeedCheck:
    """What :func:`check_faster` measured: ``(whole ms, factorized ms)`` per timed layer, the layers
    to leave whole (name -> reason) and a JSON report."""

    layer_ms: dict[str, tuple[float, float]]
    slower: dict[str, str]
    report: dict[str, Any]


def check_faster(model: nn.Module, method: Factorization, layers: list[tuple[str, nn.Module, tuple[int, ...]]],
                 inputs: Any, runtime: str, threads: int | None = None) -> SpeedCheck:
    """Each of ``layers`` (name, module, chosen ranks) timed as it is and factorized at its ranks in
    ``runtime`` on the input shapes it gets in a forward of ``inputs``; those not at least
    :data:`MIN_GAIN` faster factorized are named in ``slower``. A layer the forward never calls is
    not timed (its form cannot change the model's latency) and is not in ``slower``.

    Raises:
        ConfigError: a bad runtime / threads, the runtime not installed, the model not on the CPU,
            or a layer the runtime cannot take; the model is never changed.
    """
    from torchslim.export.runtime_latency import module_latencies

    runtime, _, n = _cpu_runtime(model, runtime, None, threads, what=("factorized layers are timed", "time factorized layers"),
                                 hint=", or give runtime=None")
    where = f"{runtime} ({n} thread{'s' if n != 1 else ''})"
    shapes = input_shapes(model, [name for name, _, _ in layers], inputs)
    layer_ms: dict[str, tuple[float, float]] = {}
    slower: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for name, module, ranks in layers:
        if not shapes[name]:
            continue
        sig = _layer_signature(module)
        forms = {"whole": (module, {"layer": sig}),
                 "factorized": (method.build(module, ranks), {"factorized": method.name, "layer": sig,
                                                              "ranks": list(ranks)})}
        total = {"whole": 0.0, "factorized": 0.0}
        for shape in shapes[name]:
            ms = module_latencies(forms, shape, runtime, threads=n, runs=CHECK_RUNS, warmup=CHECK_WARMUP)
            total = {k: total[k] + ms[k] for k in total}
        whole, fact = total["whole"], total["factorized"]
        layer_ms[name] = (whole, fact)
        faster = fact <= whole * (1.0 - MIN_GAIN)
        rows.append({"layer": name, "ranks": list(ranks), "shape": shapes[name][0], "calls": len(shapes[name]),
                     "whole_ms": round(whole, 6), "factorized_ms": round(fact, 6), "faster": faster})
        if not faster:
            what = "slower" if fact >= whole else f"not {MIN_GAIN:.0%} faster"
            slower[name] = (f"{what} factorized in {where}: {whole:.3g} ms whole vs {fact:.3g} ms factorized at "
                            f"ranks {list(ranks)}; left whole")
    report = {"runtime": runtime, "threads": n, "min_gain": MIN_GAIN, "batch": _batch(shapes),
              "layers": rows, "left_whole": list(slower)}
    return SpeedCheck(layer_ms, slower, report)


def _batch(shapes: dict[str, list[list[int]]]) -> int | None:
    """The leading dimension of the first recorded input shape (the batch the layers were timed at)."""
    first = next((s[0] for s in shapes.values() if s and s[0]), None)
    return None if first is None else int(first[0])


def _key(choice: dict[str, Option | None]) -> tuple[Any, ...]:
    return tuple(sorted((n, o.ranks if o is not None else None) for n, o in choice.items()))


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def speedup_words(report: dict[str, Any]) -> str:
    """One line: the measured ratio, where, and how many layers were left whole."""
    x = 1.0 / max(report["measured_ratio"], 1e-9)
    return (f"measured latency ratio {report['measured_ratio']:.3f} ({x:.2f}x faster) in {report['runtime']} at "
            f"{report['threads']} thread{'s' if report['threads'] != 1 else ''}, budget {report['budget']}; "
            f"{len(report['skipped'])} layer{'s' if len(report['skipped']) != 1 else ''} left whole")


