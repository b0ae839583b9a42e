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
