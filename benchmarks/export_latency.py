"""Latency per runtime of exported models, side by side in one run.

For each model, the same weights are exported with ``ts.export`` (parity checked) and timed in:

* PyTorch eager (``model(x)`` under ``torch.inference_mode``),
* TorchScript (``torch.jit.load`` of the exported ``.pt``),
* ONNX Runtime (CPU execution provider, ``intra_op_num_threads`` = the thread count),
* the ``torch.export`` program (``torch.export.load(...).module()``),
* optionally (``--cpp``) the TorchScript file run from C++ by ``torchslim_runner`` (libtorch
  from the torch wheel; the runner times its own forward calls),

at batch 1 and 8 (the ONNX and pt2 files have a dynamic batch axis, so one file serves both).
Each number is the median of ``--runs`` timed forwards after ``--warmup`` untimed ones; every
runtime uses the same number of threads (``--threads``, stated in the table). Ratios are eager
latency divided by the runtime's (> 1: faster than eager).

Models: ``zoo:resnet20`` (3x32x32), torchvision ``resnet18`` and ``mobilenet_v3_small``
(3x224x224, random weights), and ``resnet18`` with half its channels removed by
``ts.prune_channels_(model, ratio=0.5)``.

    python benchmarks/export_latency.py [--threads 1] [--runs 15] [--cpp] [--quick]

Prints a table and writes benchmarks/results/export_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.export import export

RUNTIMES = ("eager", "torchscript", "onnxruntime", "torch.export")


def _model(name: str) -> torch.nn.Module:
    if name == "zoo:resnet20":
        return ts.create_model("zoo:resnet20")
    if name == "resnet18-pruned50":
        model = ts.create_model("torchvision:resnet18")
        ts.prune_channels_(model, ratio=0.5)
        return model
    return ts.create_model(name)


def _median_ms(fn: Callable[[], Any], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _runners(model: torch.nn.Module, files: dict[str, Path], threads: int) -> dict[str, Callable[[torch.Tensor], Any]]:
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(files["torchscript"]))
    scripted.eval()
    program = torch.export.load(str(files["pt2"])).module()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(files["onnx"]), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def no_grad(fn: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> Any:
            with torch.inference_mode():
                return fn(x)

        return run

    return {
        "eager": no_grad(model),
        "torchscript": no_grad(scripted),
        "onnxruntime": lambda x: session.run(None, {name: x.numpy()}),
        "torch.export": no_grad(program),
    }


def bench_model(name: str, args: argparse.Namespace, workdir: Path, console: Console) -> list[dict[str, Any]]:
    model = _model(name).eval()
    x1 = ts.example_inputs(model)[0]
    params = sum(p.numel() for p in model.parameters())
    files: dict[str, Path] = {}
    parity: dict[str, float] = {}
    for fmt, suffix in (("torchscript", "pt"), ("onnx", "onnx"), ("pt2", "pt2")):
        result = export(model, (x1,), workdir / f"{name.replace(':', '_')}.{suffix}", random_inputs=1)
        files[fmt], parity[fmt] = result.path, result.parity.max_abs
        console.print(f"  {name}: {result.summary()}")
    runners = _runners(model, files, args.threads)
    binary = None
    if args.cpp:
        from torchslim.export._cpp import build_runner

        binary = build_runner()
    rows = []
    for batch in args.batches:
        x = x1.expand(batch, *x1.shape[1:]).contiguous()
        row: dict[str, Any] = {"model": name, "params": params, "batch": batch, "input": list(x.shape),
                               "parity_max_abs": parity, "latency_ms": {}}
        for runtime in RUNTIMES:
            row["latency_ms"][runtime] = _median_ms(lambda r=runners[runtime], x=x: r(x), args.runs, args.warmup)
        if binary is not None:
            from torchslim.export._cpp import run_runner

            _, info = run_runner(binary, files["torchscript"], [x], runs=args.runs, threads=args.threads)
            row["latency_ms"]["libtorch C++"] = info["median_ms"]
            row["cpp_threads"] = info["threads"]
        eager = row["latency_ms"]["eager"]
        row["speedup_vs_eager"] = {k: eager / v for k, v in row["latency_ms"].items()}
        rows.append(row)
        console.print(f"  {name} batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row["latency_ms"].items()))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for every runtime (default 1: on a shared, oversubscribed machine "
                        "more threads make eager PyTorch stall at its barriers)")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+",
                        default=["zoo:resnet20", "torchvision:resnet18", "torchvision:mobilenet_v3_small",
                                 "resnet18-pruned50"])
    parser.add_argument("--cpp", action="store_true", help="also time the C++ libtorch runner (builds it once)")
    parser.add_argument("--quick", action="store_true", help="zoo:resnet20 only, 5 runs")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "export_latency.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.runs = ["zoo:resnet20"], 5
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.extend(bench_model(name, args, Path(tmp), console))

    runtimes = list(RUNTIMES) + (["libtorch C++"] if args.cpp else [])
    table = Table(title=f"latency per runtime (median of {args.runs} runs after {args.warmup} warm-up, "
                        f"{args.threads} threads; x = eager / runtime)")
    for col in ("model", "batch", *(f"{r} ms" for r in runtimes), *(f"{r} x" for r in runtimes[1:])):
        table.add_column(col, justify="right" if col != "model" else "left")
    for row in rows:
        lat, sp = row["latency_ms"], row["speedup_vs_eager"]
        table.add_row(row["model"], str(row["batch"]), *(f"{lat[r]:.2f}" for r in runtimes),
                      *(f"{sp[r]:.2f}" for r in runtimes[1:]))
    console.print(table)

    import onnxruntime

    payload = {
        "benchmark": "export_latency",
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    out = Path(args.out)
    with atomic_path(out) as tmp_path:
        tmp_path.write_text(json.dumps(payload, indent=1))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
