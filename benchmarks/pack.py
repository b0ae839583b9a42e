"""Deep Compression on LeNet-300-100 with real MNIST digits: prune -> share -> code, stage by stage.

Han et al. (ICLR 2016), Table 1: LeNet-300-100 goes from 1,070 KB to 27 KB (40x) with no
accuracy loss: 92% of the weights pruned, 6-bit shared weights for the fc layers, Huffman coding.
This script runs the same chain with torchslim on the 5,000 real MNIST digits this machine has
(3,500 train / 500 val / 1,000 test):

1. dense: train LeNet-300-100;
2. prune: ``ts.sparsify_`` (magnitude, per layer: fc1 92%, fc2 91%, fc3 74% as the paper's
   Table 2), in a few steps with retraining under ``ts.MaskCallback`` (masks kept);
3. share: ``cluster_`` (k-means, linear init, 6 bits as the paper), then fine-tune the
   centroids with ``ts.fit`` (gradients summed per cluster);
4. code: ``ts.pack`` to a ``.tslim`` file with ANS and with Huffman coding; the file is
   unpacked again and evaluated.

Sizes per stage: *dense* is the fp32 tensors (and the ``ts.save`` file); *pruned* is the
``ts.save`` file of the finalized sparse model (fp32 non-zeros + bitmask/CSR, a real file);
*shared* is the paper's fixed-width format computed from the same streams (6-bit indices,
5-bit relative positions with fillers, fp32 codebooks and biases); *coded* is the real
``.tslim`` file. Accuracy is on the 1,000 test digits.

    python benchmarks/pack.py [--quick] [--bits 6] [--threads 1]

Prints the table and writes benchmarks/results/pack.json (pack_<B>bit.json for --bits B other than 6).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.pack import cluster_, clustered_layers, pack, unpack
from torchslim.pack.coding import gaps_encode
from torchslim.profile.api import serialized_bytes

RESULTS = os.path.join(os.path.dirname(__file__), "results", "pack.json")
PAPER_SPARSITY = {"fc1": 0.92, "fc2": 0.91, "fc3": 0.74}  # Han et al. 2016, Table 2 (weights kept: 8%, 9%, 26%)


def accuracy(model: torch.nn.Module, data: Any) -> float:
    return ts.evaluate(model, data.loader("test", batch_size=500))["accuracy"]


def fixed_width_bytes(model: torch.nn.Module, index_bits: int = 5) -> int:
    """The paper's format before Huffman coding: b-bit cluster indices, ``index_bits`` relative
    positions with filler entries, fp32 codebooks, everything else (biases) fp32."""
    total_bits = 0
    for _, sw in clustered_layers(model).values():
        idx = sw.indices.reshape(-1).numpy().astype(np.int64)
        nz = np.flatnonzero(idx != sw.k)
        positions = gaps_encode(nz, 2**index_bits).size if nz.size < idx.size else 0
        # the paper's filler is a zero weight with an index of its own: fillers cost index bits too
        fillers = positions - nz.size if positions else 0
        total_bits += (nz.size + fillers) * sw.bits + positions * index_bits + 32 * sw.k
    raw = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "parametrizations" not in n)
    return math.ceil(total_bits / 8) + raw


def run(args: argparse.Namespace, seed: int = 0, show: bool = True) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    con = Console(quiet=not show)
    t0 = time.perf_counter()
    data = ts.load_data("mnist", seed=0)
    torch.manual_seed(seed)
    model = ts.create_model("zoo:lenet300", data=data)
    e = 2 if args.quick else 1
    dense_epochs, retrain_epochs, tune_epochs = 30 // e, 8 // e, 6 // e

    con.print(f"1/4 dense: {dense_epochs} epochs")
    ts.fit(model, data, ts.TrainConfig(epochs=dense_epochs, lr=0.05, optimizer="sgd", weight_decay=1e-4, seed=seed),
           progress=False)
    acc_dense = accuracy(model, data)
    dense_params = sum(p.numel() for p in model.parameters())
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    dense_file = serialized_bytes(model)

    steps = (0.5, 0.75, 1.0)  # fraction of the final per-layer sparsity reached at each step
    con.print(f"2/4 prune to {PAPER_SPARSITY} in {len(steps)} steps, {retrain_epochs} retraining epochs each")
    acc_pruned_oneshot = None
    for frac in steps:
        ts.sparsify_(model, 0.0, overrides={k: v * frac for k, v in PAPER_SPARSITY.items()})
        if frac == 1.0:
            acc_pruned_oneshot = accuracy(model, data)
        ts.fit(model, data, ts.TrainConfig(epochs=retrain_epochs, lr=0.02, optimizer="sgd", weight_decay=1e-4, seed=seed + 1),
               callbacks=[ts.MaskCallback()], progress=False)
    acc_pruned = accuracy(model, data)
    report = ts.sparsity_report(model)
    with tempfile.TemporaryDirectory() as tmp:  # finalize a reloaded copy (sparse storage), measure its file
        ts.save(model, tmp)
        finalized = ts.load(tmp)
    ts.finalize_(finalized)
    pruned_file = serialized_bytes(finalized)

    con.print(f"3/4 share: {args.bits}-bit k-means codebooks, {tune_epochs} epochs of centroid fine-tuning")
    plan = cluster_(model, bits=args.bits, init=args.init)
    acc_shared = accuracy(model, data)
    ts.fit(model, data, ts.TrainConfig(epochs=tune_epochs, lr=1e-4, optimizer="adam", lr_schedule="constant", seed=seed + 2),
           progress=False)
    acc_tuned = accuracy(model, data)
    shared_fixed = fixed_width_bytes(model)

    con.print("4/4 code: pack with ANS and with Huffman, unpack, evaluate")
    files: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for coder in ("ans", "huffman"):
            path = os.path.join(tmp, f"lenet300.{coder}.tslim")
            res = pack(model, path, coder=coder)
            restored = unpack(path)
            same = all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values()))
            files[coder] = {**res.to_dict(), "path": None, "accuracy_unpacked": accuracy(restored, data),
                            "bit_exact": same}
    ans, huf = files["ans"], files["huffman"]

    rows = [
        ("dense fp32 tensors", dense_bytes, None, acc_dense),
        ("dense ts.save file", dense_file, None, acc_dense),
        ("pruned (ts.save, sparse fp32)", pruned_file, None, acc_pruned),
        (f"+ shared {args.bits}-bit (fixed width)", shared_fixed, None, acc_tuned),
        ("+ coded (.tslim file)", ans["size_bytes"], huf["size_bytes"], ans["accuracy_unpacked"]),
    ]
    table = Table(title=f"Deep Compression, LeNet-300-100 on 5,000 real MNIST digits ({args.threads} thread)")
    for col in ("stage", "bytes (ANS)", "ratio", "bytes (Huffman)", "ratio (Huffman)", "test accuracy"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, b, hb, acc in rows:
        table.add_row(name, f"{b:,}", f"{dense_bytes / b:.1f}x", f"{hb:,}" if hb else "", f"{dense_bytes / hb:.1f}x" if hb else "",
                      f"{100 * acc:.2f}%")
    con.print(table)
    layer_table = Table(title="per layer (ANS)")
    for col in ("layer", "weights", "kept", "bits", "index B", "position B", "bits/index", "entropy", "gap bits"):
        layer_table.add_column(col, justify="left" if col == "layer" else "right")
    for name, r in ans["layers"].items():
        layer_table.add_row(name, f"{r['numel']:,}", f"{100 * r['nonzero'] / r['numel']:.1f}%", str(r["bits"]),
                            f"{r['index_bytes']:,}", f"{r['position_bytes']:,}", f"{r['index_bits_per_symbol']:.3f}",
                            f"{r['index_entropy_bits']:.3f}", str(r["gap_bits"]))
    con.print(layer_table)
    con.print(f"file breakdown (ANS): {ans['breakdown']}; Huffman: {huf['breakdown']}")
    con.print(f"accuracy: dense {100 * acc_dense:.2f}%, pruned before retraining {100 * acc_pruned_oneshot:.2f}%, "
              f"pruned+retrained {100 * acc_pruned:.2f}%, shared {100 * acc_shared:.2f}%, fine-tuned {100 * acc_tuned:.2f}%, "
              f"unpacked {100 * ans['accuracy_unpacked']:.2f}%; total {time.perf_counter() - t0:.0f} s")
    return {
        "seed": seed, "model": "zoo:lenet300", "data": "mnist (3,500 train / 500 val / 1,000 test real digits)",
        "threads": args.threads, "quick": args.quick, "bits": args.bits, "init": args.init,
        "epochs": {"dense": dense_epochs, "retrain_per_step": retrain_epochs, "prune_steps": len(steps), "centroid_tune": tune_epochs},
        "params": dense_params, "sparsity": PAPER_SPARSITY, "sparsity_reached": report.overall,
        "bytes": {"dense_fp32": dense_bytes, "dense_file": dense_file, "pruned_file": pruned_file,
                  "shared_fixed_width": shared_fixed, "packed_ans": ans["size_bytes"], "packed_huffman": huf["size_bytes"]},
        "ratio": {"pruned": dense_bytes / pruned_file, "shared": dense_bytes / shared_fixed,
                  "packed_ans": dense_bytes / ans["size_bytes"], "packed_huffman": dense_bytes / huf["size_bytes"]},
        "accuracy": {"dense": acc_dense, "pruned_before_retrain": acc_pruned_oneshot, "pruned": acc_pruned,
                     "shared": acc_shared, "fine_tuned": acc_tuned, "unpacked_ans": ans["accuracy_unpacked"],
                     "unpacked_huffman": huf["accuracy_unpacked"]},
        "cluster": plan.to_dict(), "pack_ans": ans, "pack_huffman": huf,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="half the epochs")
    p.add_argument("--bits", type=int, default=6, help="shared-weight bits (the paper: 6 for LeNet-300-100)")
    p.add_argument("--init", default="linear", help="centroid initialisation (default linear, the paper's best)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3, help="repeat the whole chain for this many seeds (default 3)")
    args = p.parse_args()
    result = run(args)
    runs = [result] + [run(args, seed, show=False) for seed in range(1, args.seeds)]
    drops = [r["accuracy"]["dense"] - r["accuracy"]["unpacked_ans"] for r in runs]
    ratios = [r["ratio"]["packed_ans"] for r in runs]
    result["seeds"] = [{"seed": r["seed"], "accuracy": r["accuracy"], "bytes": r["bytes"], "ratio": r["ratio"]} for r in runs]
    result["summary"] = {"accuracy_drop_mean": sum(drops) / len(drops), "accuracy_drop_max": max(drops),
                         "ratio_ans_min": min(ratios), "ratio_ans_max": max(ratios)}
    print(f"over seeds 0..{args.seeds - 1}: accuracy drop dense -> packed "
          + ", ".join(f"{100 * d:+.2f}" for d in drops) + f" points (mean {100 * sum(drops) / len(drops):.2f}); "
          f"packed ratio {min(ratios):.1f}x .. {max(ratios):.1f}x")
    path = RESULTS if args.bits == 6 else RESULTS.replace(".json", f"_{args.bits}bit.json")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
