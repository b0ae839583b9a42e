"""The real MNIST subset (5,000 digits) padded by 2 px to 32x32, for VGG-16 (which needs >= 32x32).

A ``file.py:factory`` data spec: ``ts.load_data("examples/vgg16_taylor/data.py:mnist32")`` or
``torchslim prune zoo:vgg16_bn --data examples/vgg16_taylor/data.py:mnist32 ...``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from torchslim.data import load_data


def _padded(dataset: Dataset, background: float) -> TensorDataset:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    x = F.pad(torch.stack(xs), (2, 2, 2, 2), value=background)
    return TensorDataset(x, torch.stack([torch.as_tensor(y) for y in ys]).long())


def mnist32() -> dict:
    """Train / val / test splits (3,700 / 300 / 1,000 digits, stratified), each ``(1, 32, 32)``."""
    bundle = load_data("mnist", seed=0, split=(0.74, 0.06, 0.2))
    mean, std = (bundle.mean or (0.0,))[0], (bundle.std or (1.0,))[0]
    background = (0.0 - mean) / std  # what a blank pixel became after normalisation
    return {split: _padded(bundle.split(split), background) for split in ("train", "val", "test")} | {"num_classes": 10}
