"""VBMF (Nakajima et al. 2013) recovers the rank of low-rank-plus-noise matrices; energy ranks."""

from __future__ import annotations

import pytest
import torch

from torchslim import list_methods
from torchslim.errors import ConfigError
from torchslim.lowrank import energy_rank, vbmf, vbmf_rank


def _low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    return signal + noise * torch.randn(rows, cols, generator=g)


@pytest.mark.parametrize(
    "rows,cols,rank,noise",
    [(40, 60, 4, 0.1), (50, 80, 5, 0.5), (64, 64, 10, 1.0), (200, 30, 3, 0.3), (100, 150, 12, 0.8)],
)
def test_vbmf_recovers_the_true_rank_and_noise(rows: int, cols: int, rank: int, noise: float) -> None:
    res = vbmf(_low_rank_plus_noise(rows, cols, rank, noise, seed=rank))
    assert res.rank == rank
    assert abs(res.sigma2 - noise**2) / noise**2 < 0.15  # estimated noise variance
    assert res.singular_values[rank - 1] > res.threshold > res.singular_values[rank]
    assert torch.all(res.estimates < res.singular_values[:rank])  # VB shrinks what it keeps


def test_vbmf_keeps_nothing_of_pure_noise_and_of_zero() -> None:
    assert vbmf_rank(torch.randn(30, 50, generator=torch.Generator().manual_seed(3))) == 0
    assert vbmf(torch.zeros(5, 7)).rank == 0


def test_vbmf_with_known_noise_and_bad_input() -> None:
    y = _low_rank_plus_noise(40, 60, 4, 0.1, seed=0)
    assert vbmf(y, sigma2=0.01).rank == 4
    with pytest.raises(ConfigError):
        vbmf(torch.randn(3, 4, 5))
    with pytest.raises(ConfigError):
        vbmf(y, sigma2=-1.0)


def test_energy_rank() -> None:
    e = torch.tensor([50.0, 30.0, 15.0, 5.0])
    assert [energy_rank(e, x) for x in (0.01, 0.5, 0.8, 0.95, 1.0)] == [1, 1, 2, 3, 4]


def test_rank_selectors_and_methods_are_listed() -> None:
    names = list_methods("lowrank")
    for n in ("lowrank.rank.energy", "lowrank.rank.vbmf", "lowrank.rank.target", "lowrank.method.svd",
              "lowrank.method.tucker", "lowrank.method.cp", "lowrank.method.spatial", "lowrank.method.separable"):
        assert n in names
