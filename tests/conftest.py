"""Shared test settings: small thread counts and deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TORCHSLIM_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "torchslim"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
