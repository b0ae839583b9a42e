"""Unstructured sparsity to a latency budget, where a sparse kernel exists
(``sparsify_(m, target=ts.Budget(latency=0.5, runtime="eager"))``).

Masked zeros make nothing faster by themselves: a dense kernel multiplies them all the same. The
sparse kernel torchslim runs is PyTorch's CSR matrix multiply for ``nn.Linear``
(:class:`~torchslim.prune._sparse_kernels.CSRLinear`), in eager PyTorch on CPU, and it beats the
dense GEMM only at high sparsity (on a 2-core AMD EPYC, one thread, a 4096x4096 layer at batch 1:
1.6x slower at 80% zeros, 0.67x the time at 90%, 0.18x at 95%). ONNX Runtime, ``torch.compile``
and the ``.pte`` runtimes run the same weights on dense kernels, so a latency budget there is
refused in one line that says to prune channels instead.

The search, measured and never estimated:

1. a trial sparsity ``s`` is applied to a copy (the same method, scope and layers as the call),
   the masks are baked in, and each Linear is timed dense and as CSR on the input shape it
   really gets (cached per machine, :func:`~torchslim.export.runtime_latency.module_latencies`);
   the layers at least 5% faster as CSR run CSR;
2. that copy is timed against the original, paired (``latency_ratio``);
3. ``s`` moves by regula falsi on the measured ratios (bisection when the bracket is poor), at
   most :data:`MAX_TRIALS` trials, up to :data:`MAX_SPARSITY`. The least sparse trial within 5% of
   the budget is the result; if none is, the call refuses in one line with the closest ratio
   measured and why (the share of the time the sparse kernel cannot touch, typically).

The model gets the masks of the chosen sparsity (``sparsify_`` as usual); the plan's ``latency``
record names the layers that run CSR, which is how to deploy it: ``ts.finalize_(m)`` then
``ts.prune.to_csr_inference(m, layers=plan.latency["csr_layers"])``.

Example:
    >>> from torchslim.prune.sparse_latency import check_sparse_runtime
    >>> check_sparse_runtime("eager")
    'eager'
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchslim._utils import evaluating
from torchslim.errors import ConfigError
from torchslim.profile.budget import Budget

__all__ = ["MAX_SPARSITY", "MAX_TRIALS", "check_sparse_runtime", "csr_choice", "search_sparsity"]

MAX_TRIALS = 8
MAX_SPARSITY = 0.99
MIN_GAIN = 0.05  # a layer runs CSR when that saves at least this fraction of its dense time
BAND = 0.05  # a measured ratio within 5% of the budget is on target
_SPARSE_RUNTIMES = ("eager",)


def check_sparse_runtime(runtime: str) -> str:
    """``runtime`` when a sparse kernel runs there, else a one-line ConfigError saying what to use."""
    from torchslim.export.runtime_latency import check_runtime

    check_runtime(runtime)
    if runtime not in _SPARSE_RUNTIMES:
        raise ConfigError(
            f"sparsify_ cannot meet a latency budget in {runtime}: it runs unstructured zeros on dense kernels, so "
            f"sparsity does not change latency there; torchslim's sparse kernel is CSR nn.Linear in eager PyTorch "
            f"(runtime='eager'); for {runtime} remove channels with prune_channels_ or factorize_")
    return runtime


def _sparsity(weight: torch.Tensor) -> float:
    return 1.0 - float(torch.count_nonzero(weight)) / max(weight.numel(), 1)


def csr_choice(model: nn.Module, inputs: Any, *, threads: int | None, batch_shapes: dict[str, list[int]] | None = None,
               cache: bool = True) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Which plain ``nn.Linear`` layers of ``model`` (masks baked in) run faster as CSR: their names
    and, per timed layer, ``{"sparsity", "dense_ms", "csr_ms"}``. Each layer is timed on the input
    shape it gets from ``inputs`` (cached per machine under its widths and its sparsity, to 0.01)."""
    from torchslim.export.runtime_latency import layer_input_shapes, module_latencies
    from torchslim.prune._sparse_kernels import CSRLinear

    shapes = batch_shapes if batch_shapes is not None else layer_input_shapes(model, inputs)
    chosen: list[str] = []
    figures: dict[str, dict[str, float]] = {}
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or name not in shapes:
            continue
        s = _sparsity(mod.weight)
        if s < 0.5:  # CSR loses far below this on every shape measured here: not worth timing
            continue
        sig = {"out": mod.out_features, "in": mod.in_features, "bias": mod.bias is not None, "sparsity": round(s, 2)}
        t = module_latencies({"dense": (mod, {"linear": sig}), "csr": (CSRLinear.from_linear(mod), {"csr_linear": sig})},
                             shapes[name], "eager", threads=threads, cache=cache, runs=11, warmup=2)
        figures[name] = {"sparsity": round(s, 4), "dense_ms": t["dense"], "csr_ms": t["csr"]}
        if t["csr"] <= (1.0 - MIN_GAIN) * t["dense"]:
            chosen.append(name)
    return chosen, figures


def search_sparsity(model: nn.Module, inputs: Any, target: Budget, apply: Callable[[nn.Module, float], Any],
                    *, cache: bool = True) -> tuple[float, dict[str, Any]]:
    """The least sparsity whose measured latency (CSR where faster) is within 5% of ``target``.

    Args:
        model: left unchanged (trials run on copies).
        inputs: example inputs (repeated to ``target.batch`` rows when it is set).
        target: a latency :class:`~torchslim.profile.budget.Budget` in a runtime with a sparse kernel.
        apply: ``apply(copy, sparsity)`` masks a copy as the caller's ``sparsify_`` would.

    Returns:
        ``(sparsity, record)``; the record has the measured ``latency`` ratio, the runtime,
        threads, batch, ``csr_layers``, per-layer figures and every trial.

    Raises:
        ConfigError: a runtime without a sparse kernel, or no trial within 5% of the budget (the
            closest measured ratio and why).
    """
    from torchslim.export.runtime_latency import latency_ratio, layer_input_shapes
    from torchslim.graph.inputs import as_inputs
    from torchslim.prune._sparse_kernels import to_csr_inference
    from torchslim.prune.latency_budget import batched
    from torchslim.prune.masks import finalize_

    runtime = check_sparse_runtime(target.runtime)
    goal = float(target.latency)
    x = batched(inputs, target.batch)
    threads = target.threads
    shapes = layer_input_shapes(model, x)
    if not any(type(m) is nn.Linear and n in shapes for n, m in model.named_modules()):
        raise ConfigError("sparsify_ cannot meet a latency budget on this model: its sparse kernel is CSR nn.Linear, "
                          "and the model runs no nn.Linear layer; remove channels with prune_channels_ instead")
    trials: list[dict[str, Any]] = []

    def trial(s: float) -> dict[str, Any]:
        cand = copy.deepcopy(model)
        with evaluating(cand):
            apply(cand, s)
            finalize_(cand, storage="dense")  # masks baked in: the layers as they will run
            csr, figures = csr_choice(cand, x, threads=threads, batch_shapes=shapes, cache=cache)
            fast = to_csr_inference(cand, layers=csr)
        ratio, _ = latency_ratio(model, fast, as_inputs(x), runtime, threads=threads, runs=15, warmup=2)
        rec = {"sparsity": round(s, 4), "latency": round(float(ratio), 4), "csr_layers": csr, "layers": figures}
        trials.append(rec)
        return rec

    lo: dict[str, Any] | None = None  # sparsest trial still over the budget (too slow)
    hi: dict[str, Any] | None = None  # least sparse trial at or under it
    s = 0.9
    for _ in range(MAX_TRIALS):
        rec = trial(s)
        if abs(rec["latency"] - goal) <= BAND * goal:
            break
        if rec["latency"] > goal:
            lo = rec if lo is None or rec["sparsity"] > lo["sparsity"] else lo
        else:
            hi = rec if hi is None or rec["sparsity"] < hi["sparsity"] else hi
        if lo is not None and lo["sparsity"] >= MAX_SPARSITY:
            break
        if hi is None:
            s = min(MAX_SPARSITY, 1.0 - (1.0 - lo["sparsity"]) / 2.0)  # halve the density
        elif lo is None:  # already faster than asked: less sparse (CSR pays only past about half zeros)
            h = hi["sparsity"]
            s = 0.5 + (h - 0.5) / 2 if h > 0.55 else h / 2
        else:
            a, b = lo["sparsity"], hi["sparsity"]
            ra, rb = lo["latency"], hi["latency"]
            s = a + (ra - goal) * (b - a) / (ra - rb) if ra != rb else (a + b) / 2
            if not (a + 0.1 * (b - a) <= s <= b - 0.1 * (b - a)):  # a poor step: bisect
                s = (a + b) / 2
        if any(abs(s - t["sparsity"]) < 1e-3 for t in trials):
            break
    ok = [t for t in trials if abs(t["latency"] - goal) <= BAND * goal]
    if not ok:
        best = min(trials, key=lambda t: abs(t["latency"] - goal))
        tried = ", ".join(f"{t['sparsity']:.3f} -> {t['latency']:.3f}" for t in trials)
        sparsest = max(trials, key=lambda t: t["sparsity"])
        if sparsest["latency"] <= goal:
            why = "the latency jumps past the band between neighbouring sparsities"
        elif not sparsest["csr_layers"]:
            lay = min(sparsest["layers"].items(), key=lambda kv: kv[1]["csr_ms"] / max(kv[1]["dense_ms"], 1e-9),
                      default=None)
            shown = (f" (best: {lay[0]} at {lay[1]['sparsity']:.2f} zeros, dense {lay[1]['dense_ms']:.4f} ms vs CSR "
                     f"{lay[1]['csr_ms']:.4f} ms)" if lay else "")
            why = f"no nn.Linear layer runs faster as CSR at this batch size{shown}; a larger batch= may"
        else:
            why = (f"at sparsity {sparsest['sparsity']:.2f} the model still takes {sparsest['latency']:.3f} of the "
                   f"original's time: the CSR kernel speeds up nn.Linear only ({len(sparsest['csr_layers'])} layers run CSR)")
        raise ConfigError(f"sparsify_ cannot reach latency {goal:g} in {runtime} within 5%: closest {best['latency']:.3f} "
                          f"at sparsity {best['sparsity']:.3f} (trials: {tried}); {why}")
    best = min(ok, key=lambda t: t["sparsity"])
    record = {"latency": best["latency"], "budget": goal, "runtime": runtime, "threads": threads, "batch": target.batch,
              "sparsity": best["sparsity"], "csr_layers": best["csr_layers"], "layers": best["layers"],
              "trials": [{k: t[k] for k in ("sparsity", "latency")} for t in trials],
              "deploy": "ts.finalize_(m); ts.prune.to_csr_inference(m, layers=plan.latency['csr_layers'])"}
    return best["sparsity"], record
