"""CP (CANDECOMP/PARAFAC) of a conv kernel (Lebedev et al. 2015, "Speeding-up convolutional
neural networks using fine-tuned CP-decomposition").

``K (O x I x kh x kw) ~= sum_r a_r (x) b_r (x) c_r (x) d_r``. The conv becomes four: a 1x1 conv
``I -> R`` (rows ``b_r``), a depthwise ``kh x 1`` conv (``c_r``), a depthwise ``1 x kw`` conv
(``d_r``), and a 1x1 conv ``R -> O`` (columns ``a_r``, original bias). The factors come from
TensorLy's ALS (``parafac``, SVD initialisation, float64). The largest meaningful rank is the
product of the three smallest kernel dimensions: at that rank the decomposition is built
exactly (one term per fibre of the largest mode), so "full rank" reproduces the kernel.

Example:
    >>> import torch
    >>> k = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    >>> f = cp(k, cp_max_rank(k.shape))                 # 27 terms: exact
    >>> torch.allclose(cp_reconstruct(*f), k)
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from torchslim._optional import require
from torchslim._registry import register_method
from torchslim.errors import ConfigError
from torchslim.lowrank._base import (
    Factorization,
    Geometry,
    assign,
    bias_params,
    copy_bias,
    new_conv,
    rel_error,
    sequential,
    split_padding,
)

__all__ = ["cp", "cp_reconstruct", "cp_max_rank", "CPFactorization"]


def cp_max_rank(shape: Sequence[int]) -> int:
    """Product of all dimensions but the largest: a rank at which an exact CP always exists."""
    dims = list(shape)
    return math.prod(dims) // max(dims)


def _exact(k: torch.Tensor) -> list[torch.Tensor]:
    """Exact CP with one rank-1 term per fibre of the largest mode."""
    big = max(range(4), key=lambda m: k.shape[m])
    others = [m for m in range(4) if m != big]
    d1, d2, d3 = (k.shape[m] for m in others)
    fibres = k.permute(big, *others).reshape(k.shape[big], -1)
    eye = lambda n: torch.eye(n, dtype=k.dtype, device=k.device)  # noqa: E731
    f1 = eye(d1).repeat_interleave(d2 * d3, dim=1)
    f2 = eye(d2).repeat_interleave(d3, dim=1).repeat(1, d1)
    f3 = eye(d3).repeat(1, d1 * d2)
    factors: list[torch.Tensor] = [torch.empty(0)] * 4
    factors[big] = fibres
    for m, f in zip(others, (f1, f2, f3)):
        factors[m] = f
    return factors


def _balance(weights: torch.Tensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Spread each term's scale evenly over the four factors (better-conditioned fp32 layers)."""
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    scale = weights.abs() * math.prod(norms)
    share = scale.clamp_min(0).pow(0.25)
    out = []
    for j, (f, n) in enumerate(zip(factors, norms)):
        g = f / n.clamp_min(1e-300) * share
        if j == 0:
            g = g * torch.sign(weights).where(weights != 0, torch.ones_like(weights))
        out.append(g)
    return out


def cp(
    kernel: torch.Tensor, rank: int, *, max_iter: int = 100, tol: float = 1e-8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` CP factors ``(a, b, c, d)`` of a 4-D kernel.

    Args:
        kernel: ``(O, I, kh, kw)``.
        rank: Between 1 and :func:`cp_max_rank` of the kernel's shape (that rank is exact).
        max_iter: ALS iterations (TensorLy ``parafac``).
        tol: ALS convergence tolerance.
        seed: Seed of ALS's random parts (columns beyond a mode's size at initialisation).

    Returns:
        ``a (O, R)``, ``b (I, R)``, ``c (kh, R)``, ``d (kw, R)`` in ``kernel``'s dtype, with
        ``kernel ~= cp_reconstruct(a, b, c, d)``.

    Raises:
        ConfigError: ``kernel`` is not 4-D or ``rank`` is out of range.
        MissingDependencyError: TensorLy is not installed (``pip install "torchslim[lowrank]"``).
    """
    if kernel.dim() != 4:
        raise ConfigError(f"cp needs a 4-D conv kernel (O, I, kh, kw); got shape {tuple(kernel.shape)}")
    top = cp_max_rank(kernel.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise ConfigError(
            f"cp rank must be an integer in [1, {top}] for a {tuple(kernel.shape)} kernel "
            f"(the product of all dimensions but the largest); got {rank!r}"
        )
    k = kernel.detach().double()
    if rank == top:
        factors = _exact(k)
        weights = torch.ones(rank, dtype=k.dtype, device=k.device)
    else:
        tl = require("tensorly", "CP decomposition (method='cp')")
        from tensorly.decomposition import parafac

        with tl.backend_context("numpy"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "n_eigenvecs larger than ..." at init
            res = parafac(
                k.cpu().numpy(), rank=rank, n_iter_max=max_iter, init="svd", tol=tol, random_state=seed
            )
        weights = torch.as_tensor(res.weights, dtype=k.dtype, device=k.device)
        factors = [torch.as_tensor(f, dtype=k.dtype, device=k.device) for f in res.factors]
    a, b, c, d = _balance(weights, factors)
    return a.to(kernel.dtype), b.to(kernel.dtype), c.to(kernel.dtype), d.to(kernel.dtype)


def cp_reconstruct(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The kernel ``sum_r a_r (x) b_r (x) c_r (x) d_r`` that :func:`cp`'s factors stand for."""
    return torch.einsum("or,ir,hr,wr->oihw", a, b, c, d)


@register_method("lowrank.method", "cp", description="CP of a conv kernel into 1x1 -> kx1 dw -> 1xk dw -> 1x1 (Lebedev 2015)")
class CPFactorization(Factorization):
    """Conv2d -> 1x1 (I -> R) + depthwise kh x 1 + depthwise 1 x kw + 1x1 (R -> O)."""

    name = "cp"
    layer_types = (nn.Conv2d,)

    def max_ranks(self, module: nn.Module) -> tuple[int, ...]:
        return (cp_max_rank(module.weight.shape),)

    def mode_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        k = module.weight.detach().double()
        return [k.reshape(k.shape[0], -1), k.transpose(0, 1).reshape(k.shape[1], -1)]

    def combine(self, module: nn.Module, mode_ranks: list[int]) -> tuple[int, ...]:
        # a CP rank is at least the rank of every unfolding: use the largest as the estimate
        return (min(max(mode_ranks), self.max_ranks(module)[0]),)

    def scaled(self, module: nn.Module, fraction: float) -> tuple[int, ...]:
        # a fraction of the channel ranks (the exact bound is far larger than any useful rank)
        o, i = module.out_channels, module.in_channels
        return (max(1, min(self.max_ranks(module)[0], round(fraction * max(o, i)))),)

    def cost(self, module: nn.Module, ranks: tuple[int, ...], geo: Geometry) -> tuple[int, int]:
        (r,) = ranks
        o, i = module.out_channels, module.in_channels
        kh, kw = module.kernel_size
        macs = geo.in_pos * i * r + geo.mid_pos * r * kh + geo.out_pos * (r * kw + o * r)
        return macs, r * (i + kh + kw + o) + bias_params(module)

    def build(self, module: nn.Module, ranks: tuple[int, ...]) -> nn.Sequential:
        (r,) = ranks
        conv: nn.Conv2d = module  # type: ignore[assignment]
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        pad_v, pad_h = split_padding(conv)
        return sequential(
            reduce=new_conv(conv, conv.in_channels, r, (1, 1)),
            vertical=new_conv(conv, r, r, (kh, 1), stride=(sh, 1), padding=pad_v, dilation=(dh, 1), groups=r),
            horizontal=new_conv(conv, r, r, (1, kw), stride=(1, sw), padding=pad_h, dilation=(1, dw), groups=r),
            restore=new_conv(conv, r, conv.out_channels, (1, 1), bias=conv.bias is not None),
        )

    def factorize(
        self, module: nn.Module, ranks: tuple[int, ...], *, max_iter: int = 100, seed: int = 0
    ) -> tuple[nn.Sequential, float]:
        seq = self.build(module, ranks)
        a, b, c, d = cp(module.weight.detach().double(), ranks[0], max_iter=max_iter, seed=seed)
        assign(seq.reduce.weight, b.t())
        assign(seq.vertical.weight, c.t())
        assign(seq.horizontal.weight, d.t())
        assign(seq.restore.weight, a)
        copy_bias(seq.restore, module)
        return seq, rel_error(module.weight, cp_reconstruct(a, b, c, d))
