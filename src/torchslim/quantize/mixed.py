"""Mixed precision: per-layer sensitivity (output SQNR when one layer alone is quantized) and a
bit allocation that meets a weight-size budget.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.quantize.mixed import layer_sensitivity, allocate_bits
    >>> model = ts.create_model("zoo:lenet300")
    >>> sens = layer_sensitivity(model, torch.randn(16, 1, 28, 28), bits=(4, 8))
    >>> sorted(sens)
    ['fc1', 'fc2', 'fc3']
    >>> alloc = allocate_bits(model, sens, budget_ratio=0.2)
    >>> alloc.bits["fc1"], alloc.size_ratio <= 0.2
    (4, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim._utils import evaluating
from torchslim.errors import ConfigError
from torchslim.quantize.primitives import QScheme, check_bits, dequantize, quantize_tensor, sqnr
from torchslim.quantize.ptq import _call, quantizable_layers

__all__ = ["layer_sensitivity", "allocate_bits", "BitAllocation"]


def _weight_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    s = QScheme(bits=bits, granularity="channel")
    q, scale, zp = quantize_tensor(w, s)
    return dequantize(q, scale, zp, s, w.shape).to(w.dtype)


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module, inputs: Any, bits: Sequence[int] = (2, 4, 8), modules: Iterable[str] | None = None
) -> dict[str, dict[int, float]]:
    """``{layer: {bits: output SQNR (dB)}}`` with only that layer's weight quantized (per channel).

    The model is left exactly as it was (each weight is restored after its measurement).
    """
    for b in bits:
        check_bits(b, "bits")
    layers = quantizable_layers(model, modules)
    with evaluating(model):
        ref = _call(model, inputs)
        out: dict[str, dict[int, float]] = {}
        for name, layer in layers.items():
            w = layer.weight
            saved = w.detach().clone()
            out[name] = {}
            for b in bits:
                w.copy_(_weight_quant(saved, b))
                out[name][b] = sqnr(ref, _call(model, inputs))
                w.copy_(saved)
    return out


@dataclass
class BitAllocation:
    """Chosen bits per layer, the resulting weight bytes and their ratio to fp32."""

    bits: dict[str, int] = field(default_factory=dict)
    bytes: float = 0.0
    fp32_bytes: float = 0.0

    @property
    def size_ratio(self) -> float:
        return self.bytes / self.fp32_bytes if self.fp32_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"bits": dict(self.bits), "bytes": self.bytes, "fp32_bytes": self.fp32_bytes, "size_ratio": self.size_ratio}


def allocate_bits(
    model: nn.Module, sensitivity: dict[str, dict[int, float]], *, budget_ratio: float
) -> BitAllocation:
    """Greedy allocation: start every layer at its highest measured bits, then lower the layer whose
    next step costs the least SQNR per byte saved until the weights fit ``budget_ratio`` x fp32.

    Raises:
        ConfigError: a budget outside (0, 1], or one even the lowest bits cannot meet.
    """
    if not 0 < budget_ratio <= 1:
        raise ConfigError(f"budget_ratio must be in (0, 1]; got {budget_ratio!r}")
    modules = dict(model.named_modules())
    numel = {n: modules[n].weight.numel() for n in sensitivity}
    fp32 = sum(4.0 * v for v in numel.values())
    options = {n: sorted(s) for n, s in sensitivity.items()}
    bits = {n: o[-1] for n, o in options.items()}

    def size() -> float:
        return sum(numel[n] * bits[n] / 8 for n in bits)

    while size() > budget_ratio * fp32:
        best, best_cost = None, float("inf")
        for n, o in options.items():
            i = o.index(bits[n])
            if i == 0:
                continue
            lower = o[i - 1]
            saved = numel[n] * (bits[n] - lower) / 8
            cost = (sensitivity[n][bits[n]] - sensitivity[n][lower]) / saved
            if cost < best_cost:
                best, best_cost = (n, lower), cost
        if best is None:
            raise ConfigError(f"budget_ratio={budget_ratio} cannot be met even at the lowest bits ({size() / fp32:.3f} x fp32)")
        bits[best[0]] = best[1]
    return BitAllocation(bits=bits, bytes=size(), fp32_bytes=fp32)
