"""Fake-quantization modules: STE fake-quant with an observer, and LSQ / LSQ+ learned step sizes.

:class:`FakeQuantize` keeps its scale and zero point as buffers (saved in the state dict). While
``observing`` it feeds every tensor to its observer; :meth:`FakeQuantize.freeze` turns what the
observer saw into scale / zero point. In ``qat`` mode it observes and refreshes them on every
training step (moving average). Gradients flow straight through the rounding (STE) and are zero
where values are clipped.

:class:`LSQFakeQuantize` learns the step size (Esser et al. 2020, gradient scaled by
``1 / sqrt(numel * qmax)``); with ``learn_offset=True`` it also learns an offset (LSQ+, Bhalgat
et al. 2020), initialised from the min-max range.

Example:
    >>> import torch
    >>> from torchslim.quantize.fake_quant import LSQFakeQuantize
    >>> from torchslim.quantize.primitives import QScheme
    >>> fq = LSQFakeQuantize(QScheme(bits=4))
    >>> x = torch.randn(64, requires_grad=True)
    >>> fq(x).pow(2).sum().backward()
    >>> fq.scale.grad is not None and x.grad is not None
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from torchslim.quantize.observers import Observer, make_observer
from torchslim.quantize.primitives import QScheme, fake_quantize, minmax, qrange, unview, view

__all__ = ["FakeQuantize", "LSQFakeQuantize", "qparam_shape"]


def qparam_shape(scheme: QScheme, tensor_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """Shape of the scale of a tensor of ``tensor_shape`` under ``scheme``."""
    if scheme.granularity == "tensor" or tensor_shape is None:
        return ()
    v = view(torch.empty(tensor_shape, device="meta"), scheme)
    return (*v.shape[:-1], 1)


class FakeQuantize(nn.Module):
    """Observer-driven fake-quant with the straight-through estimator.

    Args:
        scheme: how to quantize.
        observer: a registered observer name (``"minmax"``, ``"mse"``, ...).
        shape: the shape of the tensor it quantizes (needed for per-channel / per-group scales).
        observer_kwargs: extra arguments of the observer.
    """

    def __init__(self, scheme: QScheme, observer: str = "minmax", shape: tuple[int, ...] | None = None, **observer_kwargs: Any) -> None:
        super().__init__()
        self.scheme = scheme
        self.observer_name = observer
        self.observer_kwargs = observer_kwargs
        self.observer: Observer = make_observer(observer, scheme, **observer_kwargs)
        pshape = qparam_shape(scheme, shape)
        self.register_buffer("scale", torch.ones(pshape))
        self.register_buffer("zero_point", torch.zeros(pshape))
        self.observing = False
        self.enabled = True
        self.qat = False  # observe + refresh qparams on every training forward
        self.per_step = False  # in QAT, forget earlier steps (weights: range of the current weights)

    def reset_observer(self) -> None:
        self.observer = make_observer(self.observer_name, self.scheme, **self.observer_kwargs)

    @torch.no_grad()
    def freeze(self) -> None:
        """Set scale and zero point from what the observer saw."""
        scale, zp = self.observer.qparams()
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zp.reshape(self.zero_point.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing or (self.qat and self.training):
            if self.per_step and not self.observing:
                self.reset_observer()
            self.observer.update(x.detach())
            if self.qat and self.training:
                self.freeze()
        if self.observing or not self.enabled:
            return x
        return fake_quantize(x, self.scale, self.zero_point, self.scheme)

    def extra_repr(self) -> str:
        s = self.scheme
        return f"bits={s.bits}, {s.granularity}, {'sym' if s.symmetric else 'asym'}, observer={self.observer_name}"


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    return (x - x * g).detach() + x * g


class LSQFakeQuantize(nn.Module):
    """Learned step size quantization (LSQ); ``learn_offset=True`` gives LSQ+.

    The step (``scale``, a Parameter) is initialised on the first forward: LSQ uses
    ``2 mean|x| / sqrt(qmax)``, LSQ+ the min-max range. The offset of LSQ+ is a float learned
    zero point.
    """

    def __init__(self, scheme: QScheme, shape: tuple[int, ...] | None = None, learn_offset: bool = False) -> None:
        super().__init__()
        self.scheme = scheme
        self.learn_offset = learn_offset
        pshape = qparam_shape(scheme, shape)
        self.scale = nn.Parameter(torch.ones(pshape))
        self.offset = nn.Parameter(torch.zeros(pshape), requires_grad=learn_offset)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.enabled = True

    @torch.no_grad()
    def _init(self, x: torch.Tensor) -> None:
        qmin, qmax = qrange(self.scheme)
        if self.learn_offset:
            lo, hi = minmax(x, self.scheme)
            s = torch.clamp((hi - lo) / (qmax - qmin), min=1e-8)
            self.scale.copy_(s.reshape(self.scale.shape))
            self.offset.copy_((lo - qmin * s).reshape(self.offset.shape))
        else:
            v = view(x, self.scheme).abs().float()
            m = v.mean(dim=-1, keepdim=True).reshape(self.scale.shape) if self.scale.dim() else v.mean()
            self.scale.copy_(torch.clamp(2 * m / math.sqrt(max(qmax, 1)), min=1e-8))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            self._init(x.detach())
        qmin, qmax = qrange(self.scheme)
        v = view(x, self.scheme)
        per = v.shape[-1] if self.scale.dim() else v.numel()
        g = 1.0 / math.sqrt(per * max(qmax, 1))
        s = _grad_scale(self.scale, g)
        b = _grad_scale(self.offset, g) if self.learn_offset else self.offset.detach()
        q = torch.clamp((v - b) / s, qmin, qmax)
        q = q + (torch.round(q) - q).detach()
        return unview(q * s + b, x.shape, self.scheme)

    @torch.no_grad()
    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Equivalent affine scale and (rounded) zero point."""
        zp = torch.round(-self.offset / self.scale)
        return self.scale.detach().clone(), zp

    def extra_repr(self) -> str:
        return f"bits={self.scheme.bits}, {self.scheme.granularity}, {'LSQ+' if self.learn_offset else 'LSQ'}"
