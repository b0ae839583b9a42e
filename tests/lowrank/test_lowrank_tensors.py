"""Layer 1: the tensor functions reproduce at full rank, improve with rank, refuse bad ranks."""

from __future__ import annotations

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.lowrank import (
    cp,
    cp_max_rank,
    cp_reconstruct,
    separable_factors,
    separable_reconstruct,
    spatial_reconstruct,
    spatial_svd,
    svd_factorize,
    svd_reconstruct,
    tucker2,
    tucker2_reconstruct,
)


def _kernel(o: int = 8, i: int = 6, kh: int = 3, kw: int = 3) -> torch.Tensor:
    return torch.randn(o, i, kh, kw, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# name -> (full rank of the test kernel/matrix, a ladder of ranks, reconstruct(rank) -> tensor, target)
def _cases() -> dict:
    k = _kernel()
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return {
        "svd": (12, [1, 2, 4, 8, 12], lambda r: svd_reconstruct(*svd_factorize(w, r)), w),
        "tucker": ((8, 6), [(1, 1), (2, 2), (4, 3), (6, 5), (8, 6)], lambda r: tucker2_reconstruct(*tucker2(k, r)), k),
        "cp": (54, [1, 4, 16, 32, 54], lambda r: cp_reconstruct(*cp(k, r)), k),
        "spatial": (18, [1, 3, 6, 12, 18], lambda r: spatial_reconstruct(*spatial_svd(k, r)), k),
        "separable": (8, [1, 2, 4, 6, 8], lambda r: separable_reconstruct(*separable_factors(k, r), 6), k),
    }


@pytest.mark.parametrize("name", ["svd", "tucker", "cp", "spatial", "separable"])
def test_full_rank_is_exact(name: str) -> None:
    full, _, rec, target = _cases()[name]
    assert (rec(full) - target).abs().max() < 1e-10


@pytest.mark.parametrize("name", ["svd", "tucker", "cp", "spatial", "separable"])
def test_error_decreases_monotonically_with_rank(name: str) -> None:
    _, ladder, rec, target = _cases()[name]
    errors = [_rel(rec(r), target) for r in ladder]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.3 and errors[-1] < 1e-8  # a random kernel is far from rank 1


def test_svd_is_the_eckart_young_optimum() -> None:
    w = torch.randn(10, 7, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    u, v = svd_factorize(w, 3)
    assert u.shape == (10, 3) and v.shape == (3, 7)
    assert abs(float((u @ v - w).norm()) - float(s[3:].norm())) < 1e-9


def test_shapes_and_dtype_follow_the_input() -> None:
    k = _kernel().float()
    core, uo, ui = tucker2(k, (4, 2))
    assert core.shape == (4, 2, 3, 3) and uo.shape == (8, 4) and ui.shape == (6, 2) and core.dtype == torch.float32
    v, h = spatial_svd(k, 5)
    assert v.shape == (5, 6, 3, 1) and h.shape == (8, 5, 1, 3)
    a, b, c, d = cp(k, 3)
    assert (a.shape, b.shape, c.shape, d.shape) == ((8, 3), (6, 3), (3, 3), (3, 3)) and a.dtype == torch.float32
    dw, pw = separable_factors(k, 2)
    assert dw.shape == (12, 1, 3, 3) and pw.shape == (8, 12, 1, 1)
    assert cp_max_rank((8, 6, 3, 3)) == 54


@pytest.mark.parametrize(
    "call",
    [
        lambda: svd_factorize(torch.randn(4, 5), 5),
        lambda: svd_factorize(torch.randn(4, 5), 0),
        lambda: svd_factorize(torch.randn(2, 4, 5), 1),
        lambda: tucker2(_kernel(), (9, 2)),
        lambda: tucker2(_kernel(), 3),
        lambda: cp(_kernel(), 55),
        lambda: spatial_svd(_kernel(), 19),
        lambda: separable_factors(_kernel(), 10),
        lambda: tucker2(torch.randn(3, 3), (1, 1)),
    ],
)
def test_bad_ranks_and_shapes_raise_config_error(call) -> None:
    with pytest.raises(ConfigError):
        call()


def test_tucker2_rank_above_the_other_modes_product() -> None:
    # a 1x1 kernel with r_out > r_in * kh * kw: the basis is completed, the result stays valid
    k = torch.randn(8, 16, 1, 1, dtype=torch.float64)
    core, u_out, u_in = tucker2(k, (8, 4))
    assert core.shape == (8, 4, 1, 1) and u_out.shape == (8, 8)
    assert torch.allclose(u_out.T @ u_out, torch.eye(8, dtype=torch.float64))
    best4 = torch.linalg.svdvals(k[:, :, 0, 0])[4:].norm()  # Tucker-2 (8, 4) of a matrix = rank-4 SVD
    assert abs(float((tucker2_reconstruct(core, u_out, u_in) - k).norm()) - float(best4)) < 1e-9
