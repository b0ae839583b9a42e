"""VGG-16 Tucker-2 under a latency budget vs under a MACs target, paired in one run (issue #24).

For each runtime and thread count asked for:

* ``macs``: ``factorize_(method="tucker", target_macs=0.5)`` (each layer at half its MACs: what
  ``torchslim factorize torchvision:vgg16 --method tucker --target-macs 0.5`` does);
* ``latency``: ``factorize_(method="tucker", target=ts.Budget(latency=0.6, runtime=..., threads=...))``
  (ranks by measured per-layer gain, corrected by paired whole-model timings);

then the original and both factorized models are timed together, round by round with the order
rotated (``paired_latency``), in the same runtime and threads. torchvision VGG-16 has random
weights here (no download): latency does not depend on them; the fidelity proxies are top-1
agreement with the dense model and the relative output error, on scikit-image's bundled photos
at 224x224. The per-layer timings are cached in ``$TORCHSLIM_CACHE`` (set ``--fresh`` to measure
them again: the planning time is then the first-use cost).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/latency_factorize.py [--threads 2 1] [--runtimes eager onnxruntime]

Prints a table and writes benchmarks/results/latency_factorize.json (atomically; ``--out`` another).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.export.runtime_latency import paired_latency
from torchslim.lowrank import factorize_
from torchslim.profile.latency import cpu_name

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latency_factorize.json")
BUDGET = 0.6
MACS_TARGET = 0.5


def vgg16() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


def photos(size: int) -> torch.Tensor:
    """The bundled photos (8 scikit-image pictures), ImageNet-normalised."""
    return torch.stack([x for x, _ in ts.load_data(f"images:{size}").test])


@torch.no_grad()
def fidelity(dense_out: torch.Tensor, model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    out = model(x)
    agree = float((out.argmax(1) == dense_out.argmax(1)).float().mean())
    err = float(torch.linalg.vector_norm(out - dense_out) / torch.linalg.vector_norm(dense_out))
    return agree, err


def factorized(model: nn.Module, x: torch.Tensor, label: str, **kwargs: Any) -> tuple[nn.Module, Any, float] | None:
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    try:
        plan = factorize_(m, method="tucker", example_inputs=x, **kwargs)
    except ts.TorchslimError as exc:
        Console().print(f"[yellow]{label}: refused: {exc}[/yellow]")
        return None
    return m, plan, time.perf_counter() - t0


def one_setting(model: nn.Module, x: torch.Tensor, pics: torch.Tensor, dense_out: torch.Tensor, runtime: str,
                threads: int, runs: int, macs: tuple[nn.Module, Any, float] | None, con: Console) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    base = ts.profile(model, x, latency=False, size=False)
    variants: dict[str, tuple[nn.Module, Any, float]] = {"macs": macs} if macs is not None else {}
    lat = factorized(model, x, f"{runtime} {threads}t latency",
                     target=ts.Budget(latency=BUDGET, runtime=runtime, threads=threads))
    if lat is not None:
        variants["latency"] = lat
        con.print(f"{runtime} {threads}t latency: planned in {lat[2]:.0f} s, {len(lat[1].layers)} layers factorized, "
                  f"{len(lat[1].skipped)} left whole, planner measured {lat[1].latency['measured_ratio']:.3f}")
    timings = paired_latency({"original": model, **{k: v[0] for k, v in variants.items()}}, x, runtime,
                             threads=threads, runs=runs, warmup=2)
    t_orig = timings["original"].median_ms
    rows = [{"runtime": runtime, "threads": threads, "variant": "original", "median_ms": t_orig, "latency_ratio": 1.0,
             "speedup": 1.0, "macs_ratio": 1.0, "top1_agreement": 1.0, "rel_output_error": 0.0}]
    for label, (m, plan, secs) in variants.items():
        after = ts.profile(m, x, latency=False, size=False)
        agree, err = fidelity(dense_out, m, pics)
        ms = timings[label].median_ms
        row = {"runtime": runtime, "threads": threads, "variant": label, "median_ms": ms, "latency_ratio": ms / t_orig,
               "speedup": t_orig / ms, "macs_ratio": after.macs / base.macs, "top1_agreement": agree,
               "rel_output_error": err, "plan_s": round(secs, 1), "layers": len(plan.layers),
               "left_whole": [s.name for s in plan.skipped],
               "mean_kernel_rel_error": sum(x.rel_error for x in plan.layers) / max(len(plan.layers), 1),
               "ranks": {x.name: x.ranks for x in plan.layers}}
        if plan.latency is not None:
            row["planner_measured_ratio"] = plan.latency["measured_ratio"]
            row["planner_rounds"] = plan.latency["rounds"]
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--runtimes", nargs="+", default=["eager"])
    ap.add_argument("--runs", type=int, default=11, help="paired rounds of the final three-way timing")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--fresh", action="store_true", help="measure the per-layer timings again (empty cache)")
    ap.add_argument("--out", default=RESULTS, help=f"the JSON to write (default {os.path.relpath(RESULTS)})")
    args = ap.parse_args()
    con = Console(width=170)
    if args.fresh:
        os.environ["TORCHSLIM_CACHE"] = tempfile.mkdtemp(prefix="torchslim-bench-cache-")
    model = vgg16()
    x = torch.randn(1, 3, args.size, args.size)
    pics = photos(args.size)
    with torch.no_grad():
        dense_out = model(pics)
    load = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    torch.set_num_threads(max(args.threads))
    macs = factorized(model, x, "macs", target_macs=MACS_TARGET)  # the same for every runtime: planned once
    for runtime in args.runtimes:
        for threads in args.threads:
            rows += one_setting(model, x, pics, dense_out, runtime, threads, args.runs, macs, con)

    t = Table(title=f"VGG-16 Tucker-2 at {args.size}x{args.size}, batch 1: latency budget {BUDGET} vs MACs target "
                    f"{MACS_TARGET} (paired, one run per setting; {cpu_name()}, load {load:.1f})")
    for col in ("runtime", "threads", "variant", "median ms", "latency ratio", "speedup", "MACs ratio",
                "top-1 agree", "rel. err", "kernel err", "layers", "plan s"):
        t.add_column(col, justify="left" if col in ("runtime", "variant") else "right")
    for r in rows:
        t.add_row(r["runtime"], str(r["threads"]), r["variant"], f"{r['median_ms']:.1f}", f"{r['latency_ratio']:.3f}",
                  f"{r['speedup']:.2f}x", f"{r['macs_ratio']:.3f}", f"{r['top1_agreement']:.2f}",
                  f"{r['rel_output_error']:.3f}", f"{r.get('mean_kernel_rel_error', 0.0):.3f}",
                  str(r.get("layers", "-")), str(r.get("plan_s", "-")))
    con.print(t)
    result = {"cpu": cpu_name(), "machine": platform.machine(), "torch": torch.__version__, "load_before": load,
              "load_after": os.getloadavg()[0], "photos": int(pics.shape[0]), "budget": BUDGET,
              "macs_target": MACS_TARGET, "weights": "random (torchvision vgg16, seed 0)", "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_path(args.out) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    con.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
