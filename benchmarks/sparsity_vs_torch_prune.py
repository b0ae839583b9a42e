"""torchslim global magnitude pruning vs ``torch.nn.utils.prune.global_unstructured``, side by side.

On the same trained LeNet-300-100 (real MNIST subset), at several sparsities: are the masks
identical, is the test accuracy the same, how long does each take to prune (median of repeats on
fresh copies), and how big is the saved file (torchslim finalized + compressed vs dense). A
second table measures PyTorch's CSR matmul (``CSRLinear``) against the dense ``nn.Linear`` on
CPU, per sparsity and batch size, to show honestly where the sparse kernel wins and where it loses.

    python benchmarks/sparsity_vs_torch_prune.py [--threads 1] [--epochs 5]

Prints tables and writes benchmarks/results/sparsity_vs_torch_prune.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.utils.prune as tprune
from rich.console import Console
from rich.table import Table
from torch import nn

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.prune import finalize_, get_mask, sparsify_
from torchslim.prune._sparse_kernels import CSRLinear

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _latency_ms(module: nn.Module, x: torch.Tensor, runs: int = 50) -> float:
    with torch.no_grad():
        for _ in range(5):
            module(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def prune_comparison(model: nn.Module, data, repeats: int) -> list[dict]:
    rows = []
    test = data.loader("test", 500)
    for s in SPARSITIES:
        ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
        sparsify_(ours, s, scope="global")
        tprune.global_unstructured([(theirs.fc1, "weight"), (theirs.fc2, "weight"), (theirs.fc3, "weight")],
                                   pruning_method=tprune.L1Unstructured, amount=s)
        identical = all(torch.equal(get_mask(getattr(ours, n)), getattr(theirs, n).weight_mask.bool()) for n in ("fc1", "fc2", "fc3"))
        acc_ours, acc_theirs = ts.evaluate(ours, test)["accuracy"], ts.evaluate(theirs, test)["accuracy"]

        def run_ours(s=s):
            sparsify_(copy.deepcopy(model), s, scope="global")

        def run_theirs(s=s):
            m = copy.deepcopy(model)
            tprune.global_unstructured([(m.fc1, "weight"), (m.fc2, "weight"), (m.fc3, "weight")],
                                       pruning_method=tprune.L1Unstructured, amount=s)

        copy_s = _time(lambda: copy.deepcopy(model), repeats)
        t_ours, t_theirs = _time(run_ours, repeats) - copy_s, _time(run_theirs, repeats) - copy_s
        finalize_(ours)
        with tempfile.TemporaryDirectory() as tmp:
            ts.save(ours, os.path.join(tmp, "sparse"))
            sparse_bytes = os.path.getsize(os.path.join(tmp, "sparse", "model.safetensors"))
            for n in ("fc1", "fc2", "fc3"):
                tprune.remove(getattr(theirs, n), "weight")
            torch.save(theirs.state_dict(), os.path.join(tmp, "torch.pt"))
            torch_bytes = os.path.getsize(os.path.join(tmp, "torch.pt"))
        rows.append({
            "sparsity": s, "identical_masks": identical, "accuracy_torchslim": acc_ours, "accuracy_torch": acc_theirs,
            "prune_ms_torchslim": 1000 * t_ours, "prune_ms_torch": 1000 * t_theirs,
            "file_bytes_torchslim": sparse_bytes, "file_bytes_torch_state_dict": torch_bytes,
        })
    return rows


def csr_comparison(shapes: list[tuple[int, int]], batches: list[int]) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        dense = nn.Linear(in_f, out_f).eval()
        for s in SPARSITIES:
            layer = copy.deepcopy(dense)
            sparsify_(layer, s)
            finalize_(layer)
            fast = CSRLinear.from_linear(layer)
            for b in batches:
                x = torch.randn(b, in_f)
                with torch.no_grad():
                    err = float((fast(x) - layer(x)).abs().max())
                d, c = _latency_ms(layer, x), _latency_ms(fast, x)
                rows.append({"shape": f"{out_f}x{in_f}", "sparsity": s, "batch": b, "dense_ms": d, "csr_ms": c,
                             "speedup": d / c, "max_abs_err": err})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sparsity_vs_torch_prune.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    con = Console()
    data = ts.load_data("mnist")
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet300", data=data)
    dense_acc = ts.fit(model, data, ts.TrainConfig(epochs=args.epochs, lr=1.2e-3, optimizer="adam", batch_size=60,
                                                   device="cpu"), progress=False).test_accuracy
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        ts.save(model, tmp + "/dense")
        dense_bytes = os.path.getsize(tmp + "/dense/model.safetensors")
    prune_rows = prune_comparison(model, data, args.repeats)
    t = Table(title=f"LeNet-300-100 (trained, test acc {100 * dense_acc:.2f}%): torchslim sparsify_(scope='global') "
                    f"vs torch global_unstructured; dense file {dense_bytes:,} B; {args.threads} thread(s)")
    for col in ("sparsity", "same masks", "acc torchslim", "acc torch", "prune ms torchslim", "prune ms torch",
                "file torchslim", "x smaller"):
        t.add_column(col, justify="right")
    for r in prune_rows:
        t.add_row(f"{r['sparsity']:.2f}", str(r["identical_masks"]), f"{100 * r['accuracy_torchslim']:.2f}%",
                  f"{100 * r['accuracy_torch']:.2f}%", f"{r['prune_ms_torchslim']:.2f}", f"{r['prune_ms_torch']:.2f}",
                  f"{r['file_bytes_torchslim']:,}", f"{dense_bytes / r['file_bytes_torchslim']:.1f}")
    con.print(t)
    csr_rows = csr_comparison([(300, 784), (1024, 4096)], [1, 64])
    t = Table(title=f"CSR matmul (torch.sparse.mm) vs dense nn.Linear on CPU, {args.threads} thread(s), median ms")
    for col in ("layer", "sparsity", "batch", "dense ms", "CSR ms", "speed-up"):
        t.add_column(col, justify="right")
    for r in csr_rows:
        t.add_row(r["shape"], f"{r['sparsity']:.2f}", str(r["batch"]), f"{r['dense_ms']:.4f}", f"{r['csr_ms']:.4f}",
                  f"{r['speedup']:.2f}x")
    con.print(t)
    payload = {"threads": args.threads, "torch": torch.__version__, "dense_accuracy": dense_acc,
               "dense_file_bytes": dense_bytes, "prune": prune_rows, "csr": csr_rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    con.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
