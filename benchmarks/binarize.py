"""Binarization: packed bytes vs fp32 bytes, and the XNOR-popcount kernel vs the fp32 GEMM it
replaces, measured side by side in one run.

1. Storage: bytes of the weights of single layers and of a whole model as ``ts.save`` writes
   them (real files), fp32 vs bit-packed (signs + one fp32 scale per output channel).
2. GEMM: ``A @ B.T`` for square shapes ``n x n`` (256 ... 4096), fp32 ``torch.mm`` against the
   XNOR-popcount GEMM on packed ±1 operands (C backend, and the pure-torch backend up to 2048),
   with and without packing the activations; the integer results are checked against the float
   product of the same ±1 matrices (exact).
3. Layers and models: a binary Conv2d and binarized zoo models in eval mode, float simulation
   vs the packed kernel (``set_backend_(model, "c")``) vs ``"fastest"`` (each layer keeps the
   route it measured faster at first use), outputs checked identical.

Latency is the median of repeated runs after a warm-up, with the thread count stated (default 1:
these CPUs are shared, and one thread is the steadiest comparison).

    python benchmarks/binarize.py [--threads 1] [--quick]

Prints tables and writes benchmarks/results/binarize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.binarize import (
    BinarizeConfig,
    BinaryConv2d,
    BinaryLinear,
    binarize_,
    binary_layers,
    set_backend_,
)
from torchslim.binarize.kernel import c_kernel_status, pack_rows, xnor_matmul
from torchslim.binarize.layers import sign
from torchslim.binarize.packing import pack_signs

RESULTS = os.path.join(os.path.dirname(__file__), "results", "binarize.json")


def median_ms(fn: Callable[[], Any], *, runs: int = 7, warmup: int = 1, budget_s: float = 20.0) -> float:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def storage_rows() -> list[dict[str, Any]]:
    rows = []
    layers = {
        "Linear 256x256": nn.Linear(256, 256),
        "Linear 1024x1024": nn.Linear(1024, 1024),
        "Linear 4096x4096": nn.Linear(4096, 4096),
        "Conv2d 64->64 3x3": nn.Conv2d(64, 64, 3),
        "Conv2d 256->256 3x3": nn.Conv2d(256, 256, 3),
    }
    for name, fp in layers.items():
        cls = BinaryConv2d if isinstance(fp, nn.Conv2d) else BinaryLinear
        layer = cls.from_float(fp, "xnor")
        sd = layer.state_dict()
        packed = sum(sd[k].numel() * sd[k].element_size() for k in ("weight::signs", "weight::scale"))
        fp32 = fp.weight.numel() * 4
        rows.append({"what": name, "fp32_bytes": fp32, "packed_bytes": packed, "ratio": fp32 / packed})
    for spec in ("zoo:lenet300", "zoo:lenet5", "zoo:conv2", "zoo:resnet20"):
        model = ts.create_model(spec)
        with tempfile.TemporaryDirectory() as tmp:
            ts.save(model, os.path.join(tmp, "f"))
            before = os.path.getsize(os.path.join(tmp, "f", "model.safetensors"))
            plan = binarize_(model, BinarizeConfig(method="xnor"))
            ts.save(model, os.path.join(tmp, "b"))
            after = os.path.getsize(os.path.join(tmp, "b", "model.safetensors"))
        rows.append({"what": f"{spec} file ({len(plan.layers)} binary layers, first/last fp32)", "fp32_bytes": before,
                     "packed_bytes": after, "ratio": before / after})
    return rows


def gemm_row(n: int, torch_max: int) -> dict[str, Any]:
    a, b = sign(torch.randn(n, n)), sign(torch.randn(n, n))
    pa, pb = pack_signs(a, 64), pack_signs(b, 64)
    exact = torch.equal(xnor_matmul(pa, pb, n, backend="c").float(), a @ b.T)
    budget = 30.0 if n >= 4096 else 10.0
    t_float = median_ms(lambda: a @ b.T, budget_s=budget)
    t_c = median_ms(lambda: xnor_matmul(pa, pb, n, backend="c"), budget_s=budget)
    t_c_pack = median_ms(lambda: xnor_matmul(pack_rows(a, "c"), pb, n, backend="c"), budget_s=budget)
    t_torch = median_ms(lambda: xnor_matmul(pa, pb, n, backend="torch"), runs=3, budget_s=budget) if n <= torch_max else None
    return {
        "n": n, "exact": exact, "fp32_ms": t_float, "xnor_c_ms": t_c, "xnor_c_with_packing_ms": t_c_pack,
        "xnor_torch_ms": t_torch, "speedup_c": t_float / t_c, "speedup_c_with_packing": t_float / t_c_pack,
        "speedup_torch": (t_float / t_torch) if t_torch else None,
    }


def model_row(name: str, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    model.eval()
    with torch.no_grad():
        set_backend_(model, "float")
        ref = model(x)
        t_float = median_ms(lambda: model(x))
        set_backend_(model, "c")
        out = model(x)
        t_c = median_ms(lambda: model(x))
        set_backend_(model, "fastest")
        out_fast = model(x)  # each layer times both routes here and keeps the faster
        t_fast = median_ms(lambda: model(x))
    layers = binary_layers(model)  # a lone binary layer lists itself
    routes = [r for layer in layers.values() for r in getattr(layer, "routes", {}).values()]
    return {
        "what": name, "identical": torch.equal(out, ref) and torch.equal(out_fast, ref), "float_ms": t_float, "packed_c_ms": t_c,
        "speedup": t_float / t_c, "fastest_ms": t_fast, "speedup_fastest": t_float / t_fast,
        "layers_packed": routes.count("packed"), "layers_measured": len(routes),
    }


def model_rows() -> list[dict[str, Any]]:
    cases: list[tuple[str, nn.Module, torch.Tensor]] = []
    conv = BinaryConv2d.from_float(nn.Conv2d(256, 256, 3, padding=1), "xnor")
    cases.append(("BinaryConv2d 256->256 3x3, 1x256x16x16", conv, torch.randn(1, 256, 16, 16)))
    lin = BinaryLinear.from_float(nn.Linear(4096, 4096), "xnor")
    cases.append(("BinaryLinear 4096->4096, batch 64", lin, torch.randn(64, 4096)))
    for spec, method, shape in (("zoo:lenet300", "bnn", (64, 1, 28, 28)), ("zoo:conv2", "xnor", (8, 3, 32, 32)),
                                ("zoo:resnet20", "bireal", (8, 3, 32, 32))):
        model = ts.create_model(spec)
        binarize_(model, BinarizeConfig(method=method))
        cases.append((f"{spec} {method}, batch {shape[0]}", model, torch.randn(*shape)))
    return [model_row(*case) for case in cases]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="sizes up to 1024 only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    con = Console()
    status = c_kernel_status()
    if not status["available"]:
        raise SystemExit(f"the C kernel is not available here: {status['error']}")
    sizes = [256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096]

    storage = storage_rows()
    t = Table(title="weights: fp32 vs bit-packed (xnor: 1 bit per weight + one fp32 alpha per output channel)")
    for col in ("what", "fp32 bytes", "packed bytes", "ratio"):
        t.add_column(col, justify="left" if col == "what" else "right")
    for r in storage:
        t.add_row(r["what"], f"{r['fp32_bytes']:,}", f"{r['packed_bytes']:,}", f"{r['ratio']:.1f}x")
    con.print(t)

    gemm = [gemm_row(n, torch_max=2048) for n in sizes]
    t = Table(title=f"A @ B.T, n x n, {args.threads} thread(s): fp32 torch.mm vs XNOR-popcount on packed ±1 (median ms)")
    for col in ("n", "exact", "fp32 mm", "xnor C", "xnor C + pack A", "xnor torch", "fp32 / C", "fp32 / (C + pack)", "fp32 / torch"):
        t.add_column(col, justify="right")
    for r in gemm:
        t.add_row(str(r["n"]), str(r["exact"]), f"{r['fp32_ms']:.2f}", f"{r['xnor_c_ms']:.2f}", f"{r['xnor_c_with_packing_ms']:.2f}",
                  "-" if r["xnor_torch_ms"] is None else f"{r['xnor_torch_ms']:.1f}", f"{r['speedup_c']:.1f}x",
                  f"{r['speedup_c_with_packing']:.1f}x", "-" if r["speedup_torch"] is None else f"{r['speedup_torch']:.2f}x")
    con.print(t)

    models = model_rows()
    t = Table(title=f"binary layers and models in eval mode, {args.threads} thread(s): float simulation vs packed C kernel "
                    "vs 'fastest' (per layer, the route measured faster at first use)")
    for col in ("what", "identical", "float ms", "packed ms", "speedup", "fastest ms", "speedup", "layers packed"):
        t.add_column(col, justify="left" if col == "what" else "right")
    for r in models:
        t.add_row(r["what"], str(r["identical"]), f"{r['float_ms']:.2f}", f"{r['packed_c_ms']:.2f}", f"{r['speedup']:.2f}x",
                  f"{r['fastest_ms']:.2f}", f"{r['speedup_fastest']:.2f}x", f"{r['layers_packed']}/{r['layers_measured']}")
    con.print(t)

    payload = {
        "threads": args.threads, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "c_kernel": status, "storage": storage, "gemm": gemm, "models": models,
    }
    with atomic_path(RESULTS) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    con.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
