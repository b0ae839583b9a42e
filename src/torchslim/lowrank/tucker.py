"""Tucker-2 of a conv kernel (Kim et al. 2016, "Compression of deep convolutional neural
networks for fast and low power mobile applications").

The kernel ``K (O x I x kh x kw)`` is decomposed along its two channel modes only:
``K ~= G x_0 U_out x_1 U_in`` with a core ``G (r_out x r_in x kh x kw)``. The conv becomes
three: a 1x1 conv ``I -> r_in`` (weight ``U_in^T``), the ``kh x kw`` core conv
``r_in -> r_out`` (original stride, padding, dilation), and a 1x1 conv ``r_out -> O`` (weight
``U_out``, original bias). Factors come from HOSVD refined by HOOI (alternating SVDs of the
partially projected kernel), computed with ``torch.linalg`` in float64.

Example:
    >>> import torch
    >>> k = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    >>> core, u_out, u_in = tucker2(k, (8, 6))         # full ranks: exact
    >>> torch.allclose(tucker2_reconstruct(core, u_out, u_in), k)
    True
    >>> tuple(tucker2(k, (4, 3))[0].shape)
    (4, 3, 3, 3)
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

__all__ = ["tucker2", "tucker2_reconstruct", "TuckerFactorization"]


def _leading(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading left singular vectors of ``matrix`` (rows x cols, rows = a channel mode).

    They are the top eigenvectors of the small Gram matrix ``M M^T`` (rows x rows): an
    eigendecomposition of that is far cheaper than an SVD of the wide unfolding, which HOOI
    repeats every sweep (in float64, the squared condition number costs nothing that matters for
    a basis). When ``r`` exceeds the column count (a core rank above ``r_other * kh * kw``) the
    basis is completed by a full SVD.
    """
    if r > min(matrix.shape):
        u, _, _ = torch.linalg.svd(matrix, full_matrices=True)
        return u[:, :r]
    _, vecs = torch.linalg.eigh(matrix @ matrix.T)  # eigenvalues ascending
    return vecs[:, -r:].flip(1)


def tucker2(
    kernel: torch.Tensor, ranks: tuple[int, int], *, max_iter: int = 20, tol: float = 1e-7
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 factors ``(core, u_out, u_in)`` of a 4-D kernel along its channel modes.

    Args:
        kernel: ``(O, I, kh, kw)``.
        ranks: ``(r_out, r_in)`` with ``1 <= r_out <= O`` and ``1 <= r_in <= I``.
        max_iter: HOOI sweeps after the HOSVD start (0: plain truncated HOSVD).
        tol: Stop when the core's norm grows by less than this (relative).

    Returns:
        ``core (r_out, r_in, kh, kw)``, ``u_out (O, r_out)``, ``u_in (I, r_in)`` with orthonormal
        columns, in ``kernel``'s dtype; ``kernel ~= tucker2_reconstruct(core, u_out, u_in)``.

    Raises:
        ConfigError: ``kernel`` is not 4-D or a rank is out of range.
    """
    if kernel.dim() != 4:
        raise ConfigError(f"tucker2 needs a 4-D conv kernel (O, I, kh, kw); got shape {tuple(kernel.shape)}")
    o, i = kernel.shape[:2]
    if (
        not isinstance(ranks, (tuple, list))
        or len(ranks) != 2
        or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)
        or not (1 <= ranks[0] <= o and 1 <= ranks[1] <= i)
    ):
        raise ConfigError(f"tucker2 ranks must be (r_out, r_in) with 1 <= r_out <= {o} and 1 <= r_in <= {i}; got {ranks!r}")
    r_out, r_in = int(ranks[0]), int(ranks[1])
    k = kernel.detach().double()
    u_out = _leading(k.reshape(o, -1), r_out)
    u_in = _leading(k.transpose(0, 1).reshape(i, -1), r_in)
    last = None
    for _ in range(max_iter if (r_out < o or r_in < i) else 0):
        y = torch.einsum("oiab,ir->orab", k, u_in)
        u_out = _leading(y.reshape(o, -1), r_out)
        y = torch.einsum("oiab,os->siab", k, u_out)
        u_in = _leading(y.transpose(0, 1).reshape(i, -1), r_in)
        norm = float(torch.linalg.vector_norm(torch.einsum("siab,ir->srab", y, u_in)))
        if last is not None and norm - last <= tol * max(norm, 1e-300):
            break
        last = norm
    core = torch.einsum("oiab,os,ir->srab", k, u_out, u_in)
    return core.to(kernel.dtype), u_out.to(kernel.dtype), u_in.to(kernel.dtype)


def tucker2_reconstruct(core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """The kernel ``core x_0 u_out x_1 u_in`` that :func:`tucker2`'s factors stand for."""
    return torch.einsum("srab,os,ir->oiab", core, u_out, u_in)


@register_method("lowrank.method", "tucker", description="Tucker-2 of a conv kernel into 1x1 -> kxk core -> 1x1 (Kim 2016)")
class TuckerFactorization(Factorization):
    """Conv2d -> conv 1x1 (I -> r_in) + core conv kxk (r_in -> r_out) + conv 1x1 (r_out -> O)."""

    name = "tucker"
    layer_types = (nn.Conv2d,)
    mode_names = ("out", "in")

    def max_ranks(self, module: nn.Module) -> tuple[int, ...]:
        return (module.out_channels, module.in_channels)

    def mode_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        k = module.weight.detach().double()
        return [k.reshape(k.shape[0], -1), k.transpose(0, 1).reshape(k.shape[1], -1)]

    def cost(self, module: nn.Module, ranks: tuple[int, ...], geo: Geometry) -> tuple[int, int]:
        r_out, r_in = ranks
        o, i = module.out_channels, module.in_channels
        kk = module.kernel_size[0] * module.kernel_size[1]
        macs = geo.in_pos * i * r_in + geo.out_pos * (r_out * r_in * kk + o * r_out)
        return macs, i * r_in + r_out * r_in * kk + o * r_out + bias_params(module)

    def build(self, module: nn.Module, ranks: tuple[int, ...]) -> nn.Sequential:
        r_out, r_in = ranks
        conv: nn.Conv2d = module  # type: ignore[assignment]
        return sequential(
            reduce=new_conv(conv, conv.in_channels, r_in, (1, 1)),
            core=new_conv(
                conv, r_in, r_out, conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            ),
            restore=new_conv(conv, r_out, conv.out_channels, (1, 1), bias=conv.bias is not None),
        )

    def factorize(
        self, module: nn.Module, ranks: tuple[int, ...], *, max_iter: int = 100, seed: int = 0
    ) -> tuple[nn.Sequential, float]:
        seq = self.build(module, ranks)
        core, u_out, u_in = tucker2(module.weight.detach().double(), (ranks[0], ranks[1]), max_iter=min(max_iter, 50))
        assign(seq.reduce.weight, u_in.t())
        assign(seq.core.weight, core)
        assign(seq.restore.weight, u_out)
        copy_bias(seq.restore, module)
        return seq, rel_error(module.weight, tucker2_reconstruct(core, u_out, u_in))
