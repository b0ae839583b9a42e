"""SmoothQuant-style scale migration for Linear layers (Xiao et al. 2022).

Transformer activations have a few input channels with outliers tens of times larger than the
rest; a per-tensor activation scale set by them leaves the other channels with a handful of
integer levels. SmoothQuant moves that difficulty into the weights, which are quantized per
output channel and tolerate it: for input channel ``j`` of a Linear layer,

    s_j = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha),   X' = X / s,   W' = W * s

so ``X' W'^T == X W^T`` exactly in float. Here the division is a per-channel ``smooth_scale``
buffer applied by a forward pre-hook just before the input quantizer (an elementwise Mul in the
ONNX graph), so it works whatever produces the Linear's input; the weight is rescaled in place.
``max|X_j|`` comes from the calibration batches. Layers reading the same tensor share one scale
(one Div in the graph after ONNX export merges the identical ones).

In ``dynamic`` mode the activation range is measured per batch at run time, so an outlier
channel costs every other channel its resolution on every batch; smoothing helps there as much
as in static mode (all-MiniLM-L6-v2 in ``benchmarks/quantize_minilm.py``).

Example:
    >>> import torch
    >>> from torchslim.quantize import QuantConfig, quantize_
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> outlier = torch.tensor([1.0] * 7 + [50.0])  # input channel 7 runs 50x larger
    >>> calib = [torch.randn(16, 8) * outlier for _ in range(2)]
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
        # a Mul by the reciprocal (folded to a constant on export): cheaper than a Div at run time
        return (args[0] * module.smooth_scale.reciprocal(), *args[1:])
    return None


def attach_smoothing_(module: nn.Module, scale: torch.Tensor | None = None) -> None:
    """Give ``module`` (an ``nn.Linear`` or a :class:`~torchslim.quantize.QuantizedLinear`) a
    ``smooth_scale`` buffer (ones unless given) and the pre-hook that divides its input by it;
    the hook runs before any input quantizer. Structure only: the weight is not touched (used
    directly by ``ts.load`` replay)."""
    if scale is None:
        ref = next(iter(module.parameters()), None)
        if ref is None:
            ref = next(iter(module.buffers()))
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        scale = torch.ones(module.in_features, device=ref.device, dtype=dtype)
    module.register_buffer("smooth_scale", scale)
    module.register_forward_pre_hook(_smooth_hook, prepend=True)


@torch.no_grad()
def _input_absmax(
    model: nn.Module, layers: dict[str, nn.Linear], loader: Iterable[Any], batches: int
) -> tuple[dict[str, torch.Tensor], list[list[str]], dict[str, torch.Tensor]]:
    """Per-input-channel ``max|X|`` of every layer over the calibration batches, and the groups
    of layers that read the very same input tensor (siblings such as Q, K and V), found on the
    first batch: siblings get one shared scale, so their divisions are one and the same."""
    from torchslim.quantize.ptq import run_calibration

    amax: dict[str, torch.Tensor] = {}
    first: list[tuple[torch.Tensor, str]] = []  # references held for the first batch only (no id reuse)
    state = {"first": True}

    def hook(name: str):
        def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                amax[name] = torch.maximum(amax[name], a) if name in amax else a
                if state["first"]:
                    first.append((args[0], name))
        return pre

    def done(mod: nn.Module, args: Any, out: Any) -> None:
        state["first"] = False

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    handles.append(model.register_forward_hook(done))
    try:
        run_calibration(model, loader, batches)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    tensors: list[torch.Tensor] = []
    for t, name in first:
        for i, u in enumerate(tensors):
            if u is t:
                if name not in groups[i]:
                    groups[i].append(name)
                break
        else:
            tensors.append(t)
            groups.append([name])
    seen = {n for g in groups for n in g}
    groups += [[n] for n in amax if n not in seen]
    # a layer seen with two different inputs on the first batch (called twice) stays on its own
    counts: dict[str, int] = {}
    for g in groups:
        for n in g:
            counts[n] = counts.get(n, 0) + 1
    out: list[list[str]] = []
    for g in groups:
        shared = [n for n in g if counts[n] == 1]
        if shared:
            out.append(shared)
    out += [[n] for n, c in counts.items() if c > 1]
    sample = {}
    for t, name in first:  # each layer's first input, to judge whether smoothing pays
        sample.setdefault(name, t.detach().reshape(-1, t.shape[-1])[:4096].float())
    return amax, out, sample


def _int8_error(x: torch.Tensor, w: torch.Tensor) -> float:
    """Relative squared error of ``x @ w.T`` when ``x`` is quantized per tensor (8-bit asymmetric,
    as dynamic and static activations are) and ``w`` per output channel (8-bit symmetric)."""
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    sx = ((hi - lo) / 255).clamp_min(1e-12)
    zx = torch.round(-lo / sx)
    xq = (torch.clamp(torch.round(x / sx) + zx, 0, 255) - zx) * sx
    sw = (w.abs().amax(1, keepdim=True) / 127.5).clamp_min(1e-12)
    wq = torch.clamp(torch.round(w / sw), -128, 127) * sw
    y = x @ w.T
    return float(((xq @ wq.T - y) ** 2).sum() / (y**2).sum().clamp_min(1e-20))


@torch.no_grad()
def smooth_linears_(
    model: nn.Module, layers: dict[str, nn.Module], loader: Iterable[Any], batches: int, alpha: float,
    min_gain: float = 3.0,
) -> list[str]:
    """Migrate activation outliers of every float ``nn.Linear`` in ``layers`` into its weight.

    Call before the quantizers are attached. Outputs are unchanged in float (up to rounding).
    Layers that read the same input tensor (Q, K and V of an attention block) share one scale,
    computed from the largest weight of the group in each input channel, as in the paper. A group
    is smoothed only if that divides its simulated int8 error (on the first calibration batch) by
    at least ``min_gain`` (3, about 5 dB): each smoothed input costs one multiply at run time, and
    a layer that gains little is not worth it (all-MiniLM-L6-v2: the default smooths 25 of 36
    layers, two fifths of the multiplied elements of smoothing all, for 0.997 embedding cosine
    against 0.998; ``min_gain=0`` smooths every layer).

    Returns:
        The names of the smoothed layers (those the calibration batches reached).
    """
    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    if not linears:
        return []
    amax, groups, sample = _input_absmax(model, linears, loader, batches)
    done = []
    for group in groups:
        wmax = torch.stack([linears[n].weight.detach().abs().amax(0).float() for n in group]).amax(0)
        a = torch.stack([amax[n] for n in group]).amax(0).to(wmax.device)
        s = a.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)
        s = torch.where((a > 0) & (wmax > 0), s, torch.ones_like(s))
        x = sample.get(group[0])
        if x is not None and min_gain > 0:
            # smoothing costs a multiply at run time: only where it cuts the layer's int8 error
            w = torch.cat([linears[n].weight.detach().float() for n in group]).to(x.device)
            sx = s.to(x.device)
            if _int8_error(x / sx, w * sx) > _int8_error(x, w) / min_gain:
                continue
        for n in group:
            m = linears[n]
            m.weight.mul_(s.to(m.weight.dtype).unsqueeze(0))
            attach_smoothing_(m, s.to(m.weight.dtype).clone())
            done.append(n)
    return sorted(done, key=list(linears).index)
