"""What every factorization method shares: layer geometry, the method contract, small helpers.

A *method* (``svd``, ``tucker``, ``cp``, ``spatial``, ``separable``) is a small strategy object
registered under ``lowrank.method``. The planner in :mod:`torchslim.lowrank.api` only talks to
this contract: which layers a method takes, its largest ranks, the per-mode energies and
matrices rank selection looks at, the analytic cost of a rank choice, and how to build the
replacement ``nn.Sequential`` (with or without the decomposed weights).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Geometry", "Factorization", "conv_geometry_default", "energy_rank", "sequential", "rel_error"]


@dataclass(frozen=True)
class Geometry:
    """Where a layer runs, summed over its calls on the example inputs.

    Attributes:
        in_pos: Positions of the input the layer reads (Linear: rows; Conv2d: ``N*H_in*W_in``).
        out_pos: Positions of its output (Linear: rows; Conv2d: ``N*H_out*W_out``).
        mid_pos: Conv2d only: ``N*H_out*W_in``, where a vertical ``kh x 1`` conv writes its output
            before a horizontal ``1 x kw`` conv (spatial SVD, CP).
        measured: Whether the numbers come from a real forward (else a 1x1-output estimate).
    """

    in_pos: int
    out_pos: int
    mid_pos: int
    measured: bool = True


def conv_geometry_default(module: nn.Module) -> Geometry:
    """A per-output-position estimate used when no example inputs are available."""
    if isinstance(module, nn.Conv2d):
        sh, sw = module.stride
        return Geometry(in_pos=sh * sw, out_pos=1, mid_pos=sw, measured=False)
    return Geometry(1, 1, 1, measured=False)


def energy_rank(energies: torch.Tensor, energy: float) -> int:
    """Smallest ``r >= 1`` whose leading ``r`` entries hold ``energy`` of the total.

    ``energies`` are squared singular values (or sums of them) in descending order.
    """
    total = float(energies.sum())
    if total <= 0.0:
        return 1
    cum = torch.cumsum(energies.double(), 0) / total
    hit = torch.nonzero(cum >= energy * (1.0 - 1e-12))
    r = int(hit[0]) + 1 if hit.numel() else int(energies.numel())
    return max(1, r)


def sequential(**parts: nn.Module) -> nn.Sequential:
    """An ``nn.Sequential`` with named children (``reduce``, ``core``, ``restore``...)."""
    return nn.Sequential(OrderedDict(parts))


def rel_error(original: torch.Tensor, approx: torch.Tensor) -> float:
    """``||original - approx||_F / ||original||_F`` (0 for an all-zero original)."""
    a = original.detach().double()
    den = float(torch.linalg.vector_norm(a))
    num = float(torch.linalg.vector_norm(a - approx.detach().double().to(a.device)))
    return num / den if den > 0 else num


def bias_params(module: nn.Module) -> int:
    return 0 if getattr(module, "bias", None) is None else module.bias.numel()


def new_conv(
    src: nn.Conv2d,
    in_ch: int,
    out_ch: int,
    kernel: tuple[int, int],
    *,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    bias: bool = False,
) -> nn.Conv2d:
    """A Conv2d on ``src``'s device and dtype, keeping its padding mode."""
    w = src.weight
    return nn.Conv2d(
        in_ch,
        out_ch,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=src.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )


def split_padding(conv: nn.Conv2d) -> tuple[tuple[int, int] | str, tuple[int, int] | str]:
    """Padding of a vertical ``kh x 1`` and a horizontal ``1 x kw`` conv that together act as ``conv``."""
    if isinstance(conv.padding, str):
        return conv.padding, conv.padding
    ph, pw = conv.padding
    return (ph, 0), (0, pw)


def conv_macs_original(conv: nn.Conv2d, geo: Geometry) -> int:
    kh, kw = conv.kernel_size
    return geo.out_pos * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw


class Factorization:
    """Contract of one factorization method (subclasses live in the method modules).

    Attributes:
        name: Method name used in configs and plans.
        layer_types: Module types the method can replace.
        mode_names: What each entry of a rank tuple means (``("rank",)``, ``("out", "in")``).
    """

    name: str = ""
    layer_types: tuple[type[nn.Module], ...] = ()
    mode_names: tuple[str, ...] = ("rank",)
    supports_vbmf: bool = True

    # -- what a layer allows ------------------------------------------------------------------
    def unsupported(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot be factorized by this method (``None`` when it can)."""
        if not isinstance(module, self.layer_types):
            kinds = " or ".join(t.__name__ for t in self.layer_types)
            return f"{type(module).__name__} has no {self.name} factorization (it applies to {kinds})"
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return f"grouped convolution (groups={module.groups}) has no {self.name} factorization here"
        return None

    def max_ranks(self, module: nn.Module) -> tuple[int, ...]:
        """Largest rank of each mode; these ranks reproduce the layer exactly."""
        raise NotImplementedError

    # -- rank selection inputs ----------------------------------------------------------------
    def mode_energies(self, module: nn.Module) -> list[torch.Tensor]:
        """Squared singular values (descending) that energy selection looks at, one per mode."""
        return [torch.linalg.svdvals(m) ** 2 for m in self.mode_matrices(module)]

    def mode_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        """The matrices (float64) whose ranks are selected, one per mode (VBMF, energy)."""
        raise NotImplementedError

    def combine(self, module: nn.Module, mode_ranks: list[int]) -> tuple[int, ...]:
        """Ranks of the method from one rank per mode matrix (clamped to :meth:`max_ranks`)."""
        return tuple(min(r, m) for r, m in zip(mode_ranks, self.max_ranks(module)))

    def ladder_size(self, module: nn.Module) -> int:
        """Number of steps of :meth:`ladder` (its last step is the full rank)."""
        return max(self.max_ranks(module))

    def ladder(self, module: nn.Module, k: int) -> tuple[int, ...]:
        """Ranks at step ``k`` of a monotone path from rank 1 to full rank (for cost targets)."""
        top = self.max_ranks(module)
        size = max(top)
        return tuple(max(1, min(m, math.ceil(k * m / size))) for m in top)

    def scaled(self, module: nn.Module, fraction: float) -> tuple[int, ...]:
        """Ranks that are ``fraction`` of each mode's full rank (at least 1)."""
        return tuple(max(1, min(m, round(fraction * m))) for m in self.max_ranks(module))

    # -- cost ---------------------------------------------------------------------------------
    def original_cost(self, module: nn.Module, geo: Geometry) -> tuple[int, int]:
        """(MACs, params) of the layer as it is."""
        params = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, nn.Linear):
            return geo.out_pos * module.in_features * module.out_features, params
        if isinstance(module, nn.Conv2d):
            return conv_macs_original(module, geo), params
        raise NotImplementedError

    def cost(self, module: nn.Module, ranks: tuple[int, ...], geo: Geometry) -> tuple[int, int]:
        """(MACs, params) of the factorized form at ``ranks``."""
        raise NotImplementedError

    # -- the replacement ----------------------------------------------------------------------
    def build(self, module: nn.Module, ranks: tuple[int, ...]) -> nn.Sequential:
        """The replacement's structure (weights uninitialised in meaning; loaded afterwards)."""
        raise NotImplementedError

    def factorize(
        self, module: nn.Module, ranks: tuple[int, ...], *, max_iter: int = 100, seed: int = 0
    ) -> tuple[nn.Sequential, float]:
        """The replacement with decomposed weights, and the kernel's relative error."""
        raise NotImplementedError


def copy_bias(dst: nn.Module, src: nn.Module) -> None:
    if getattr(src, "bias", None) is not None:
        with torch.no_grad():
            dst.bias.copy_(src.bias)


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` (any dtype/device) into ``param`` in place, checking the shape."""
    with torch.no_grad():
        param.copy_(value.reshape(param.shape).to(dtype=param.dtype, device=param.device))
