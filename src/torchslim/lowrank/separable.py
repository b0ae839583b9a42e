"""Depthwise-separable rewrite of a standard conv, initialised from its weights
(the MobileNet block, Howard et al. 2017; initialised by a per-channel SVD).

A standard ``kh x kw`` conv ``I -> O`` is replaced by a depthwise conv with ``m`` filters per
input channel (``I -> I*m``, groups ``I``) and a pointwise 1x1 conv ``I*m -> O``. Each input
channel's slice ``K[:, i]`` is an ``O x (kh*kw)`` matrix; its best rank-``m`` factorization
``P_i D_i`` gives the depthwise filters ``D_i`` and the pointwise columns ``P_i``, so the
initialisation is the closest separable conv to the original in Frobenius norm, and
``m = min(O, kh*kw)`` (the full "rank" here, the depth multiplier) reproduces it exactly.

Example:
    >>> import torch
    >>> k = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    >>> dw, pw = separable_factors(k, 6)                # min(O, kh*kw) = 6: exact
    >>> torch.allclose(separable_reconstruct(dw, pw, 4), k)
    True
    >>> tuple(dw.shape), tuple(pw.shape)
    ((24, 1, 3, 3), (6, 24, 1, 1))
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

__all__ = ["separable_factors", "separable_reconstruct", "SeparableRewrite"]


def _channel_svd(kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    o, i, kh, kw = kernel.shape
    mats = kernel.detach().double().transpose(0, 1).reshape(i, o, kh * kw)  # (I, O, k^2)
    return torch.linalg.svd(mats, full_matrices=False)  # u (I, O, q), s (I, q), vh (I, q, k^2)


def separable_factors(kernel: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise and pointwise weights of the separable conv closest to ``kernel``.

    Args:
        kernel: ``(O, I, kh, kw)`` of a conv with ``groups=1``.
        multiplier: Depthwise filters per input channel, in ``[1, min(O, kh*kw)]``.

    Returns:
        ``depthwise (I*m, 1, kh, kw)`` (output ``i*m + j`` reads input channel ``i``) and
        ``pointwise (O, I*m, 1, 1)``, in ``kernel``'s dtype.

    Raises:
        ConfigError: ``kernel`` is not 4-D or ``multiplier`` is out of range.
    """
    if kernel.dim() != 4:
        raise ConfigError(f"separable_factors needs a 4-D conv kernel (O, I, kh, kw); got shape {tuple(kernel.shape)}")
    o, i, kh, kw = kernel.shape
    full = min(o, kh * kw)
    m = multiplier
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= full:
        raise ConfigError(
            f"separable depth multiplier must be an integer in [1, {full}] (min(O, kh*kw)) for a "
            f"{tuple(kernel.shape)} kernel; got {multiplier!r}"
        )
    u, s, vh = _channel_svd(kernel)
    root = s[:, :m].sqrt()  # (I, m)
    depthwise = (root[:, :, None] * vh[:, :m]).reshape(i * m, 1, kh, kw)
    pointwise = (u[:, :, :m] * root[:, None, :]).permute(1, 0, 2).reshape(o, i * m, 1, 1)
    return depthwise.to(kernel.dtype), pointwise.to(kernel.dtype)


def separable_reconstruct(depthwise: torch.Tensor, pointwise: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The dense ``(O, I, kh, kw)`` kernel a depthwise + pointwise pair composes to."""
    o, im = pointwise.shape[:2]
    kh, kw = depthwise.shape[2:]
    terms = pointwise[:, :, 0, 0, None, None] * depthwise[None, :, 0]  # (O, I*m, kh, kw)
    return terms.reshape(o, in_channels, im // in_channels, kh, kw).sum(2)


@register_method("lowrank.method", "separable", description="depthwise-separable rewrite of a standard conv (MobileNet block)")
class SeparableRewrite(Factorization):
    """Conv2d -> depthwise kxk (I -> I*m, groups I) + pointwise 1x1 (I*m -> O)."""

    name = "separable"
    layer_types = (nn.Conv2d,)
    mode_names = ("multiplier",)
    supports_vbmf = False

    def max_ranks(self, module: nn.Module) -> tuple[int, ...]:
        o, _, kh, kw = module.weight.shape
        return (min(o, kh * kw),)

    def mode_energies(self, module: nn.Module) -> list[torch.Tensor]:
        _, s, _ = _channel_svd(module.weight)
        return [(s**2).sum(0)]  # energy kept by m filters per channel, summed over channels

    def cost(self, module: nn.Module, ranks: tuple[int, ...], geo: Geometry) -> tuple[int, int]:
        (m,) = ranks
        o, i, kh, kw = module.weight.shape
        macs = geo.out_pos * i * m * (kh * kw + o)
        return macs, i * m * (kh * kw + o) + bias_params(module)

    def build(self, module: nn.Module, ranks: tuple[int, ...]) -> nn.Sequential:
        (m,) = ranks
        conv: nn.Conv2d = module  # type: ignore[assignment]
        i = conv.in_channels
        return sequential(
            depthwise=new_conv(
                conv, i, i * m, conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=i,
            ),
            pointwise=new_conv(conv, i * m, conv.out_channels, (1, 1), bias=conv.bias is not None),
        )

    def factorize(
        self, module: nn.Module, ranks: tuple[int, ...], *, max_iter: int = 100, seed: int = 0
    ) -> tuple[nn.Sequential, float]:
        seq = self.build(module, ranks)
        dw, pw = separable_factors(module.weight.detach().double(), ranks[0])
        assign(seq.depthwise.weight, dw)
        assign(seq.pointwise.weight, pw)
        copy_bias(seq.pointwise, module)
        return seq, rel_error(module.weight, separable_reconstruct(dw, pw, module.in_channels))
