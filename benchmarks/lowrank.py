"""Low-rank factorization: MACs ratio vs measured CPU latency ratio, and accuracy before/after
fine-tuning, side by side in one run.

* ``zoo:conv4`` (a VGG-style stack of 3x3 convs) trained on the real MNIST subset (28x28),
  then factorized by every method and fine-tuned for one epoch.
* torchvision ResNet-18 trained on the MNIST subset padded to 3x32x32 (a small data factory
  below), factorized and fine-tuned the same way.
* torchvision ResNet-18 and VGG-16 at 1x3x224x224 with random weights: MACs and latency only
  (VGG-16's 120M-parameter classifier is too heavy to train on these CPUs).

Latency is the median of repeated batch-1 forwards with 2 threads, dense and factorized measured
in the same process, alternating twice (the lower median of each is kept; VGG-16: 3 runs per median). MACs come from
``ts.profile``. Accuracy is on the test split (1,000 digits).

    python benchmarks/lowrank.py [--quick]

Prints a table and writes benchmarks/results/lowrank.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import Dataset

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.data import DataBundle
from torchslim.lowrank import FactorizeConfig, factorize_
from torchslim.profile import measure_latency

TARGET = 0.3  # keep at most this fraction of each layer's MACs
CONFIGS = {
    "tucker (VBMF ranks)": FactorizeConfig(method="tucker", rank="vbmf"),
    f"tucker (MACs {TARGET})": FactorizeConfig(method="tucker", target_macs=TARGET),
    f"cp (MACs {TARGET})": FactorizeConfig(method="cp", target_macs=TARGET, max_iter=25),
    f"spatial (MACs {TARGET})": FactorizeConfig(method="spatial", target_macs=TARGET),
    f"svd (MACs {TARGET})": FactorizeConfig(method="svd", target_macs=TARGET),
    "separable (m=1)": FactorizeConfig(method="separable", rank=1),
}


class _Pad3(Dataset):
    """MNIST digits padded to 32x32 and repeated to 3 channels (what ResNet-18 takes)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        x, y = self.base[i]
        return nn.functional.pad(x, (2, 2, 2, 2)).expand(3, 32, 32).contiguous(), y


def mnist32() -> DataBundle:
    b = ts.load_data("mnist")
    return DataBundle(
        spec="mnist(3x32x32)", name="mnist32", train=_Pad3(b.train), val=_Pad3(b.val), test=_Pad3(b.test),
        input_shape=(3, 32, 32), num_classes=10, labeled=True,
    )


def latency_pair(dense: nn.Module, small: nn.Module, x: torch.Tensor, runs: int | None) -> tuple[float, float]:
    dense.eval()
    small.eval()
    d, s = [], []
    for _ in range(2):
        d.append(measure_latency(dense, x, warmup=1, runs=runs, min_time_s=0.5).median)
        s.append(measure_latency(small, x, warmup=1, runs=runs, min_time_s=0.5).median)
    return min(d), min(s)


def run_model(label: str, model: nn.Module, x: torch.Tensor, configs: dict[str, FactorizeConfig], data: DataBundle | None,
              ft: ts.TrainConfig | None, runs: int | None, con: Console) -> list[dict[str, Any]]:
    rows = []
    base = ts.profile(model, x, latency=False, size=False)
    acc_dense = ts.evaluate(model, data.loader("test", 256))["accuracy"] if data is not None else None
    for name, cfg in configs.items():
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        try:
            plan = factorize_(m, cfg, x)
        except ts.TorchslimError as exc:
            con.print(f"[yellow]{label} / {name}: {exc}[/yellow]")
            continue
        t_fact = time.perf_counter() - t0
        after = ts.profile(m, x, latency=False, size=False)
        lat_d, lat_f = latency_pair(model, m, x, runs)
        row: dict[str, Any] = {
            "model": label, "config": name, "factorize_s": round(t_fact, 2),
            "layers": len(plan.layers), "skipped": len(plan.skipped),
            "macs_before": base.macs, "macs_after": after.macs, "macs_ratio": base.macs / after.macs,
            "params_before": base.params, "params_after": after.params,
            "latency_dense_ms": lat_d, "latency_factorized_ms": lat_f, "latency_ratio": lat_d / lat_f,
            "accuracy_dense": acc_dense,
        }
        if data is not None and ft is not None:
            row["accuracy_factorized"] = ts.evaluate(m, data.loader("test", 256))["accuracy"]
            ts.fit(m, data, ft, progress=False)
            m.to("cpu").eval()
            row["accuracy_finetuned"] = ts.evaluate(m, data.loader("test", 256))["accuracy"]
        con.print(f"{label} / {name}: MACs x{row['macs_ratio']:.2f}, latency x{row['latency_ratio']:.2f}"
                  + (f", acc {row['accuracy_factorized']:.3f} -> {row['accuracy_finetuned']:.3f}" if "accuracy_finetuned" in row else ""))
        rows.append(row)
    return rows


def vgg16_mnist(args: argparse.Namespace) -> int:
    """torchvision VGG-16 (BN) on MNIST padded to 3x32x32: trained from scratch for ``--epochs``
    epochs of the 3,500-digit training split (SGD, cosine schedule), then Tucker-2 / spatial SVD
    at 0.3 of each layer's MACs and a one-epoch fine-tune of each factorized copy."""
    torch.set_num_threads(args.threads)
    con = Console()
    train = ts.TrainConfig(epochs=args.epochs, lr=1e-2, optimizer="sgd", device="cpu", max_steps_per_epoch=args.steps)
    ft = ts.TrainConfig(epochs=args.ft_epochs, lr=5e-3, optimizer="sgd", device="cpu", max_steps_per_epoch=args.steps)
    torch.manual_seed(0)
    m32 = mnist32()
    vgg = ts.create_model("torchvision:vgg16_bn", num_classes=10, input_shape=(3, 32, 32))
    t0 = time.perf_counter()
    ts.fit(vgg, m32, train, progress=False)
    vgg.to("cpu").eval()
    cfgs = {k: v for k, v in CONFIGS.items() if k.startswith(("tucker (MACs", "spatial"))}
    rows = run_model("torchvision:vgg16_bn (MNIST 3x32x32)", vgg, torch.randn(1, 3, 32, 32), cfgs, m32, ft, 5, con)
    payload = {"benchmark": "lowrank_vgg16_mnist", "threads": args.threads, "train": train.to_dict(),
               "finetune": ft.to_dict(), "rows": rows, "seconds": time.perf_counter() - t0}
    out = os.path.join(os.path.dirname(args.out), "lowrank_vgg16_mnist.json")
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    con.print(f"wrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lowrank.json"))
    ap.add_argument("--vgg16-mnist", action="store_true",
                    help="only: torchvision VGG-16 trained briefly on MNIST 3x32x32, Tucker-2 and spatial SVD at "
                         "MACs 0.3, fine-tuned briefly (writes lowrank_vgg16_mnist.json)")
    ap.add_argument("--epochs", type=int, default=3, help="--vgg16-mnist: training epochs")
    ap.add_argument("--ft-epochs", type=int, default=1, help="--vgg16-mnist: fine-tuning epochs per factorized copy")
    ap.add_argument("--steps", type=int, default=None, help="--vgg16-mnist: cap on steps per epoch (smoke runs)")
    args = ap.parse_args()
    if args.vgg16_mnist:
        return vgg16_mnist(args)
    torch.set_num_threads(args.threads)
    con = Console()
    steps = 10 if args.quick else None
    train = ts.TrainConfig(epochs=1 if args.quick else 2, lr=1e-3, optimizer="adam", device="cpu", max_steps_per_epoch=steps)
    ft = ts.TrainConfig(epochs=1, lr=5e-4, optimizer="adam", device="cpu", max_steps_per_epoch=steps)
    rows: list[dict[str, Any]] = []

    # 1. a VGG-style zoo model trained on the real MNIST subset
    torch.manual_seed(0)
    mnist = ts.load_data("mnist")
    conv4 = ts.create_model("zoo:conv4", data=mnist)
    ts.fit(conv4, mnist, train, progress=False)
    conv4.to("cpu").eval()
    rows += run_model("zoo:conv4 (MNIST 28x28)", conv4, torch.randn(1, 1, 28, 28), CONFIGS, mnist, ft, None, con)

    # 2. torchvision ResNet-18 trained on MNIST padded to 3x32x32
    torch.manual_seed(0)
    m32 = mnist32()
    r18 = ts.create_model("torchvision:resnet18", num_classes=10)
    ts.fit(r18, m32, train, progress=False)
    r18.to("cpu").eval()
    keep = {k: v for k, v in CONFIGS.items() if not k.startswith("cp")}  # CP-ALS on 512x512 kernels: see below
    rows += run_model("torchvision:resnet18 (MNIST 3x32x32)", r18, torch.randn(1, 3, 32, 32), keep, m32, ft, None, con)

    # 3. ImageNet-size inputs, random weights: MACs and latency only
    x224 = torch.randn(1, 3, 224, 224)
    fast = {k: v for k, v in CONFIGS.items() if "VBMF" not in k and not k.startswith("cp")}
    for name in ("resnet18", "vgg16"):
        torch.manual_seed(0)
        tv = ts.create_model(f"torchvision:{name}")
        cfgs = dict(fast)
        if name == "resnet18":
            cfgs[f"cp (MACs {TARGET}, 10 ALS it.)"] = FactorizeConfig(method="cp", target_macs=TARGET, max_iter=10)
        rows += run_model(f"torchvision:{name} (224, random)", tv, x224, cfgs, None, None, 3 if name == "vgg16" else None, con)

    table = Table(title=f"Low-rank factorization ({args.threads} threads, batch 1, CPU)")
    for col in ("model", "config", "MACs ratio", "latency ratio", "params", "acc dense", "acc factorized", "acc fine-tuned"):
        table.add_column(col, justify="left" if col in ("model", "config") else "right")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for r in rows:
        table.add_row(
            r["model"], r["config"], f"{r['macs_ratio']:.2f}x", f"{r['latency_ratio']:.2f}x",
            f"{r['params_after'] / r['params_before']:.2f}", pct(r.get("accuracy_dense")),
            pct(r.get("accuracy_factorized")), pct(r.get("accuracy_finetuned")),
        )
    con.print(table)
    payload = {
        "benchmark": "lowrank", "threads": args.threads, "quick": args.quick, "torch": torch.__version__,
        "train": train.to_dict(), "finetune": ft.to_dict(), "rows": rows,
    }
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    con.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
