"""Fixtures the recipe tests share: MNIST and a LeNet-5 trained briefly on it, saved once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchslim as ts


@pytest.fixture(scope="module")
def data():
    return ts.load_data("mnist", seed=0)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A LeNet-5 after 25 steps of SGD on MNIST, written by ``ts.save``."""
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet5", data=data)
    ts.fit(model, data, ts.TrainConfig(epochs=1, lr=0.05, max_steps_per_epoch=25, seed=0), progress=False)
    path = tmp_path_factory.mktemp("trained") / "lenet5"
    ts.save(model.cpu(), path)
    return path


SMALL_TRAIN = {"epochs": 1, "max_steps_per_epoch": 3, "batch_size": 32}


def _shrink(name_or_dict, export_runs: int = 3) -> dict:
    """A built-in recipe at test size: one short epoch wherever something trains."""
    from torchslim.recipe import load_recipe

    r = load_recipe(name_or_dict).to_dict()
    r["finetune"] = {**r["finetune"], **SMALL_TRAIN}
    for stage in r["stages"]:
        (kind, cfg), = stage.items()
        if kind == "finetune":
            cfg.update(SMALL_TRAIN)
        if kind == "distill":
            cfg["train"] = dict(SMALL_TRAIN)
        if kind == "lottery":
            cfg.update(rounds=1, epochs=1, eval_every=1000, batch_size=128)
        if kind == "export":
            cfg.update(batch_sizes=[1], runs=export_runs)
        if kind == "quantize":
            cfg["calibration_batches"] = 2
    return r


@pytest.fixture
def shrink():
    """``shrink(name_or_dict, export_runs=3)``: a built-in recipe at test size."""
    return _shrink
