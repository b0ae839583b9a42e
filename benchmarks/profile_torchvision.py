"""Check ts.profile's MACs and parameter counts against torchvision's published figures.

For every torchvision classification model, build it (random weights; built on the ``meta``
device by default, so even ViT-H/14 takes a moment: only shapes are computed), profile it at its
weights' crop size, and compare with ``weights.meta["_ops"]`` (GMACs, 3 decimals, which
torchvision labels GFLOPS) and ``weights.meta["num_params"]``. Also reports what
``torch.utils.flop_counter.FlopCounterMode`` counts on the same models (FLOPs / 2), to show where
other counters differ.

    python benchmarks/profile_torchvision.py [--device meta|cpu] [--models resnet50,vit_b_16]

Prints a table and writes benchmarks/results/profile_torchvision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torchvision
from rich.console import Console
from rich.table import Table

from torchslim.graph.inputs import Inputs
from torchslim.profile import profile


def flop_counter_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    with torch.no_grad(), mode:
        model(x)
    return mode.get_total_flops() / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="meta", choices=["meta", "cpu"])
    ap.add_argument("--models", default="", help="comma-separated subset (default: every classification model)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "profile_torchvision.json"))
    args = ap.parse_args()

    models = torchvision.models
    names = args.models.split(",") if args.models else models.list_models(module=models)
    rows = []
    for name in names:
        weights = models.get_model_weights(name).DEFAULT
        crop = weights.transforms().crop_size
        crop = list(crop) if len(crop) == 2 else [crop[0], crop[0]]
        # the published parameter counts include Inception-v3's auxiliary head (unused in eval)
        kwargs = {"init_weights": False, "aux_logits": name == "inception_v3"} if name in ("inception_v3", "googlenet") else {}
        if name.startswith("vit_"):  # as get_model(weights=...) does: the weights fix the image size
            kwargs["image_size"] = crop[0]
        t0 = time.perf_counter()
        try:
            with torch.device(args.device):
                model = models.get_model(name, weights=None, **kwargs).eval()
        except (NotImplementedError, RuntimeError):  # a constructor that reads tensor values
            model = models.get_model(name, weights=None, **kwargs).eval().to(args.device)
        x = torch.randn(1, 3, *crop, device=args.device)
        p = profile(model, Inputs((x,)), latency=False, size=False)
        fc = flop_counter_macs(model, x)
        published_macs = float(weights.meta["_ops"]) * 1e9
        rows.append(
            {
                "model": name,
                "input": [1, 3, *crop],
                "params": p.params,
                "published_params": weights.meta["num_params"],
                "gmacs": p.macs / 1e9,
                "published_gmacs": weights.meta["_ops"],
                "macs_rel_err": abs(p.macs - published_macs) / published_macs,
                "macs_within_rounding": abs(p.macs / 1e9 - weights.meta["_ops"]) <= 0.0005 + 1e-9,
                "flop_counter_gmacs": fc / 1e9,
                "unsupported_ops": p.unsupported_ops,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"{name}: {p.macs / 1e9:.3f} vs {weights.meta['_ops']}", file=sys.stderr)

    table = Table(title=f"torchslim profile vs torchvision meta ({len(rows)} models, device={args.device})")
    for col in ("model", "params", "published", "GMACs", "published", "rel. err", "FlopCounter GMACs", "unsupported"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(
            r["model"],
            f"{r['params']:,}",
            "=" if r["params"] == r["published_params"] else f"{r['published_params']:,}",
            f"{r['gmacs']:.3f}",
            f"{r['published_gmacs']:.3f}",
            f"{100 * r['macs_rel_err']:.2f}%",
            f"{r['flop_counter_gmacs']:.3f}",
            ",".join(r["unsupported_ops"]) or "-",
        )
    Console(width=160).print(table)
    n_params = sum(r["params"] == r["published_params"] for r in rows)
    n_macs = sum(r["macs_within_rounding"] for r in rows)
    summary = {
        "models": len(rows),
        "params_equal": n_params,
        "macs_within_rounding": n_macs,
        "max_macs_rel_err": max(r["macs_rel_err"] for r in rows),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": args.device,
    }
    print(json.dumps(summary))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=2)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
