"""VGG-16 made fast and small by iterative Taylor filter pruning, on real MNIST digits at 32x32.

Reproduces the idea of Jacob Gildenblat's article "Pruning deep neural networks to make them fast
and small" (2017; Taylor criterion of Molchanov et al. 2017): rank the filters of a trained
VGG-16 globally by the first-order Taylor estimate of how much the loss changes without them,
remove the lowest-ranked ones, fine-tune, repeat. The article reports x3 faster and x4 smaller
for a small accuracy loss (cats vs dogs, ImageNet-pretrained VGG-16).

Here (no downloads, a 2-core shared CPU): ``zoo:vgg16_bn`` (the CIFAR-style VGG-16-BN, 14.7M
parameters) on the 5,000 real MNIST digits padded to 32x32 (``data.py:mnist32``). The dense model
is trained for a few short epochs (``max_steps_per_epoch`` keeps the run at ~10 minutes), then
each of ``--iterations`` iterations

1. accumulates gradients on a few labelled training batches and scores every channel
   (``importance="taylor"``) and ranks them across layers (``global_ranking=True``: scores
   normalised per layer, as in the article),
2. removes the lowest-ranked channels with ``ts.prune_channels_`` until the model holds its share
   of a geometric parameter schedule (``target=ts.Budget(params=...)``, reaching 1/4 of the dense
   parameters at the last iteration); the convs, BNs and the next layer's inputs really shrink,
3. fine-tunes one (short) epoch,

and the pruned model is fine-tuned ``--final-epochs`` more (short) epochs at the end.

Then the dense and pruned models are compared: parameters, MACs, saved size (``ts.save``,
safetensors), CPU latency at batch 1 and 32 (interleaved in one run, median), test accuracy; the
pruned model is reloaded with ``ts.load`` and checked to give the same outputs. As a control, a
copy of the dense model is trained for as many extra steps as the pruned one received (its test
accuracy says what the pruning itself cost, apart from the extra training).

    python examples/vgg16_taylor/run.py [--threads 2] [--steps-per-epoch 40] [--ft-steps 40] [--quick]

Writes results.json beside this file and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import Subset

import torchslim as ts
from torchslim._utils import atomic_path

HERE = Path(__file__).resolve().parent
DATA = f"{HERE / 'data.py'}:mnist32"
FT_LR = 3e-4  # Adam, every fine-tuning (and the control)


def train_config(epochs: int, steps: int | None, lr: float, seed: int, schedule: str = "cosine") -> ts.TrainConfig:
    return ts.TrainConfig(epochs=epochs, lr=lr, optimizer="adam", batch_size=32, lr_schedule=schedule,
                          max_steps_per_epoch=steps, seed=seed, device="cpu")


def for_fit(data: ts.DataBundle, measure: str) -> ts.DataBundle:
    """``data`` arranged so ``fit`` (which validates every epoch and tests once at the end) measures
    the ``measure`` split as its final "test" and validates on one batch only: each forward pass of
    VGG-16 costs seconds on this shared CPU, so no split is evaluated twice."""
    tiny = Subset(data.val, range(32))
    return dataclasses.replace(data, val=tiny, test=data.split(measure))


def taylor_batches(data: ts.DataBundle, n: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[: n * batch_size].tolist()
    xs, ys = zip(*(data.train[i] for i in idx))
    x, y = torch.stack(xs), torch.stack([torch.as_tensor(v) for v in ys])
    return list(zip(x.split(batch_size), y.split(batch_size)))


def accuracy(model: nn.Module, dataset) -> float:
    return float(ts.evaluate(model, dataset)["accuracy"])


def widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def interleaved_latency(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median ms per model; each round runs every model once (rotated order), so drift hits all alike."""
    names, times = list(models), {n: [] for n in models}
    with torch.no_grad():
        for n in names:
            for _ in range(warmup):
                models[n](x)
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                models[n](x)
                times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def saved_bytes(model: nn.Module, directory: Path) -> int:
    ts.save(model, directory)
    return sum(f.stat().st_size for f in directory.iterdir())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dense-epochs", type=int, default=3)
    ap.add_argument("--steps-per-epoch", type=int, default=40, help="dense training: max_steps_per_epoch (batch 32)")
    ap.add_argument("--ft-steps", type=int, default=40, help="fine-tuning epoch after each cut: max_steps_per_epoch")
    ap.add_argument("--iterations", type=int, default=4, help="prune + fine-tune iterations")
    ap.add_argument("--final-epochs", type=int, default=1, help="fine-tuning epochs after the last iteration")
    ap.add_argument("--params-goal", type=float, default=4.0, help="dense / pruned params after the last iteration")
    ap.add_argument("--rounds", type=int, default=50, help="latency rounds per batch size")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip training the dense model for as many extra steps as the pruned one got")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny training, 2 iterations")
    args = ap.parse_args(argv)
    if args.quick:
        args.dense_epochs, args.steps_per_epoch, args.ft_steps, args.iterations, args.final_epochs, args.rounds = (
            1, 2, 2, 2, 1, 3)
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    t_start = time.perf_counter()
    clock: dict[str, float] = {}

    data = ts.load_data(DATA)
    model = ts.create_model("zoo:vgg16_bn", data=data)
    t0 = time.perf_counter()
    fitted = ts.fit(model, for_fit(data, "test"), train_config(args.dense_epochs, args.steps_per_epoch, 1e-3, 0),
                    progress=False)
    clock["dense training"] = time.perf_counter() - t0
    model.eval()
    dense = copy.deepcopy(model)
    d_prof = ts.profile(dense, latency=False, size=False)
    d_acc = float(fitted.test_accuracy)
    console.print(f"dense: {d_prof.params / 1e6:.2f}M params, {d_prof.macs / 1e6:.1f}M MACs, test accuracy {d_acc:.4f}")

    iters = []
    t0 = time.perf_counter()
    for it in range(1, args.iterations + 1):
        ti = time.perf_counter()
        # geometric schedule: after iteration k the model keeps params_goal^(-k/N) of the dense params
        goal = d_prof.params * args.params_goal ** (-it / args.iterations)
        current = ts.profile(model, latency=False, size=False).params
        plan = ts.prune_channels_(model, target=ts.Budget(params=min(1.0, goal / current)), importance="taylor",
                                  global_ranking=True, data=taylor_batches(data, 4, 32, seed=it), min_channels=8)
        prof = ts.profile(model, latency=False, size=False)
        acc_cut = accuracy(model, data.val)
        tuned = ts.fit(model, for_fit(data, "val"), train_config(1, args.ft_steps, FT_LR, it), progress=False)
        model.eval()
        row = {"iteration": it, "removed_channels": plan.removed_channels, "params": prof.params, "macs": prof.macs,
               "macs_ratio": d_prof.macs / prof.macs, "params_ratio": d_prof.params / prof.params,
               "val_acc_after_cut": acc_cut, "val_acc_after_finetune": float(tuned.test_accuracy),
               "widths": widths(model), "seconds": time.perf_counter() - ti}
        iters.append(row)
        console.print(f"iteration {it}: -{plan.removed_channels} channels, MACs x{row['macs_ratio']:.2f}, "
                      f"params x{row['params_ratio']:.2f}, val acc {acc_cut:.3f} -> {row['val_acc_after_finetune']:.3f}")
    clock["prune + fine-tune iterations"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.final_epochs:
        ts.fit(model, for_fit(data, "val"), train_config(args.final_epochs, args.ft_steps, FT_LR, 99), progress=False)
        model.eval()
    clock["final fine-tuning"] = time.perf_counter() - t0
    # Control: the pruned model trained (iterations + final_epochs) x ft_steps steps more than the
    # dense one; the same extra training, given to the dense model, says what pruning itself cost.
    t0 = time.perf_counter()
    control_acc = None
    if args.control:
        extra = args.iterations + args.final_epochs
        control = ts.fit(copy.deepcopy(dense), for_fit(data, "test"),
                         train_config(extra, args.ft_steps, FT_LR, 7, schedule="constant"), progress=False)
        control_acc = float(control.test_accuracy)
    clock["dense control"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    p_prof = ts.profile(model, latency=False, size=False)
    p_acc = accuracy(model, data.test)
    with tempfile.TemporaryDirectory(prefix="vgg16-taylor-") as tmp:
        d_bytes, p_bytes = saved_bytes(dense, Path(tmp) / "dense"), saved_bytes(model, Path(tmp) / "pruned")
        reloaded = ts.load(Path(tmp) / "pruned").eval()
        x = ts.example_inputs(model)[0]
        with torch.no_grad():
            reload_diff = float((reloaded(x) - model(x)).abs().max())
    lat = {}
    for bs in (1, 32):
        x = torch.randn(bs, *data.input_shape)
        lat[bs] = interleaved_latency({"dense": dense, "pruned": model}, x, args.rounds)
    clock["measurement"] = time.perf_counter() - t0
    clock["total"] = time.perf_counter() - t_start

    summary = {
        "params": (d_prof.params, p_prof.params), "macs": (d_prof.macs, p_prof.macs),
        "saved_bytes": (d_bytes, p_bytes), "latency_ms_b1": (lat[1]["dense"], lat[1]["pruned"]),
        "latency_ms_b32": (lat[32]["dense"], lat[32]["pruned"]), "test_accuracy": (d_acc, p_acc),
    }
    t = Table(title=f"VGG-16-BN on MNIST 32x32: dense vs Taylor-pruned ({len(iters)} iterations; CPU, "
                    f"{torch.get_num_threads()} threads)")
    for col in ("", "dense", "pruned", "dense / pruned"):
        t.add_column(col, justify="left" if not col else "right")
    fmt = {"params": lambda v: f"{v / 1e6:.2f} M", "macs": lambda v: f"{v / 1e6:.1f} M",
           "saved_bytes": lambda v: f"{v / 2**20:.2f} MiB", "latency_ms_b1": lambda v: f"{v:.2f} ms",
           "latency_ms_b32": lambda v: f"{v:.1f} ms", "test_accuracy": lambda v: f"{100 * v:.2f} %"}
    for k, (a, b) in summary.items():
        ratio = f"{a / b:.2f}x" if k != "test_accuracy" else f"{100 * (b - a):+.2f} pts"
        t.add_row(k.replace("_", " "), fmt[k](a), fmt[k](b), ratio)
    console.print(t)
    t2 = Table(title="iterations")
    for col in ("it", "removed", "MACs x", "params x", "val acc after cut", "after 1 fine-tune epoch", "s"):
        t2.add_column(col, justify="right")
    for r in iters:
        t2.add_row(str(r["iteration"]), str(r["removed_channels"]), f"{r['macs_ratio']:.2f}", f"{r['params_ratio']:.2f}",
                   f"{r['val_acc_after_cut']:.3f}", f"{r['val_acc_after_finetune']:.3f}", f"{r['seconds']:.0f}")
    console.print(t2)
    if control_acc is not None:
        console.print(f"control: the dense model trained for the same extra steps reaches {100 * control_acc:.2f} % test "
                      f"accuracy (pruned: {100 * p_acc:.2f} %, {100 * (p_acc - control_acc):+.2f} pts)")
    console.print(f"conv widths: {widths(dense)} -> {widths(model)}")
    console.print(f"reloaded with ts.load: max |diff| = {reload_diff:.2e}; wall time: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in clock.items()))

    result = {"args": vars(args), "summary": summary, "iterations": iters, "dense_widths": widths(dense),
              "pruned_widths": widths(model),
              "test_accuracy_dense_same_extra_steps": control_acc, "reload_max_abs_diff": reload_diff, "seconds": clock,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    if not args.quick:
        with atomic_path(HERE / "results.json") as tmp_path, open(tmp_path, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
