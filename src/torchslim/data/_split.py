"""Deterministic, stratified train/val/test splits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from torchslim.errors import ConfigError

__all__ = ["check_split", "split_counts", "split_indices"]


def check_split(split: Sequence[float]) -> tuple[float, float, float]:
    """Validate split fractions and return them as a tuple of three floats.

    Raises:
        ConfigError: Not three numbers, a fraction that is not positive, or a sum other than 1.
    """
    allowed = "three positive fractions (train, val, test) that sum to 1, e.g. (0.7, 0.1, 0.2)"
    try:
        values = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        raise ConfigError(f"split must be {allowed}; got {split!r}") from None
    if len(values) != 3:
        raise ConfigError(f"split must be {allowed}; got {len(values)} values: {split!r}")
    if not all(math.isfinite(f) and f > 0 for f in values):
        raise ConfigError(f"split must be {allowed}; got a non-positive fraction in {split!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"split must be {allowed}; got fractions summing to {sum(values):g}: {split!r}")
    return values  # type: ignore[return-value]


def split_counts(n: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """Sizes of the parts of ``n`` samples: all but the first rounded (at least one each), the
    first part gets the rest.

    Raises:
        ConfigError: ``n`` is too small to give every part at least one sample.
    """
    rest = [max(1, round(n * f)) for f in fractions[1:]]
    first = n - sum(rest)
    if first < 1:
        raise ConfigError(
            f"cannot split {n} samples by the fractions {tuple(fractions)}: every split needs at least "
            "one sample; use more samples"
        )
    return (first, *rest)


def split_indices(
    n: int, fractions: Sequence[float], seed: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Split ``range(n)`` into parts (train, val, test) of the given fractions.

    The split is a pure function of its arguments. With ``labels`` it is stratified: each sample
    gets a key ``(rank within its class + 0.5) / class size``, where the rank comes from a seeded
    permutation, and samples are ordered by that key; consecutive runs of that order give every
    class the same share of each part (exactly, when the class sizes allow).

    Args:
        n: Number of samples.
        fractions: Fraction of the samples for each part (positive, summing to 1).
        seed: Seed of the permutation.
        labels: Optional int tensor of ``n`` class labels to stratify by.

    Returns:
        One int64 index tensor per part; they are disjoint and together cover ``range(n)``. They
        are in the seeded order, not sorted, so the first samples of a part mix the classes.
    """
    counts = split_counts(n, fractions)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).long()
        keys = torch.empty(n, dtype=torch.float64)
        permuted_labels = labels[perm]
        for cls in torch.unique(permuted_labels):
            members = perm[permuted_labels == cls]  # this class, in permuted order
            ranks = torch.arange(len(members), dtype=torch.float64)
            keys[members] = (ranks + 0.5) / len(members)
        # Stable sort of the permuted order: ties between classes are broken by the permutation.
        perm = perm[torch.sort(keys[perm], stable=True).indices]
    return tuple(torch.split(perm, list(counts)))
