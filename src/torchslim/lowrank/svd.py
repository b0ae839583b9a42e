"""Truncated SVD: a Linear (or a conv seen as a matrix) becomes two thinner layers.

``W (out x in) ~= U_r S_r V_r^T``: ``Linear(in, r)`` with weight ``sqrt(S_r) V_r^T`` followed by
``Linear(r, out)`` with weight ``U_r sqrt(S_r)`` (and the original bias). A Conv2d's kernel is
read as an ``out x (in*kh*kw)`` matrix, giving a ``kh x kw`` conv to ``r`` channels and a 1x1
conv back to ``out`` (the "channel" decomposition of Zhang et al. 2015). The truncation is the
best rank-``r`` approximation in Frobenius norm (Eckart-Young).

Example:
    >>> import torch
    >>> w = torch.randn(6, 4, dtype=torch.float64)
    >>> u, v = svd_factorize(w, 4)                     # full rank: exact
    >>> torch.allclose(u @ v, w)
    True
    >>> [tuple(t.shape) for t in svd_factorize(w, 2)]
    [(6, 2), (2, 4)]
"""

from __future__ import annotations

import torch
from torch import nn

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
)

__all__ = ["svd_factorize", "svd_reconstruct", "SVDFactorization"]


def svd_factorize(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(u, v)`` of a matrix, with ``weight ~= u @ v``.

    The singular values are split evenly (``u = U_r sqrt(S_r)``, ``v = sqrt(S_r) V_r^T``), so
    both factors have comparable scales. Computed in float64, returned in ``weight``'s dtype.

    Args:
        weight: A 2-D tensor ``(out, in)``.
        rank: Between 1 and ``min(out, in)``.

    Returns:
        ``u`` of shape ``(out, rank)`` and ``v`` of shape ``(rank, in)``.

    Raises:
        ConfigError: ``weight`` is not 2-D or ``rank`` is out of range.
    """
    if weight.dim() != 2:
        raise ConfigError(f"svd_factorize needs a 2-D weight (out, in); got shape {tuple(weight.shape)}")
    full = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ConfigError(f"svd rank must be an integer in [1, {full}] for a {tuple(weight.shape)} weight; got {rank!r}")
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


def svd_reconstruct(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The matrix ``u @ v`` that :func:`svd_factorize`'s factors stand for."""
    return u @ v


@register_method("lowrank.method", "svd", description="truncated SVD of a Linear (or conv as a matrix) into two layers")
class SVDFactorization(Factorization):
    """Linear -> Linear(in, r) + Linear(r, out); Conv2d -> conv kxk (in -> r) + conv 1x1 (r -> out)."""

    name = "svd"
    layer_types = (nn.Linear, nn.Conv2d)

    @staticmethod
    def _matrix(module: nn.Module) -> torch.Tensor:
        w = module.weight.detach()
        return w.reshape(w.shape[0], -1)

    def max_ranks(self, module: nn.Module) -> tuple[int, ...]:
        return (min(self._matrix(module).shape),)

    def mode_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        return [self._matrix(module).double()]

    def cost(self, module: nn.Module, ranks: tuple[int, ...], geo: Geometry) -> tuple[int, int]:
        (r,) = ranks
        out_dim, in_dim = self._matrix(module).shape
        return geo.out_pos * r * (in_dim + out_dim), r * (in_dim + out_dim) + bias_params(module)

    def build(self, module: nn.Module, ranks: tuple[int, ...]) -> nn.Sequential:
        (r,) = ranks
        if isinstance(module, nn.Linear):
            kw = {"device": module.weight.device, "dtype": module.weight.dtype}
            return sequential(
                reduce=nn.Linear(module.in_features, r, bias=False, **kw),
                restore=nn.Linear(r, module.out_features, bias=module.bias is not None, **kw),
            )
        conv: nn.Conv2d = module  # type: ignore[assignment]
        return sequential(
            reduce=new_conv(
                conv, conv.in_channels, r, conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            ),
            restore=new_conv(conv, r, conv.out_channels, (1, 1), bias=conv.bias is not None),
        )

    def factorize(
        self, module: nn.Module, ranks: tuple[int, ...], *, max_iter: int = 100, seed: int = 0
    ) -> tuple[nn.Sequential, float]:
        seq = self.build(module, ranks)
        u, v = svd_factorize(self._matrix(module).double(), ranks[0])
        assign(seq.reduce.weight, v)
        assign(seq.restore.weight, u)
        copy_bias(seq.restore, module)
        return seq, rel_error(self._matrix(module), u @ v)
