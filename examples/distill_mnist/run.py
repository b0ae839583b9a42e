"""Knowledge distillation on real MNIST digits (and MNIST-1D): KD vs no KD, 3 seeds each.

Experiment 1 (recover a pruned model): a trained LeNet-300-100 is pruned to 97% (MNIST) / 90%
(MNIST-1D) sparsity with
global unstructured magnitude masks (applied inline below with plain torch), then fine-tuned
for a few epochs with the masks held fixed, once with plain cross-entropy and once with Hinton KD
from the unpruned network.

Experiment 2 (small student from scratch): an MLP 784-32-10 (or 40-32-10 on MNIST-1D) is trained
from scratch with cross-entropy, and with Hinton KD from a trained LeNet-5 (MNIST) / LeNet-300-100
(MNIST-1D) teacher.

Run: python examples/distill_mnist/run.py [--quick]   (writes results.json beside this file)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import torchslim as ts
from torchslim.distill import DistillConfig, distill
from torchslim.train import Callback
from torchslim.zoo.models import create_zoo_model

SEEDS = (0, 1, 2)
KD = dict(loss="kd", temperature=4.0, alpha=0.9)


def teacher_config(epochs: int, seed: int) -> ts.TrainConfig:
    """Teachers (and the dense model that is pruned): Adam 1e-3, cosine."""
    return ts.TrainConfig(epochs=epochs, lr=1e-3, optimizer="adam", batch_size=64, lr_schedule="cosine",
                          seed=seed, device="cpu")


def train_config(epochs: int, seed: int) -> ts.TrainConfig:
    """Every student run, with and without KD: SGD 0.01, momentum 0.9, cosine."""
    return ts.TrainConfig(epochs=epochs, lr=0.01, optimizer="sgd", momentum=0.9, batch_size=64,
                          lr_schedule="cosine", seed=seed, device="cpu")


class KeepMasks(Callback):
    """Hold pruned weights at zero: mask the gradients after backward and the weights after each step."""

    def __init__(self, masks: dict[nn.Parameter, torch.Tensor]) -> None:
        self.masks = masks

    def on_after_backward(self, state):
        for p, m in self.masks.items():
            if p.grad is not None:
                p.grad.mul_(m)

    def on_step_end(self, state):
        with torch.no_grad():
            for p, m in self.masks.items():
                p.mul_(m)


def magnitude_prune(model: nn.Module, sparsity: float) -> dict[nn.Parameter, torch.Tensor]:
    """Global unstructured magnitude pruning of every Linear/Conv weight (plain torch, in place)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    scores = torch.cat([w.detach().abs().flatten() for w in weights])
    threshold = scores.kthvalue(int(sparsity * scores.numel())).values
    masks = {}
    with torch.no_grad():
        for w in weights:
            masks[w] = (w.abs() > threshold).float()
            w.mul_(masks[w])
    return masks


def mlp(inputs: int, hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values), "runs": values}


def experiment(data_spec: str, *, teacher_kind: str, teacher_epochs: int, sparsity: float, finetune_epochs: int,
               scratch_epochs: int, hidden: int) -> dict:
    data = ts.load_data(data_spec)
    inputs = int(torch.tensor(data.input_shape).prod())
    out: dict = {"data": data_spec, "sizes": data.sizes()}

    # ---- experiment 1: pruned LeNet-300-100 fine-tuned with / without KD
    torch.manual_seed(0)
    dense = create_zoo_model("lenet300", data.input_shape, data.num_classes)
    dense_acc = ts.fit(dense, data, teacher_config(teacher_epochs, 0), progress=False).test_accuracy
    pruned0 = copy.deepcopy(dense)
    masks0 = magnitude_prune(pruned0, sparsity)
    pruned_acc = ts.evaluate(pruned0, data.loader("test", 256))["accuracy"]
    rows = {"ce": [], "kd": []}
    for seed in SEEDS:
        for mode in rows:
            student = copy.deepcopy(pruned0)
            params = dict(student.named_parameters())
            names = {p: n for n, p in pruned0.named_parameters()}
            masks = {params[names[p]]: m for p, m in masks0.items()}
            cfg = train_config(finetune_epochs, seed)
            if mode == "ce":
                acc = ts.fit(student, data, cfg, callbacks=[KeepMasks(masks)], progress=False).test_accuracy
            else:
                res = distill(student, dense, data, DistillConfig(**KD, train=cfg), callbacks=[KeepMasks(masks)],
                              progress=False)
                acc = res.train.test_accuracy
            zeros = sum(int((p == 0).sum()) for p in masks)
            assert zeros >= int(sparsity * sum(m.numel() for m in masks.values())) - 1  # masks held
            rows[mode].append(acc)
    out["pruned"] = {"dense_accuracy": dense_acc, "pruned_accuracy_before_finetune": pruned_acc,
                     "sparsity": sparsity, "finetune_epochs": finetune_epochs,
                     "ce": summary(rows["ce"]), "kd": summary(rows["kd"])}

    # ---- experiment 2: small MLP from scratch with / without KD from a trained teacher
    torch.manual_seed(0)
    teacher = create_zoo_model(teacher_kind, data.input_shape, data.num_classes)
    teacher_acc = ts.fit(teacher, data, teacher_config(teacher_epochs, 0), progress=False).test_accuracy
    rows = {"ce": [], "kd": []}
    for seed in SEEDS:
        student = mlp(inputs, hidden, 100 + seed)
        rows["ce"].append(ts.fit(student, data, train_config(scratch_epochs, seed), progress=False).test_accuracy)
        student = mlp(inputs, hidden, 100 + seed)
        res = distill(student, teacher, data, DistillConfig(**KD, train=train_config(scratch_epochs, seed)),
                      progress=False)
        rows["kd"].append(res.train.test_accuracy)
    out["scratch"] = {"teacher": teacher_kind, "teacher_accuracy": teacher_acc, "student": f"MLP {inputs}-{hidden}-10",
                      "epochs": scratch_epochs, "ce": summary(rows["ce"]), "kd": summary(rows["kd"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = 0.34 if args.quick else 1.0
    started = time.perf_counter()
    results = {
        "mnist": experiment("mnist", teacher_kind="lenet5", teacher_epochs=max(1, int(20 * scale)), sparsity=0.97,
                            finetune_epochs=max(1, int(5 * scale)), scratch_epochs=max(1, int(20 * scale)), hidden=32),
        "mnist1d": experiment("mnist1d", teacher_kind="lenet300", teacher_epochs=max(1, int(30 * scale)),
                              sparsity=0.9, finetune_epochs=max(1, int(5 * scale)),
                              scratch_epochs=max(1, int(30 * scale)), hidden=32),
    }
    results["config"] = {"kd": KD, "students": train_config(1, 0).to_dict(), "teachers": teacher_config(1, 0).to_dict(),
                         "seeds": list(SEEDS), "threads": 1, "seconds": round(time.perf_counter() - started, 1)}
    con = Console()
    table = Table(title="test accuracy, mean ± std over 3 seeds")
    for col in ("data", "experiment", "reference", "without KD", "with KD"):
        table.add_column(col)
    pct = lambda s: f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"  # noqa: E731
    for name in ("mnist", "mnist1d"):
        r = results[name]
        p, s = r["pruned"], r["scratch"]
        table.add_row(name, f"LeNet-300-100, {int(100 * p['sparsity'])}% magnitude-pruned, {p['finetune_epochs']} ep fine-tune",
                      f"dense {100 * p['dense_accuracy']:.2f}, pruned {100 * p['pruned_accuracy_before_finetune']:.2f}",
                      pct(p["ce"]), pct(p["kd"]))
        table.add_row(name, f"{s['student']} from scratch, {s['epochs']} ep", f"teacher {s['teacher']} {100 * s['teacher_accuracy']:.2f}",
                      pct(s["ce"]), pct(s["kd"]))
    con.print(table)
    con.print(f"total {results['config']['seconds']} s")
    path = Path(__file__).with_name("results.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    main()
