"""Quantization-aware training: ``qat_prepare_`` -> train with any loop / schedule -> ``qat_convert_``.

``qat_prepare_`` builds the static-quantization structure (BN folded, weight and input
fake-quant) with quantizers in training mode: observer-based ones refresh their ranges on every
training forward (weights: the current weights' range; activations: the configured observer,
``moving_average`` by default), LSQ / LSQ+ ones learn their step sizes by gradient descent. In
eval mode the frozen ranges are used, so ``ts.evaluate`` during training sees the quantized model.
Train with :func:`torchslim.fit` (or your own loop, distillation included), then call
``qat_convert_`` to freeze every range.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.quantize import qat_prepare_, qat_convert_
    >>> model = ts.create_model("zoo:lenet300")
    >>> plan = qat_prepare_(model, bits=4)
    >>> _ = model(torch.randn(8, 1, 28, 28)).sum().backward()  # one training step's forward/backward
    >>> qat_convert_(model)["frozen"]
    6
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from torchslim.errors import ConfigError
from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize

__all__ = ["qat_prepare_", "qat_convert_", "set_qat_mode_"]


def set_qat_mode_(model: nn.Module, on: bool, observed: bool = False) -> int:
    """Switch every observer-based quantizer's QAT refresh on or off; return how many were switched."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantize):
            m.qat = on
            m.per_step = not name.endswith("input_quant")
            if on and not observed and name.endswith("input_quant"):
                m.reset_observer()
            n += 1
    return n


def qat_prepare_(
    model: nn.Module, config: Any = None, *, calibration: Iterable[Any] | None = None, **overrides: Any
) -> Any:
    """Insert trainable fake-quant (mode ``"qat"``); returns the :class:`~torchslim.quantize.QuantPlan`.

    Args:
        config: a :class:`~torchslim.quantize.QuantConfig` (its mode is forced to ``"qat"``);
            default: 8-bit weights and activations with the ``moving_average`` observer.
        calibration: optional batches that initialise the activation ranges before training.
        overrides: QuantConfig fields to change (``bits=4``, ``lsq="lsq"``...).
    """
    from dataclasses import replace

    from torchslim.quantize.api import QuantConfig, quantize_

    if config is None:
        config = QuantConfig(mode="qat", observer="moving_average", **overrides)
    elif not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig; got {type(config).__name__}")
    else:
        config = replace(config, mode="qat", **overrides)
    return quantize_(model, config, calibration=calibration)


def qat_convert_(model: nn.Module) -> dict[str, Any]:
    """Freeze every quantizer (ranges and learned steps stay as trained); the model is then static.

    Returns ``{"frozen": number of quantizers}``.

    Raises:
        ConfigError: the model has no QAT quantizers.
    """
    quantizers = [m for m in model.modules() if isinstance(m, (FakeQuantize, LSQFakeQuantize))]
    if not quantizers:
        raise ConfigError("the model has no fake-quant modules; call qat_prepare_ first")
    set_qat_mode_(model, False)
    for m in quantizers:
        if isinstance(m, LSQFakeQuantize):
            m.scale.requires_grad_(False)
            m.offset.requires_grad_(False)
    return {"frozen": len(quantizers)}
