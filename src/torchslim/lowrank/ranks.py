"""Rank selection: explained energy, VBMF, and per-layer or whole-model cost targets.

* **energy** ``e``: the smallest rank whose leading singular values hold a fraction ``e`` of
  the squared Frobenius norm (per mode for Tucker-2).
* **VBMF**: empirical variational Bayesian matrix factorization, solved analytically
  (Nakajima, Sugiyama, Babacan & Tomioka 2013, "Global analytic solution of fully-observed
  variational Bayesian matrix factorization", JMLR 14). The noise variance is estimated by
  minimising the closed-form free energy over one scalar; components whose singular value
  exceeds the EVB threshold are kept. Kim et al. 2016 pick Tucker-2 ranks this way, from the
  two channel-mode unfoldings of each kernel.
* **targets**: the largest ranks whose MACs (or parameters) stay within a fraction of the
  layer's own (``scope="layer"``), or one energy level for every layer chosen so the whole
  model lands within a fraction of its MACs/parameters (``scope="model"``).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.randn(40, 4, generator=g) @ torch.randn(4, 60, generator=g)
    >>> vbmf_rank(y + 0.1 * torch.randn(40, 60, generator=g))
    4
    >>> energy_rank(torch.tensor([9.0, 0.9, 0.1]), 0.9)
    1
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torchslim._registry import register_method
from torchslim.errors import ConfigError
from torchslim.lowrank._base import energy_rank as _energy_rank

__all__ = ["energy_rank", "VBMFResult", "vbmf", "vbmf_rank", "largest_within"]

energy_rank = register_method(
    "lowrank.rank", "energy", description="smallest rank keeping a fraction of the squared singular values"
)(_energy_rank)


@dataclass(frozen=True)
class VBMFResult:
    """What :func:`vbmf` found.

    Attributes:
        rank: Number of components kept (may be 0 for pure noise).
        sigma2: Noise variance (estimated, or the one given).
        threshold: Singular values strictly above it are kept.
        singular_values: All singular values of the matrix, descending.
        estimates: The VB posterior-mean singular values of the kept components (shrunk).
    """

    rank: int
    sigma2: float
    threshold: float
    singular_values: torch.Tensor
    estimates: torch.Tensor


def _phi(z: float) -> float:
    return math.log1p(z) / z - 0.5


def _tau_bar(alpha: float) -> float:
    """Zero of ``phi(tau) + phi(tau / alpha)`` (about ``2.5129 * sqrt(alpha)``), by bisection."""
    lo, hi = 1e-12, 1e8
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if _phi(mid) + _phi(mid / alpha) > 0:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    b = x - (1 + alpha)
    return 0.5 * (b + torch.sqrt((b * b - 4 * alpha).clamp_min(0)))


def _free_energy(sigma2: float, s2: torch.Tensor, m: int, alpha: float, x_bar: float) -> float:
    """Twice the EVB free energy per ``M`` (up to constants), all other parameters at optimum."""
    x = s2 / (m * sigma2)
    value = float(x.sum()) + s2.numel() * math.log(sigma2)
    big = x[x > x_bar]
    if big.numel():
        tau = _tau(big, alpha)
        value += float((torch.log1p(tau) + alpha * torch.log1p(tau / alpha) - tau).sum())
    return value


def _minimise(f: Callable[[float], float], lo: float, hi: float, grid: int = 400) -> float:
    """Global-ish minimum of a 1-D function on ``[lo, hi]``: log grid, then golden section."""
    if not hi > lo:
        return hi
    pts = [lo * (hi / lo) ** (k / (grid - 1)) for k in range(grid)]
    vals = [f(p) for p in pts]
    k = min(range(grid), key=vals.__getitem__)
    a, b = math.log(pts[max(k - 1, 0)]), math.log(pts[min(k + 1, grid - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(math.exp(d))
    best = math.exp((a + b) / 2)
    return best if f(best) <= vals[k] else pts[k]


def vbmf(matrix: torch.Tensor, sigma2: float | None = None) -> VBMFResult:
    """Empirical VBMF of a matrix by its global analytic solution (Nakajima et al. 2013).

    Args:
        matrix: Any 2-D tensor (computed in float64 on its device).
        sigma2: The noise variance if known; estimated from the matrix when ``None``.

    Returns:
        A :class:`VBMFResult` with the number of components VBMF keeps.

    Raises:
        ConfigError: ``matrix`` is not 2-D or ``sigma2`` is not positive.
    """
    if matrix.dim() != 2 or matrix.numel() == 0:
        raise ConfigError(f"vbmf needs a non-empty 2-D matrix; got shape {tuple(matrix.shape)}")
    if sigma2 is not None and not (isinstance(sigma2, (int, float)) and sigma2 > 0):
        raise ConfigError(f"vbmf sigma2 must be a positive number or None; got {sigma2!r}")
    y = matrix.detach().double()
    if y.shape[0] > y.shape[1]:
        y = y.t()
    n_l, n_m = y.shape  # L <= M
    alpha = n_l / n_m
    s = torch.linalg.svdvals(y)
    s2 = s**2
    tau_bar = _tau_bar(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    if sigma2 is None:
        upper = float(s2.sum()) / (n_l * n_m)
        if upper <= 0:
            return VBMFResult(0, 0.0, 0.0, s, s[:0])
        h_bar = min(math.ceil(n_l / (1 + alpha)) - 1, n_l - 1)  # the rank can be at most this
        lower = max(float(s2[h_bar]) / (n_m * x_bar), float(s2[h_bar:].mean()) / n_m)
        lower = min(max(lower, upper * 1e-12), upper)
        sigma2 = _minimise(lambda v: _free_energy(v, s2, n_m, alpha, x_bar), lower, upper)
    threshold = math.sqrt(n_m * sigma2 * x_bar)
    keep = s > threshold
    rank = int(keep.sum())
    g = s[:rank]
    t = 1 - (n_l + n_m) * sigma2 / g**2
    est = 0.5 * g * (t + torch.sqrt((t * t - 4 * n_l * n_m * sigma2**2 / g**4).clamp_min(0)))
    return VBMFResult(rank, float(sigma2), threshold, s, est)


@register_method("lowrank.rank", "vbmf", description="rank kept by analytic empirical VBMF (Nakajima 2013; Kim 2016)")
def vbmf_rank(matrix: torch.Tensor) -> int:
    """Number of components empirical VBMF keeps in ``matrix`` (see :func:`vbmf`)."""
    return vbmf(matrix).rank


def largest_within(cost: Callable[[int], int], size: int, budget: float) -> int:
    """Largest ``k`` in ``[1, size]`` with ``cost(k) <= budget`` for a non-decreasing ``cost``.

    Returns 1 when even ``cost(1)`` is over the budget (the cheapest factorization).
    """
    lo, hi = 1, size
    if cost(1) > budget:
        return 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


register_method("lowrank.rank", "target", description="largest ranks within a MACs/params fraction (layer or model)")(
    largest_within
)
