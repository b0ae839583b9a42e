"""SmoothQuant-style scale migration for Linear layers (Xiao et al. 2022).

Transformer activations have a few input channels with outliers tens of times larger than the
rest; a per-tensor activation scale set by them leaves the other channels with a handful of
integer levels. SmoothQuant moves that difficulty into the weights, which are quantized per
output channel and tolerate it: for input channel ``j`` of a Linear layer,

    s_j = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha),   X' = X / s,   W' = W * s

so ``X' W'^T == X W^T`` exactly in float. Here the division is a per-channel ``smooth_scale``
buffer applied by a forward pre-hook just before the input quantizer (an elementwise Mul in the
ONNX graph), so it works whatever produces the Linear's input; the weight is rescaled in place.
``max|X_j|`` comes from the calibration batches.

Example:
    >>> import torch
    >>> from torchslim.quantize import QuantConfig, quantize_
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> calib = [torch.randn(16, 8) for _ in range(2)]
    >>> plan = quantize_(m, QuantConfig(mode="static", smoothquant_alpha=0.5), calibration=calib)
    >>> plan.smoothed, m[0].smooth_scale.shape
    (['0'], torch.Size([8]))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["smooth_linears_", "attach_smoothing_"]


def _smooth_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor):
        return (args[0] / module.smooth_scale, *args[1:])
    return None


def attach_smoothing_(module: nn.Linear, scale: torch.Tensor | None = None) -> None:
    """Give ``module`` a ``smooth_scale`` buffer (ones unless given) and the pre-hook that divides
    its input by it; the hook runs before any input quantizer. Structure only: the weight is not
    touched (used directly by ``ts.load`` replay)."""
    s = torch.ones(module.in_features, device=module.weight.device, dtype=module.weight.dtype) if scale is None else scale
    module.register_buffer("smooth_scale", s)
    module.register_forward_pre_hook(_smooth_hook, prepend=True)


@torch.no_grad()
def _input_absmax(model: nn.Module, layers: dict[str, nn.Linear], loader: Iterable[Any], batches: int) -> dict[str, torch.Tensor]:
    from torchslim.quantize.ptq import run_calibration

    amax: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        run_calibration(model, loader, batches)
    finally:
        for h in handles:
            h.remove()
    return amax


@torch.no_grad()
def smooth_linears_(
    model: nn.Module, layers: dict[str, nn.Module], loader: Iterable[Any], batches: int, alpha: float
) -> list[str]:
    """Migrate activation outliers of every float ``nn.Linear`` in ``layers`` into its weight.

    Call before the quantizers are attached. Outputs are unchanged in float (up to rounding).

    Returns:
        The names of the smoothed layers (those the calibration batches reached).
    """
    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    if not linears:
        return []
    amax = _input_absmax(model, linears, loader, batches)
    done = []
    for name, m in linears.items():
        if name not in amax:
            continue
        wmax = m.weight.detach().abs().amax(0).float()
        a = amax[name].to(wmax.device)
        s = a.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)
        s = torch.where((a > 0) & (wmax > 0), s, torch.ones_like(s)).to(m.weight.dtype)
        m.weight.mul_(s.unsqueeze(0))
        attach_smoothing_(m, s)
        done.append(name)
    return done
