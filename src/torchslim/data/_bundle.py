"""The :class:`DataBundle`: three splits of one data set plus what a model needs to know about them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from torchslim.errors import ConfigError

__all__ = ["DataBundle", "SPLITS"]

SPLITS = ("train", "val", "test")


@dataclass
class DataBundle:
    """Train, validation and test splits of one data set, loaded from a data spec.

    Every sample is a pair ``(x, y)``: ``x`` a float32 tensor of shape :attr:`input_shape`,
    ``y`` an int64 class index (``-1`` for unlabeled data).

    Attributes:
        spec: The data spec the bundle was loaded from (``"mnist"``, ``"synthetic:3x32x32"``...).
        name: Short name of the data set (``"mnist"``, ``"synthetic"``, the factory's name...).
        train: Training split.
        val: Validation split.
        test: Test split.
        input_shape: Shape of one input sample, without the batch dimension.
        num_classes: Number of classes, or ``None`` for unlabeled data.
        labeled: Whether ``y`` holds real class labels.
        mean: Per-channel mean the inputs were normalised with (informational), or ``None``.
        std: Per-channel standard deviation the inputs were normalised with, or ``None``.

    Example:
        >>> from torchslim.data import load_data
        >>> bundle = load_data("synthetic:3x8x8:n=20")
        >>> x, y = next(iter(bundle.loader("train", batch_size=4)))
        >>> tuple(x.shape), y.dtype
        ((4, 3, 8, 8), torch.int64)
    """

    spec: str
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int | None
    labeled: bool
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def split(self, split: str) -> Dataset:
        """Return the split named ``split`` (``"train"``, ``"val"`` or ``"test"``).

        Raises:
            ConfigError: ``split`` is not one of the three names.
        """
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        return getattr(self, split)

    def loader(
        self, split: str, batch_size: int = 64, shuffle: bool | None = None, seed: int = 0
    ) -> DataLoader:
        """Return a :class:`~torch.utils.data.DataLoader` over one split.

        Loading runs in the calling process (``num_workers=0``): the data sets are small and in
        memory, so worker processes would only add start-up time.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            batch_size: Samples per batch (the last batch may be smaller).
            shuffle: Whether to shuffle; defaults to ``True`` for ``"train"`` and ``False`` otherwise.
            seed: Seed of the generator that orders a shuffled split, so the order is the same
                every time for the same seed.

        Raises:
            ConfigError: Unknown split or a batch size that is not a positive integer.
        """
        dataset = self.split(split)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}")
        if shuffle is None:
            shuffle = split == "train"
        generator = None
        if shuffle:
            generator = torch.Generator()
            generator.manual_seed(int(seed))
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=bool(shuffle), generator=generator, num_workers=0
        )

    def example_batch(self, batch_size: int = 1) -> torch.Tensor:
        """Stack the inputs of the first ``batch_size`` test samples into one batch.

        Raises:
            ConfigError: ``batch_size`` is not between 1 and the size of the test split.
        """
        n = len(self.test)  # type: ignore[arg-type]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
            raise ConfigError(
                f"batch_size must be an integer from 1 to {n} (the size of the test split of "
                f"{self.spec!r}); got {batch_size!r}"
            )
        tensors = getattr(self.test, "tensors", None)
        if tensors is not None:
            return tensors[0][:batch_size].clone()
        return torch.stack([torch.as_tensor(self.test[i][0]) for i in range(batch_size)])

    def sizes(self) -> dict[str, int]:
        """Number of samples in each split, e.g. ``{"train": 3500, "val": 500, "test": 1000}``."""
        return {name: len(getattr(self, name)) for name in SPLITS}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes().items())
        return (
            f"DataBundle(spec={self.spec!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, {sizes})"
        )
