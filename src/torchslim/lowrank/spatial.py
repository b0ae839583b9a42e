"""Spatial SVD: a ``kh x kw`` conv becomes a ``kh x 1`` conv followed by a ``1 x kw`` conv
(Jaderberg et al. 2014, scheme 2; AIMET's "spatial SVD").

The kernel is read as the matrix ``M[(i, a), (o, b)] = K[o, i, a, b]`` of shape
``(I*kh) x (O*kw)``; its best rank-``r`` approximation gives a vertical conv ``I -> r`` with
kernel ``(kh, 1)`` and a horizontal conv ``r -> O`` with kernel ``(1, kw)``. Full rank is
``min(I*kh, O*kw)``.

Example:
    >>> import torch
    >>> k = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    >>> v, h = spatial_svd(k, 12)                       # min(4*3, 5*3) = 12: exact
    >>> torch.allclose(spatial_reconstruct(v, h), k)
    True
    >>> tuple(v.shape), tuple(h.shape)
    ((12, 4, 3, 1), (5, 12, 1, 3))
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
    split_padding,
)
from torchslim.lowrank.svd import svd_factorize

__all__ = ["spatial_svd", "spatial_reconstruct", "SpatialFactorization"]


def _matrix(kernel: torch.Tensor) -> torch.Tensor:
    o, i, kh, kw = kernel.shape
    return kernel.permute(1, 2, 0, 3).reshape(i * kh, o * kw)


def spatial_svd(kernel: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(vertical, horizontal)`` of a 4-D kernel, shaped as conv weights.

    Args:
        kernel: ``(O, I, kh, kw)``.
        rank: Between 1 and ``min(I*kh, O*kw)``.

    Returns:
        ``vertical (rank, I, kh, 1)`` and ``horizontal (O, rank, 1, kw)``: running the two convs
        one after the other equals the ``kh x kw`` conv with the rank-``rank`` kernel.

    Raises:
        ConfigError: ``kernel`` is not 4-D or ``rank`` is out of range.
    """
    if kernel.dim() != 4:
        raise ConfigError(f"spatial_svd needs a 4-D conv kernel (O, I, kh, kw); got shape {tuple(kernel.shape)}")
    o, i, kh, kw = kernel.shape
    full = min(i * kh, o * kw)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ConfigError(
            f"spatial_svd rank must be an integer in [1, {full}] (min(I*kh, O*kw)) for a "
            f"{tuple(kernel.shape)} kernel; got {rank!r}"
        )
    u, v = svd_factorize(_matrix(kernel.detach()), rank)  # u: (I*kh, r), v: (r, O*kw)
    vertical = u.reshape(i, kh, rank).permute(2, 0, 1).unsqueeze(-1)
    horizontal = v.reshape(rank, o, kw).permute(1, 0, 2).unsqueeze(2)
    return vertical.contiguous(), horizontal.contiguous()


def spatial_reconstruct(vertical: torch.Tensor, horizontal: torch.Tensor) -> torch.Tensor:
    """The ``kh x kw`` kernel that :func:`spatial_svd`'s two conv weights compose to."""
    return torch.einsum("ria,orb->oiab", vertical[..., 0], horizontal[:, :, 0, :])


@register_method("lowrank.method", "spatial", description="spatial SVD of a conv: kh x kw -> kh x 1 then 1 x kw")
class SpatialFactorization(Factorization):
    """Conv2d -> conv (kh x 1, I -> r) + conv (1 x kw, r -> O)."""

    name = "spatial"
    layer_types = (nn.Conv2d,)

    def max_ranks(self, module: nn.Module) -> tuple[int, ...]:
        o, i, kh, kw = module.weight.shape
        return (min(i * kh, o * kw),)

    def mode_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        return [_matrix(module.weight.detach().double())]

    def cost(self, module: nn.Module, ranks: tuple[int, ...], geo: Geometry) -> tuple[int, int]:
        (r,) = ranks
        o, i, kh, kw = module.weight.shape
        macs = geo.mid_pos * r * i * kh + geo.out_pos * o * r * kw
        return macs, r * (i * kh + o * kw) + bias_params(module)

    def build(self, module: nn.Module, ranks: tuple[int, ...]) -> nn.Sequential:
        (r,) = ranks
        conv: nn.Conv2d = module  # type: ignore[assignment]
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        pad_v, pad_h = split_padding(conv)
        return sequential(
            vertical=new_conv(conv, conv.in_channels, r, (kh, 1), stride=(sh, 1), padding=pad_v, dilation=(dh, 1)),
            horizontal=new_conv(
                conv, r, conv.out_channels, (1, kw), stride=(1, sw), padding=pad_h, dilation=(1, dw),
                bias=conv.bias is not None,
            ),
        )

    def factorize(
        self, module: nn.Module, ranks: tuple[int, ...], *, max_iter: int = 100, seed: int = 0
    ) -> tuple[nn.Sequential, float]:
        seq = self.build(module, ranks)
        vertical, horizontal = spatial_svd(module.weight.detach().double(), ranks[0])
        assign(seq.vertical.weight, vertical)
        assign(seq.horizontal.weight, horizontal)
        copy_bias(seq.horizontal, module)
        return seq, rel_error(module.weight, spatial_reconstruct(vertical, horizontal))
