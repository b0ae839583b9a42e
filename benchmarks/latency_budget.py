"""Channel pruning to a latency budget measured in the target runtime vs MACs-driven pruning (issue #24).

For each model (torchvision, random weights: latency does not depend on them) and runtime asked for:

* ``latency``: ``ts.prune_channels_(m, x, target=ts.Budget(latency=0.5, runtime=R, threads=T))``
  (a search on paired measurements in R; widths rounded to the sizes R runs fastest, measured);
* ``macs@lat``: MACs-driven pruning at the same latency: ``target=ts.Budget(macs=f)`` with ``f``
  searched (secant on measured latency, at most ``--macs-tries`` tries) until the pruned model's
  latency measured in R is within 5% of the budget (or the closest try);

then the original and both pruned models are timed again, together, in R (``paired_latency``: one
interleaved run, order rotated, same threads and memory format), and each is scored by top-1
agreement with the dense model on scikit-image's bundled photos (the accuracy proxy). With random
weights (no download here) the dense model gives every photo the same class (ResNet-50: class
713 for all 8), so this proxy is all-or-nothing and says little; it becomes meaningful with
trained weights.

Latency efficiency of MACs-budget pruning (``Budget(macs=0.5)``), ViT-B/16 and ResNet-50: latency
speedup / MACs speedup, paired against the original, in each PyTorch memory format for ResNet-50;
Torch-Pruning's ``MagnitudePruner`` at the same MACs target in the same run when ``torch_pruning``
imports (as in ``benchmarks/prune_latency.py``).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/latency_budget.py [--models resnet50 mobilenet_v2]
        [--runtimes eager onnxruntime] [--threads 1] [--quick] [--no-efficiency | --efficiency-only] [--vit-size 224]

``--efficiency-only`` measures only the efficiency table; ``--vit-size`` builds ViT-B/16 for a
smaller image (random weights: any multiple of 16). Prints tables and merges the rows into
benchmarks/results/latency_budget.json (atomically; rows of other models / runtimes stay, each
row names the run that measured it). Per-layer timings
are cached in ``$TORCHSLIM_CACHE`` (the first run on a machine measures them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from typing import Any

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.export.runtime_latency import latency_ratio, paired_latency
from torchslim.profile.latency import cpu_name

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latency_budget.json")
MODELS = ("resnet50", "mobilenet_v2", "vit_b_16", "vgg16")
BUDGET = 0.5
CLOSE = 0.05


def build(name: str, vit_size: int = 224) -> nn.Module:
    torch.manual_seed(0)
    extra = {"image_size": vit_size} if name.startswith("vit") else {}
    return torchvision.models.get_model(name, weights=None, **extra).eval()


def photos(size: int) -> torch.Tensor:
    """The bundled photos (8 scikit-image pictures), ImageNet-normalised."""
    return torch.stack([x for x, _ in ts.load_data(f"images:{size}").test])


@torch.no_grad()
def agreement(dense_out: torch.Tensor, model: nn.Module, pics: torch.Tensor) -> float:
    return float((model.eval()(pics).argmax(1) == dense_out.argmax(1)).float().mean())


def macs_of(model: nn.Module, x: torch.Tensor) -> float:
    return float(ts.profile(model, x, latency=False, size=False).macs)


def prune_latency(dense: nn.Module, x: torch.Tensor, runtime: str, threads: int, con: Console) -> dict[str, Any]:
    m = copy.deepcopy(dense)
    t0 = time.perf_counter()
    try:
        plan = ts.prune_channels_(m, x, target=ts.Budget(latency=BUDGET, runtime=runtime, threads=threads))
    except ts.TorchslimError as exc:
        con.print(f"[yellow]{runtime}: latency budget refused: {exc}[/yellow]")
        return {"model": None, "refused": str(exc), "search_s": time.perf_counter() - t0}
    a = plan.achieved
    con.print(f"[dim]{runtime}: latency search {time.perf_counter() - t0:.0f} s, {a['trials']} trials, searched "
              f"ratio {a['latency']:.3f}, memory format {a['memory_format']}, {len(a.get('widths_moved', []))} widths moved[/dim]")
    return {"model": m, "search_s": time.perf_counter() - t0, "search_ratio": a["latency"], "trials": a["trials"],
            "memory_format": a["memory_format"], "widths_moved": len(a.get("widths_moved", [])), "ratio": plan.ratio}


def prune_macs_at_latency(dense: nn.Module, x: torch.Tensor, runtime: str, threads: int, fmt: str | None, tries: int,
                          con: Console, target: float = BUDGET) -> dict[str, Any]:
    """MACs-budget pruning whose measured latency in ``runtime`` (on ``x``) is closest to ``target``
    (secant on the MACs fraction ``f``); the pruning traces one row of ``x``."""
    pts: list[tuple[float, float, nn.Module]] = []
    f = target
    t0 = time.perf_counter()
    for _ in range(tries):
        m = copy.deepcopy(dense)
        ts.prune_channels_(m, x[:1], target=ts.Budget(macs=f))
        lat, _ = latency_ratio(dense, m, x, runtime, threads=threads, runs=11, memory_format=fmt)
        pts.append((f, float(lat), m))
        con.print(f"[dim]{runtime}: MACs budget {f:.3f} -> latency {lat:.3f} (aim {target:.3f})[/dim]")
        if abs(lat - target) <= CLOSE * target:
            break
        if len(pts) == 1:
            f = f * target / max(lat, 1e-3)
        else:
            (f1, l1, _), (f2, l2, _) = pts[-2], pts[-1]
            f = f2 + (target - l2) * (f2 - f1) / (l2 - l1) if abs(l2 - l1) > 1e-6 else f2 * target / max(l2, 1e-3)
        f = min(max(f, 0.03), 1.0)
    f, lat, m = min(pts, key=lambda p: abs(p[1] - target))
    return {"model": m, "macs_budget": f, "search_ratio": lat, "trials": len(pts), "search_s": time.perf_counter() - t0,
            "first": pts[0]}


def budget_rows(name: str, dense: nn.Module, x: torch.Tensor, pics: torch.Tensor, dense_out: torch.Tensor,
                runtime: str, threads: int, args: argparse.Namespace, con: Console) -> tuple[list[dict[str, Any]], Any]:
    torch.set_num_threads(threads)
    base_macs = macs_of(dense, x)
    lat = prune_latency(dense, x, runtime, threads, con)
    fmt = lat.get("memory_format") if runtime in ("eager", "compile") else None
    fmt = fmt if fmt in ("contiguous", "channels_last") else None
    mac = prune_macs_at_latency(dense, x, runtime, threads, fmt, args.macs_tries, con)
    models = {"original": dense, "macs@lat": mac["model"]}
    if lat["model"] is not None:
        models["latency"] = lat["model"]
    t = paired_latency(models, x, runtime, threads=threads, runs=args.runs, warmup=2, memory_format=fmt)
    rows = []
    for label, info in (("latency", lat), ("macs@lat", mac)):
        row = {"model": name, "runtime": runtime, "threads": threads, "variant": label,
               "memory_format": fmt or ("runtime's own" if runtime not in ("eager", "compile") else "contiguous"),
               **{k: v for k, v in info.items() if k not in ("model", "first")}}
        if info["model"] is not None:
            ratio = t[label].median_ms / t["original"].median_ms
            row.update(latency_ratio=ratio, within=abs(ratio - BUDGET) <= CLOSE * BUDGET, median_ms=t[label].median_ms,
                       original_ms=t["original"].median_ms, macs_ratio=macs_of(info["model"], x) / base_macs,
                       top1_agreement=agreement(dense_out, info["model"], pics))
        rows.append(row)
    return rows, mac["first"]


def efficiency_rows(name: str, dense: nn.Module, x: torch.Tensor, runtime: str, threads: int, macs_half: nn.Module,
                    args: argparse.Namespace, con: Console) -> list[dict[str, Any]]:
    """Latency speedup / MACs speedup of MACs-budget (0.5) pruning, and Torch-Pruning's, paired."""
    models = {"original": dense, "torchslim macs=0.5": macs_half}
    tp_version = None
    try:
        import torch_pruning

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from prune_latency import prune_torch_pruning

        tp_model = copy.deepcopy(dense)
        prune_torch_pruning(tp_model, x, None, args.tp_steps)
        models["Torch-Pruning macs=0.5"] = tp_model.eval()
        tp_version = getattr(torch_pruning, "__version__", "?")
    except ImportError:
        con.print("[dim]torch_pruning does not import: its figure is left out[/dim]")
    formats = [None] if runtime not in ("eager", "compile") else (
        ["contiguous"] if name.startswith("vit") else ["contiguous", "channels_last"])
    base = macs_of(dense, x)
    rows = []
    for fmt in formats:
        t = paired_latency(models, x, runtime, threads=threads, runs=args.runs, warmup=2,
                           memory_format=fmt if fmt == "channels_last" else None)
        for label, m in models.items():
            if label == "original":
                continue
            macs_speedup = base / macs_of(m, x)
            lat_speedup = t["original"].median_ms / t[label].median_ms
            rows.append({"model": name, "runtime": runtime, "threads": threads, "memory_format": fmt or "runtime's own",
                         "method": label, "macs_speedup": macs_speedup, "latency_speedup": lat_speedup,
                         "efficiency": lat_speedup / macs_speedup, "torch_pruning": tp_version if "Torch" in label else None})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--runtimes", nargs="+", default=["eager", "compile", "onnxruntime"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=15, help="paired rounds of the final timing")
    ap.add_argument("--macs-tries", type=int, default=4, help="MACs budgets tried to match the latency")
    ap.add_argument("--tp-steps", type=int, default=20, help="Torch-Pruning's iterative steps")
    ap.add_argument("--quick", action="store_true", help="160x160 inputs for the convnets (ViT stays 224), fewer runs")
    ap.add_argument("--no-efficiency", action="store_true", help="skip the latency-efficiency table")
    ap.add_argument("--efficiency-only", action="store_true",
                    help="only the latency-efficiency table (Budget(macs=0.5) and Torch-Pruning, paired)")
    ap.add_argument("--vit-size", type=int, default=224, help="ViT-B/16's image size (a multiple of 16)")
    args = ap.parse_args()
    if args.quick:
        args.runs = min(args.runs, 9)
    con = Console(width=190)
    if "compile" in args.runtimes:  # many shapes of one forward: past dynamo's recompile limit it would run eagerly
        from torchslim.prune.latency_budget import compile_room

        compile_room().__enter__()
    load = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    eff: list[dict[str, Any]] = []
    for name in args.models:
        size = args.vit_size if name.startswith("vit") else 224 if not args.quick else 160
        dense = build(name, args.vit_size)
        x = torch.randn(1, 3, size, size)
        pics = photos(size)
        with torch.no_grad():
            dense_out = dense(pics)
        for runtime in args.runtimes:
            con.print(f"[bold]{name} {size}x{size}, {runtime}, {args.threads} thread(s)[/bold]")
            if args.efficiency_only:
                if name in ("resnet50", "vit_b_16"):
                    half = copy.deepcopy(dense)
                    ts.prune_channels_(half, x, target=ts.Budget(macs=BUDGET))
                    eff += [dict(r, image_size=size) for r in efficiency_rows(name, dense, x, runtime, args.threads, half, args, con)]
                    write(rows, eff, args, load)
                continue
            got, first = budget_rows(name, dense, x, pics, dense_out, runtime, args.threads, args, con)
            rows += [dict(r, image_size=size) for r in got]
            if not args.no_efficiency and name in ("resnet50", "vit_b_16") and abs(first[0] - BUDGET) < 1e-9:
                eff += [dict(r, image_size=size) for r in efficiency_rows(name, dense, x, runtime, args.threads, first[2], args, con)]
            write(rows, eff, args, load)
    table(rows, eff, args, load, con)
    return 0


_ROW_KEY = ("model", "runtime", "threads", "variant")
_EFF_KEY = ("model", "runtime", "threads", "memory_format", "method")
_STARTED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _merged(old: list[dict[str, Any]], new: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """``old`` with the rows this run measured again replaced (same ``key`` fields), then the new ones."""
    fresh = {tuple(r.get(k) for k in key) for r in new}
    return [r for r in old if tuple(r.get(k) for k in key) not in fresh] + new


def write(rows: list[dict[str, Any]], eff: list[dict[str, Any]], args: argparse.Namespace, load: float) -> None:
    """Merge this run's rows into the results file: rows of other models / runtimes stay, each row
    says which run measured it (``run``: its start time; ``runs`` holds every run's arguments and load)."""
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    try:
        with open(RESULTS) as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        old = {}
    if "runs" not in old and old.get("rows"):  # a file from before merging: one run, described at the top
        old["runs"] = [{k: old.get(k) for k in ("args", "cpu", "load_at_start", "load_at_end", "torch")}]
    this = {"run": _STARTED, "args": vars(args), "cpu": cpu_name(), "load_at_start": load,
            "load_at_end": os.getloadavg()[0], "torch": torch.__version__, "python": platform.python_version()}
    runs = [r for r in old.get("runs", []) if r.get("run") != _STARTED] + [this]
    rows = [dict(r, run=_STARTED) for r in rows]
    eff = [dict(r, run=_STARTED) for r in eff]
    with atomic_path(RESULTS) as tmp, open(tmp, "w") as fh:
        json.dump({"budget": BUDGET, "rows": _merged(old.get("rows", []), rows, _ROW_KEY),
                   "efficiency": _merged(old.get("efficiency", []), eff, _EFF_KEY), "runs": runs},
                  fh, indent=1, default=str)


def table(rows: list[dict[str, Any]], eff: list[dict[str, Any]], args: argparse.Namespace, load: float,
          con: Console) -> None:
    t = Table(title=f"Budget(latency={BUDGET}): measured in the runtime vs MACs-driven at the same latency "
                    f"({cpu_name()}, {args.threads} thread(s), load {load:.1f} -> {os.getloadavg()[0]:.1f})")
    for c in ("model", "runtime", "variant", "format", "latency ratio (fresh)", "search ratio", "MACs ratio",
              "top-1 agree", "trials", "search s"):
        t.add_column(c)
    for r in rows:
        fresh = f"{r['latency_ratio']:.3f}" if "latency_ratio" in r else "refused"
        t.add_row(r["model"], r["runtime"], r["variant"], r["memory_format"], fresh, f"{r.get('search_ratio', 0):.3f}",
                  f"{r['macs_ratio']:.3f}" if "macs_ratio" in r else "-",
                  f"{r['top1_agreement']:.3f}" if "top1_agreement" in r else "-", str(r.get("trials", "-")),
                  f"{r['search_s']:.0f}")
    if rows:
        con.print(t)
    if eff:
        e = Table(title="Latency efficiency of MACs-budget pruning (latency speedup / MACs speedup, paired)")
        for c in ("model", "runtime", "format", "method", "MACs speedup", "latency speedup", "efficiency"):
            e.add_column(c)
        for r in eff:
            e.add_row(r["model"], r["runtime"], r["memory_format"], r["method"] + (f" {r['torch_pruning']}" if r["torch_pruning"] else ""),
                      f"{r['macs_speedup']:.2f}", f"{r['latency_speedup']:.2f}", f"{r['efficiency']:.3f}")
        con.print(e)
    con.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
