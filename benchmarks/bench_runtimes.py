"""Latency per runtime (``torchslim.export.bench``) for ResNet-18, MobileNetV2 and MiniLM.

For each model, ``bench`` times PyTorch eager, ``torch.compile`` (inductor), TorchScript, ONNX
Runtime's CPU execution provider and its XNNPACK provider (a row that says why when this
onnxruntime build lacks it) on the same inputs with the same thread count, interleaving the
runtimes round by round. Batch 1; torchvision models use random weights at 3x224x224; MiniLM
is ``pretrained:minilm`` (sentence-transformers all-MiniLM-L6-v2) on its bundled example
sentence batch. Ratios are runtime latency / eager latency (< 1: faster than eager).

    python benchmarks/bench_runtimes.py [--threads 1] [--runs 15] [--warmup 2] [--models ...]

Prints a table and writes benchmarks/results/bench_runtimes.json (with the machine's CPU count
and load average before and after, since these numbers come from a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.export.bench import RUNTIMES, bench

MODELS = ("torchvision:resnet18", "torchvision:mobilenet_v2", "pretrained:minilm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_runtimes.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    console = Console(width=160)
    load_before = os.getloadavg()
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for name in args.models:
        model = ts.create_model(name).eval()
        t0 = time.perf_counter()
        result = bench(model, ts.example_inputs(model, batch_size=1), runtimes=args.runtimes, threads=args.threads,
                       runs=args.runs, warmup=args.warmup)
        console.print(result.table(title=f"{name}: inputs {result.inputs}, {result.threads} thread(s), median of "
                                         f"{result.runs} interleaved rounds after {result.warmup} warm-up"))
        results.append({"model": name, "params": sum(p.numel() for p in model.parameters()),
                        "seconds": time.perf_counter() - t0, **result.to_dict()})

    names = [r["runtime"] for r in results[0]["runtimes"]] if results else []
    table = Table(title=f"median ms (latency / eager), batch 1, {args.threads} thread(s), {args.runs} rounds")
    table.add_column("model")
    for n in names:
        table.add_column(n, justify="right")
    for r in results:
        cells = []
        for row in r["runtimes"]:
            if row["status"] == "ok":
                cells.append(f"{row['median_ms']:.2f} ({row['ratio_to_eager']:.2f})")
            else:
                cells.append(row["status"])
        table.add_row(r["model"], *cells)
    console.print(table)

    payload = {
        "benchmark": "bench_runtimes",
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                    "note": "shared machine: other jobs ran during the measurement"},
        "seconds": time.perf_counter() - started,
        "models": results,
    }
    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, default=lambda x: None))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
