"""Calibration observers: they watch tensors and say which range ``[lo, hi]`` to quantize.

Every observer has one contract: ``update(x)`` as often as there are batches, then ``range()``
gives ``(lo, hi)`` in the view shape of its :class:`~torchslim.quantize.primitives.QScheme`, and
``qparams()`` the scale and zero point. Registered under ``"quantize.observer"``:

* ``minmax``: the extremes seen;
* ``moving_average``: exponential moving average of per-batch extremes (``momentum``);
* ``percentile``: the ``percentile`` / ``100 - percentile`` quantiles (per-tensor);
* ``entropy``: TensorRT-style KL-divergence threshold on a histogram of ``|x|`` (per-tensor);
* ``mse``: the clipping of the min-max range that minimises the quantization MSE.

Example:
    >>> import torch
    >>> from torchslim.quantize.observers import make_observer
    >>> from torchslim.quantize.primitives import QScheme
    >>> obs = make_observer("minmax", QScheme(symmetric=False, signed=False))
    >>> obs.update(torch.tensor([-1.0, 0.5])); obs.update(torch.tensor([3.0]))
    >>> [float(t) for t in obs.range()]
    [-1.0, 3.0]
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchslim._registry import get_method, register_method
from torchslim.errors import ConfigError
from torchslim.quantize.primitives import QScheme, choose_qparams, minmax, view

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MSEObserver",
    "make_observer",
    "OBSERVERS",
]

OBSERVERS = ("minmax", "moving_average", "percentile", "entropy", "mse")
_MAX_SAMPLES = 1 << 18


class Observer:
    """Base class: keeps the running min / max; subclasses refine :meth:`range`."""

    per_tensor_only = False

    def __init__(self, scheme: QScheme) -> None:
        if self.per_tensor_only and scheme.granularity != "tensor":
            raise ConfigError(f"observer {type(self).__name__} works per tensor only; got granularity={scheme.granularity!r}")
        self.scheme = scheme
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x.detach().float(), self.scheme)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self.batches += 1

    def _check(self) -> None:
        if self.lo is None:
            raise ConfigError(f"{type(self).__name__} saw no data: run calibration batches through the model first")

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check()
        return self.lo, self.hi

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        return choose_qparams(lo, hi, self.scheme)


@register_method("quantize.observer", "minmax", description="min and max of everything seen")
class MinMaxObserver(Observer):
    """The extremes of every value seen."""


@register_method("quantize.observer", "moving_average", description="EMA of per-batch min and max")
class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (``momentum`` weight on the new batch)."""

    def __init__(self, scheme: QScheme, momentum: float = 0.1) -> None:
        super().__init__(scheme)
        if not 0 < momentum <= 1:
            raise ConfigError(f"momentum must be in (0, 1]; got {momentum!r}")
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x.detach().float(), self.scheme)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo, self.hi = (1 - m) * self.lo + m * lo, (1 - m) * self.hi + m * hi
        self.batches += 1


class _Sampling(Observer):
    """Keeps a uniform subsample of the values seen (at most ~256k) besides min and max."""

    def __init__(self, scheme: QScheme) -> None:
        super().__init__(scheme)
        self.samples: list[torch.Tensor] = []
        self.kept = 0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        v = view(x.detach().float(), self.scheme)
        if self.scheme.granularity == "tensor":
            v = v.reshape(-1)
            budget = max(_MAX_SAMPLES // 16, 1)
            if v.numel() > budget:
                idx = torch.randint(0, v.numel(), (budget,), device=v.device)
                v = v[idx]
        self.samples.append(v.cpu())
        self.kept += v.numel()
        if self.kept > _MAX_SAMPLES and self.scheme.granularity == "tensor":  # thin out, keep it uniform-ish
            allv = torch.cat(self.samples)
            self.samples = [allv[torch.randperm(allv.numel())[: _MAX_SAMPLES // 2]]]
            self.kept = self.samples[0].numel()

    def _values(self) -> torch.Tensor:
        self._check()
        return torch.cat(self.samples, dim=-1)


@register_method("quantize.observer", "percentile", description="clip to the given percentiles")
class PercentileObserver(_Sampling):
    """Range from the ``percentile`` and ``100 - percentile`` quantiles of the values (per tensor)."""

    per_tensor_only = True

    def __init__(self, scheme: QScheme, percentile: float = 99.99) -> None:
        super().__init__(scheme)
        if not 50 < percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100]; got {percentile!r}")
        self.percentile = percentile

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        v = self._values()
        p = self.percentile / 100
        lo, hi = torch.quantile(v, torch.tensor([1 - p, p], dtype=v.dtype))
        dev = self.lo.device
        return lo.to(dev), hi.to(dev)


@register_method("quantize.observer", "entropy", description="KL-divergence (TensorRT entropy) threshold")
class EntropyObserver(_Sampling):
    """Threshold ``T`` on ``|x|`` minimising KL(P || Q) between the clipped and the quantized histogram.

    The range is ``[-T, T]`` for signed data and ``[0, T]`` when nothing negative was seen.
    """

    per_tensor_only = True

    def __init__(self, scheme: QScheme, bins: int = 2048) -> None:
        super().__init__(scheme)
        self.bins = bins

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        v = self._values().abs()
        amax = float(v.max())
        dev = self.lo.device
        if amax == 0:
            return self.lo, self.hi
        hist = torch.histc(v, bins=self.bins, min=0, max=amax).double()
        levels = 2 ** (self.scheme.bits - (0 if float(self.lo) >= 0 else 1))
        best, best_i = math.inf, self.bins
        for i in range(max(levels, 8), self.bins + 1, max(1, self.bins // 128)):
            p = hist[:i].clone()
            p[-1] += hist[i:].sum()
            # merge the first i bins into `levels` levels, then spread each level over its non-empty bins
            src = hist[:i]
            idx = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
            sums = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, idx, src)
            nz = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, idx, (src > 0).double())
            q = torch.where(src > 0, sums[idx] / nz[idx].clamp(min=1), torch.zeros_like(src))
            ps, qs = p.sum(), q.sum()
            if qs == 0:
                continue
            pn, qn = p / ps, q / qs
            mask = pn > 0
            kl = float((pn[mask] * torch.log(pn[mask] / torch.clamp(qn[mask], min=1e-12))).sum())
            if kl < best:
                best, best_i = kl, i
        t = torch.tensor(amax * best_i / self.bins, device=dev)
        lo = -t if float(self.lo) < 0 else torch.zeros((), device=dev)
        return lo.reshape(self.lo.shape), t.reshape(self.hi.shape)


@register_method("quantize.observer", "mse", description="clip ratio minimising the quantization MSE")
class MSEObserver(_Sampling):
    """Shrinks the min-max range by the factor (of ``steps`` in [0.02, 1]) that minimises the MSE, per scale."""

    def __init__(self, scheme: QScheme, steps: int = 100) -> None:
        super().__init__(scheme)
        self.steps = steps

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        v = self._values()
        lo0, hi0 = self.lo.cpu(), self.hi.cpu()
        if self.scheme.granularity == "tensor":
            v = v.reshape(1, -1)
            lo0, hi0 = lo0.reshape(1, 1), hi0.reshape(1, 1)
        best_err = torch.full(lo0.shape, math.inf, dtype=torch.float64)
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for r in torch.linspace(0.02, 1.0, self.steps).tolist():
            lo, hi = lo0 * r, hi0 * r
            scale, zp = choose_qparams(lo, hi, self.scheme)
            qv = _fq_rows(v, scale, zp, self.scheme)
            err = (qv - v).double().pow(2).mean(dim=-1, keepdim=True).reshape(best_err.shape)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        dev = self.lo.device
        return best_lo.reshape(self.lo.shape).to(dev), best_hi.reshape(self.hi.shape).to(dev)


def _fq_rows(v: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    qmin, qmax = scheme.qmin, scheme.qmax
    return (torch.clamp(torch.round(v / scale) + zp, qmin, qmax) - zp) * scale


def make_observer(name: str, scheme: QScheme, **kwargs: Any) -> Observer:
    """Build the observer registered as ``name`` for ``scheme``.

    Raises:
        ConfigError: unknown name, or a per-tensor-only observer asked for channels/groups.
    """
    if name not in OBSERVERS:
        raise ConfigError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}")
    cls = get_method("quantize.observer", name)
    return cls(scheme, **kwargs)
