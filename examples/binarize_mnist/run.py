"""Binary networks on the real MNIST subset: BNN, XNOR-Net, Bi-Real and BWN versions of an MLP
(LeNet-300-100) and a CNN (LeNet-5), next to their float models.

For each zoo model: train the float model, then for every method deep-copy it, ``binarize_`` the
copy and train it (with Hinton KD from the float model when ``torchslim.distill`` is installed,
else plain cross-entropy). Reported per model: test accuracy, the size of the ``model.safetensors``
file ``ts.save`` writes (binary weights bit-packed), the share of MACs that are binary, and the
batch-64 latency with one thread of the float model, the binary model's float simulation and the
binary model on the packed XNOR-popcount kernel (outputs checked identical).

    python examples/binarize_mnist/run.py [--quick]

Prints a table and writes results.json beside this file.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import tempfile
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.binarize import BinarizeConfig, binarize_, set_backend_, summary
from torchslim.profile import measure_latency

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("bnn", "xnor", "bireal", "bwn")
MODELS = {  # name -> (spec, keep_first, float epochs, binary epochs)
    "MLP LeNet-300-100": ("zoo:lenet300", False, 15, 20),
    "CNN LeNet-5": ("zoo:lenet5", True, 10, 15),
}
HAS_DISTILL = importlib.util.find_spec("torchslim.distill") is not None


def file_bytes(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        ts.save(model, os.path.join(tmp, "m"))
        return os.path.getsize(os.path.join(tmp, "m", "model.safetensors"))


def latency_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.eval()
    return measure_latency(model, x, warmup=3, min_time_s=1.0).median


def train_binary(student: torch.nn.Module, teacher: torch.nn.Module, data: Any, epochs: int, seed: int) -> float:
    cfg = ts.TrainConfig(epochs=epochs, lr=1e-3, optimizer="adam", batch_size=64, seed=seed, device="cpu")
    if HAS_DISTILL:
        from torchslim.distill import DistillConfig, distill

        result = distill(student, teacher, data, DistillConfig(loss="kd", temperature=4.0, alpha=0.9, train=cfg), progress=False)
        return result.train.test_accuracy
    return ts.fit(student, data, cfg, progress=False).test_accuracy


def run_model(name: str, spec: str, keep_first: bool, float_epochs: int, bin_epochs: int, data: Any, seed: int) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    fp = ts.create_model(spec, data=data)
    cfg = ts.TrainConfig(epochs=float_epochs, lr=1e-3, optimizer="adam", batch_size=64, seed=seed, device="cpu")
    t0 = time.perf_counter()
    acc = ts.fit(fp, data, cfg, progress=False).test_accuracy
    x = next(iter(data.loader("test", batch_size=64, shuffle=False)))[0]
    rows = [{
        "model": name, "method": "float", "test_accuracy": acc, "size_bytes": file_bytes(fp), "binary_mac_share": 0.0,
        "binary_layers": [], "latency_float_ms": latency_ms(fp, x), "latency_packed_ms": None, "identical": None,
        "train_s": time.perf_counter() - t0,
    }]
    for method in METHODS:
        t0 = time.perf_counter()
        student = copy.deepcopy(fp)
        plan = binarize_(student, BinarizeConfig(method=method, keep_first=keep_first))
        acc = train_binary(student, fp, data, bin_epochs, seed)
        train_s = time.perf_counter() - t0
        student.eval()
        s = summary(student, x)
        with torch.no_grad():
            set_backend_(student, "float")
            ref = student(x)
            t_float = latency_ms(student, x)
            set_backend_(student, "auto")
            identical = torch.equal(student(x), ref)
            t_packed = latency_ms(student, x) if method != "bwn" else None  # BWN has real activations: no XNOR
        rows.append({
            "model": name, "method": method, "test_accuracy": acc, "size_bytes": s.size_bytes,
            "binary_mac_share": s.binary_mac_share, "binary_layers": plan.layers, "packed_weight_compression": s.compression,
            "latency_float_ms": t_float, "latency_packed_ms": t_packed, "identical": identical, "train_s": train_s,
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 epoch each (smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = ts.load_data("mnist", seed=args.seed)
    rows: list[dict[str, Any]] = []
    for name, (spec, keep_first, fe, be) in MODELS.items():
        rows += run_model(name, spec, keep_first, 1 if args.quick else fe, 1 if args.quick else be, data, args.seed)
    total = time.perf_counter() - start

    con = Console()
    t = Table(title=f"binary networks on MNIST (3,500 train / 1,000 test digits), KD from the float model: {HAS_DISTILL}")
    for col in ("model", "method", "test acc", "file bytes", "vs float", "binary MACs", "latency float", "latency packed"):
        t.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["method"] == "float")
        t.add_row(
            r["model"], r["method"], f"{100 * r['test_accuracy']:.2f}%", f"{r['size_bytes']:,}",
            f"{base['size_bytes'] / r['size_bytes']:.1f}x smaller" if r["method"] != "float" else "-",
            f"{100 * r['binary_mac_share']:.1f}%", f"{r['latency_float_ms']:.3f} ms",
            "-" if r["latency_packed_ms"] is None else f"{r['latency_packed_ms']:.3f} ms",
        )
    con.print(t)
    con.print(f"total {total:.0f} s, 1 thread; latency: batch of 64 test digits, median after warm-up")
    payload = {"quick": args.quick, "seed": args.seed, "kd": HAS_DISTILL, "threads": 1, "total_s": total, "rows": rows}
    with atomic_path(os.path.join(HERE, "results.json")) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
