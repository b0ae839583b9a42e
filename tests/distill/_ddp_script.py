"""Runs under `torchrun --nproc_per_node 2` (and in-process with distributed='off') for test_ddp.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 _ddp_script.py OUT_DIR
Writes OUT_DIR/{fit,distill,resumed}.pt (rank 0's final state dicts).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.data import DataBundle
from torchslim.distill import DistillConfig, distill
from torchslim.train import TrainConfig, fit

CONFIG = TrainConfig(epochs=2, lr=0.05, batch_size=16, lr_schedule="cosine", device="cpu", seed=3)


def make_data() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
    train, val, test = (TensorDataset(x[a:b], y[a:b]) for a, b in ((0, 64), (64, 80), (80, 96)))
    return DataBundle("ddp-test", "ddp-test", train, val, test, (12,), 3, True)


def make_model(seed: int, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def run(out: Path, distributed: str) -> dict[str, dict[str, torch.Tensor]]:
    data = make_data()
    states = {}
    model = make_model(1)
    fit(model, data, CONFIG, progress=False, distributed=distributed)
    states["fit"] = model.state_dict()

    teacher, student = make_model(2, hidden=32), make_model(4, hidden=8)
    cfg = DistillConfig(loss="hint", taps=["1"], teacher_taps=["1"], train=CONFIG)
    distill(student, teacher, data, cfg, progress=False, distributed=distributed)
    states["distill"] = student.state_dict()

    ckpt = out / f"ckpt-{distributed}"
    fit(make_model(1), data, TrainConfig.from_dict({**CONFIG.to_dict(), "epochs": 1}),
        checkpoint_dir=ckpt, progress=False, distributed=distributed)
    resumed = make_model(9)  # another init: everything comes from the checkpoint
    fit(resumed, data, CONFIG, checkpoint_dir=ckpt, resume=True, progress=False, distributed=distributed)
    states["resumed"] = resumed.state_dict()
    return states


if __name__ == "__main__":
    import os

    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    result = run(out_dir, "ddp")
    if int(os.environ.get("RANK", "0")) == 0:
        for name, state in result.items():
            torch.save(state, out_dir / f"{name}.pt")
    import torch.distributed as dist

    if dist.is_initialized():  # leave together, before interpreter shutdown (not only in atexit)
        dist.barrier()
        dist.destroy_process_group()
