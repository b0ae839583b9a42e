"""Does structured pruning make models faster? torchslim vs Torch-Pruning, side by side in one run.

Part 1 (speed): ResNet-50 and ViT-B/16 (torchvision, random weights, 224 px, batch 1) are pruned to
50% of their MACs

- with torchslim: ``ts.prune_channels_(model, x, target=ts.Budget(macs=0.5))``, with ``round_to=8``
  and 32, and with ``allocation="latency"`` at ``round_to=8`` and 32 (per-group ratios scaled by
  measured seconds per MAC);
- with Torch-Pruning: ``MagnitudePruner`` + group L2 importance, ``pruning_ratio=1.0`` split into
  ``--tp-steps`` linear iterative steps, stepping until the model is at or below 50% of its MACs
  (Torch-Pruning's own "progressive pruning" recipe), plus a ``round_to=8`` variant. On ViT the
  width must stay divisible by the 12 heads, so Torch-Pruning gets ``round_to=12`` (and 24 for the
  8-aligned variant), and ``model.hidden_dim`` is updated after each step as its example does.

Convnets are timed twice, in PyTorch's default NCHW layout and in ``channels_last`` (the same
models converted with ``.to(memory_format=torch.channels_last)``, input too), each format's ratios
against the dense model in that format; oneDNN's NHWC kernels run the pruned widths much closer to
their MACs than the NCHW path does.

MACs of every model are counted by the same counter (``ts.profile``). The dense and pruned models'
CPU latencies are then measured in the same process, interleaved: after a warm-up, each round runs
every model once (in a rotated order) and a model's latency is the median over rounds. For each
pruned model the table reports the MACs ratio (dense / pruned), the latency ratio (dense / pruned)
and their quotient (the issue's target: latency ratio >= 0.9 x MACs ratio).

Part 2 (analysis time): ``ts.graph.groups(model, x)`` (which includes the trace) against Torch-
Pruning's ``DependencyGraph().build_dependency(model, x)`` + ``list(get_all_groups())``, alternated,
median of ``--analysis-repeats`` runs each, on ResNet-50/152, DenseNet-121/201 and ViT-B/16.

    pip install torch-pruning   # a peer, for this benchmark only (never a torchslim dependency)
    python benchmarks/prune_latency.py [--threads 2] [--rounds 40] [--skip-analysis] [--skip-latency]

Prints rich tables and writes benchmarks/results/prune_latency.json (atomically). The machine's
load average is recorded with the results: on a shared machine, absolute latencies drift, which is
why only ratios measured in the same run are compared.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

import torchslim as ts
from torchslim._utils import atomic_path

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "prune_latency.json")
TARGET = 0.5


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def cost(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    p = ts.profile(model, x, latency=False, size=False)
    return int(p.macs), int(p.params)


def prune_torchslim(model: nn.Module, x: torch.Tensor, round_to: int, allocation: str = "uniform") -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = ts.prune_channels_(model, x, target=ts.Budget(macs=TARGET), round_to=round_to, allocation=allocation)
    return {"prune_s": time.perf_counter() - t0, "ratio": plan.ratio, "groups": len(plan.groups),
            "left_whole": len(plan.left_whole), "allocation": allocation}


def _num_heads(model: nn.Module) -> int:
    heads = {m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return max(heads) if heads else 1


def prune_torch_pruning(model: nn.Module, x: torch.Tensor, round_to: int | None, steps: int) -> dict[str, Any]:
    import torch_pruning as tp

    heads = _num_heads(model)
    if heads > 1:  # Torch-Pruning prunes the embedding width, which must stay divisible by the heads
        round_to = math.lcm(round_to or 1, heads)
    vit = isinstance(model, torchvision.models.VisionTransformer)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    base, _ = cost(model, x)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MagnitudePruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=1.0,
            iterative_steps=steps, round_to=round_to, ignored_layers=classifier)
        frac, checks = 1.0, 0
        for k in range(1, steps + 1):
            pruner.step()
            if vit:  # torchvision's ViT reshapes with self.hidden_dim (Torch-Pruning's example does this)
                model.hidden_dim = model.conv_proj.out_channels
            # A uniform channel ratio r keeps at least (1 - r)^2 of the MACs: no need to count
            # them before that bound can reach the target.
            if (1 - k / steps) ** 2 > TARGET * 1.1:
                continue
            checks += 1
            frac = cost(model, x)[0] / base
            if frac <= TARGET:
                break
    return {"prune_s": time.perf_counter() - t0, "steps": k, "ratio": k / steps, "round_to": round_to,
            "macs_checks": checks}


def interleaved_latency(models: dict[str, nn.Module], x: torch.Tensor | dict[str, torch.Tensor], rounds: int, warmup: int,
                        ref_of: dict[str, str] | None = None) -> dict[str, dict]:
    """Per model: median/p10/p90 ms over ``rounds`` rounds, every round running each model once
    (``x``: one input for all, or one per model); ``paired_ratio_median``: the median over rounds
    of (its reference's time / its time), the reference being ``ref_of[name]`` (default: the
    first model)."""
    names = list(models)
    inputs = x if isinstance(x, dict) else {n: x for n in names}
    ref_of = ref_of or {n: names[0] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            for _ in range(warmup):
                models[n](inputs[n])
        for r in range(rounds):
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                models[n](inputs[n])
                times[n].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for n in names:
        s = sorted(times[n])
        paired = [d / t for d, t in zip(times[ref_of[n]], times[n])]  # same round: drift cancels
        out[n] = {"median_ms": statistics.median(s), "p10_ms": s[int(0.1 * (len(s) - 1))],
                  "p90_ms": s[int(round(0.9 * (len(s) - 1)))], "runs": len(s),
                  "paired_ratio_median": statistics.median(paired)}
    return out


def speed(arch: str, args: argparse.Namespace, console: Console) -> list[dict]:
    x = torch.randn(1, 3, 224, 224)
    dense = build(arch)
    with torch.no_grad():
        ref_shape = tuple(dense(x).shape)
    macs0, params0 = cost(dense, x)
    variants: dict[str, nn.Module] = {"dense": dense}
    info: dict[str, dict] = {"dense": {}}
    recipes = [("torchslim", "ts", 1), ("torchslim round_to=8", "ts", 8), ("torchslim round_to=32", "ts", 32),
               ("torchslim latency-aware round_to=8", "ts-lat", 8), ("torchslim latency-aware round_to=32", "ts-lat", 32),
               ("Torch-Pruning", "tp", None), ("Torch-Pruning round_to=8", "tp", 8)]
    for label, tool, rt in recipes:
        console.print(f"[dim]{arch}: pruning with {label} ...[/dim]")
        m = copy.deepcopy(dense)
        if tool == "tp":
            info[label] = prune_torch_pruning(m, x, rt, args.tp_steps)
        else:
            info[label] = prune_torchslim(m, x, rt, "latency" if tool == "ts-lat" else "uniform")
        m.eval()
        with torch.no_grad():
            shape = tuple(m(x).shape)
        if shape != ref_shape:
            raise RuntimeError(f"{label} changed {arch}'s output shape {ref_shape} -> {shape}")
        variants[label] = m
    # every model also in channels_last memory format (convnets): the same weights, the layout
    # oneDNN's NHWC kernels use; each format's ratios are against the dense model in that format
    formats = ["nchw"] + (["channels_last"] if args.channels_last and not arch.startswith("vit") else [])
    timed: dict[str, nn.Module] = {}
    inputs: dict[str, torch.Tensor] = {}
    ref_of: dict[str, str] = {}
    for fmt in formats:
        for label, m in variants.items():
            key = label if fmt == "nchw" else f"{label} [channels_last]"
            timed[key] = m if fmt == "nchw" else copy.deepcopy(m).to(memory_format=torch.channels_last)
            inputs[key] = x if fmt == "nchw" else x.to(memory_format=torch.channels_last)
            ref_of[key] = "dense" if fmt == "nchw" else "dense [channels_last]"
    console.print(f"[dim]{arch}: timing {len(timed)} models interleaved, {args.rounds} rounds ...[/dim]")
    lat = interleaved_latency(timed, inputs, args.rounds, args.warmup, ref_of)
    rows = []
    for key in timed:
        label, fmt = (key[: -len(" [channels_last]")], "channels_last") if key.endswith("[channels_last]") else (key, "nchw")
        macs, params = (macs0, params0) if label == "dense" else cost(variants[label], x)
        macs_ratio = macs0 / macs
        lat_ratio = lat[ref_of[key]]["median_ms"] / lat[key]["median_ms"]
        rows.append({"model": arch, "method": label, "format": fmt, "macs": macs, "params": params,
                     "macs_fraction": macs / macs0, "macs_ratio": macs_ratio, "latency_ms": lat[key],
                     "latency_ratio": lat_ratio, "latency_over_macs": lat_ratio / macs_ratio,
                     "paired_latency_over_macs": lat[key]["paired_ratio_median"] / macs_ratio, **info[label]})
    return rows


def analysis(names: list[str], repeats: int, console: Console) -> list[dict]:
    import torch_pruning as tp

    def ts_groups(m: nn.Module, x: torch.Tensor) -> int:
        return len(ts.graph.groups(m, x))

    def tp_groups(m: nn.Module, x: torch.Tensor) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(m, example_inputs=x, verbose=False)
            return len(list(dg.get_all_groups()))

    warm = build("resnet18")  # first-call costs (lazy imports, allocator) are paid by neither side
    xw = torch.randn(1, 3, 224, 224)
    ts_groups(warm, xw), tp_groups(warm, xw)
    rows = []
    for name in names:
        console.print(f"[dim]analysis: {name} ...[/dim]")
        model, x = build(name), torch.randn(1, 3, 224, 224)
        t_ts, t_tp = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            n_ts = ts_groups(model, x)
            t_ts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n_tp = tp_groups(model, x)
            t_tp.append(time.perf_counter() - t0)
        ops = len(ts.trace(model, x).ops)
        a, b = statistics.median(t_ts), statistics.median(t_tp)
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()), "traced_ops": ops,
                     "torchslim_s": a, "torch_pruning_s": b, "speedup": b / a, "torchslim_ms_per_op": 1e3 * a / ops,
                     "torch_pruning_ms_per_op": 1e3 * b / ops, "torchslim_groups": n_ts, "torch_pruning_groups": n_tp,
                     "torchslim_all_s": t_ts, "torch_pruning_all_s": t_tp})
    return rows


def print_speed(rows: list[dict], threads: int, console: Console) -> None:
    t = Table(title=f"CPU latency at {TARGET:.0%} of MACs (batch 1, 224 px, {threads} threads, interleaved medians)")
    for col in ("model", "method", "format", "MACs (G)", "params (M)", "latency ms", "MACs ratio", "latency ratio",
                "lat/MACs ratio", "prune s"):
        t.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in rows:
        dense = r["method"] == "dense"
        t.add_row(r["model"], r["method"], r.get("format", "nchw"), f"{r['macs'] / 1e9:.2f}", f"{r['params'] / 1e6:.1f}",
                  f"{r['latency_ms']['median_ms']:.1f}", "" if dense else f"{r['macs_ratio']:.2f}",
                  "" if dense else f"{r['latency_ratio']:.2f}", "" if dense else f"{r['latency_over_macs']:.2f}",
                  "" if dense else f"{r['prune_s']:.1f}")
    console.print(t)


def print_analysis(rows: list[dict], console: Console) -> None:
    t = Table(title="Analysis time: ts.graph.groups (trace included) vs Torch-Pruning build_dependency + get_all_groups")
    for col in ("model", "traced ops", "torchslim s", "Torch-Pruning s", "speed-up", "ts ms/op", "TP ms/op",
                "groups ts / TP"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(r["model"], str(r["traced_ops"]), f"{r['torchslim_s']:.2f}", f"{r['torch_pruning_s']:.2f}",
                  f"x{r['speedup']:.1f}", f"{r['torchslim_ms_per_op']:.2f}", f"{r['torch_pruning_ms_per_op']:.2f}",
                  f"{r['torchslim_groups']} / {r['torch_pruning_groups']}")
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40, help="timed rounds (each runs every model once)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--models", default="resnet50,vit_b_16")
    ap.add_argument("--tp-steps", type=int, default=100, help="Torch-Pruning iterative steps for pruning_ratio=1")
    ap.add_argument("--analysis-models", default="resnet50,resnet152,densenet121,densenet201,vit_b_16")
    ap.add_argument("--analysis-repeats", type=int, default=3)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-analysis", action="store_true")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                    help="time convnets only in the default NCHW layout (default: NCHW and channels_last)")
    args = ap.parse_args(argv)
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        print("this benchmark compares with Torch-Pruning: pip install torch-pruning", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    console = Console(width=170)
    result: dict[str, Any] = {}
    if os.path.exists(RESULTS):  # keep the other part when only one is re-run
        with open(RESULTS) as f:
            result = json.load(f)
    result["env"] = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "torch_pruning": _version("torch-pruning"), "threads": torch.get_num_threads(),
                     "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "load_average_start": os.getloadavg()}
    if not args.skip_latency:
        rows = []
        for arch in [m for m in args.models.split(",") if m]:
            rows += speed(arch, args, console)
        print_speed(rows, torch.get_num_threads(), console)
        rerun = {r["model"] for r in rows}
        kept = [r for r in result.get("speed", {}).get("rows", []) if r["model"] not in rerun]
        result["speed"] = {"rows": kept + rows, "rounds": args.rounds, "warmup": args.warmup, "target_macs": TARGET,
                           "tp_steps": args.tp_steps, "threads": torch.get_num_threads(),
                           "load_average_end": os.getloadavg()}
    if not args.skip_analysis:
        rows = analysis([m for m in args.analysis_models.split(",") if m], args.analysis_repeats, console)
        print_analysis(rows, console)
        result["analysis"] = {"rows": rows, "repeats": args.analysis_repeats, "threads": torch.get_num_threads(),
                              "load_average_end": os.getloadavg()}
    with atomic_path(RESULTS) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    console.print(f"wrote {os.path.relpath(RESULTS)}")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
