"""Quantization-aware training: ``qat_prepare_`` -> train with any loop / schedule -> ``ts.finalize_``.

``qat_prepare_`` builds the static-quantization structure (BN folded, weight and input
fake-quant) with quantizers in training mode: observer-based ones refresh their ranges on every
training forward (weights: the current weights' range; activations: the configured observer,
``moving_average`` by default), LSQ / LSQ+ ones learn their step sizes by gradient descent. In
eval mode the frozen ranges are used, so ``ts.evaluate`` during training sees the quantized model.
Train with :func:`torchslim.fit` (or your own loop, distillation included), then call
``ts.finalize_`` to freeze every range and turn every int8 layer into an integer module
(:mod:`torchslim.quantize.int8`: int8 weights, oneDNN kernels under
:func:`torchslim.quantize.compile`; other bit widths stay fake-quant). ``qat_convert_`` is its
deprecated name.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.quantize import qat_prepare_
    >>> model = ts.create_model("zoo:lenet300")
    >>> plan = qat_prepare_(model, bits=4)
    >>> _ = model(torch.randn(8, 1, 28, 28)).sum().backward()  # one training step's forward/backward
    >>> ts.finalize_(model)["qat"]
    {'frozen': 6, 'integer': 0}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from torchslim.data import batches_of
from torchslim.errors import ConfigError
from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize

__all__ = ["qat_prepare_", "qat_convert_", "freeze_qat_", "set_qat_mode_"]


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
    model: nn.Module,
    config: Any = None,
    *,
    data: Any = None,
    calibration: Iterable[Any] | None = None,
    **overrides: Any,
) -> Any:
    """Insert trainable fake-quant (mode ``"qat"``); returns the :class:`~torchslim.quantize.QuantPlan`.

    Args:
        config: a :class:`~torchslim.quantize.QuantConfig` (its mode is forced to ``"qat"``);
            default: 8-bit weights and activations with the ``moving_average`` observer.
        data: the batches (a ``DataBundle``: its train split; or any iterable of batches);
            ``calibration=`` is its old name, still accepted.
        calibration: optional batches that initialise the activation ranges before training.
        overrides: QuantConfig fields to change (``bits=4``, ``lsq="lsq"``...).
    """
    calibration = batches_of(data, calibration, where="qat_prepare_")
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
    """Deprecated: ``ts.finalize_(model)`` (or ``ts.finalize_(model, kinds=["qat"])``).

    Freezes every quantizer, turns the int8 layers into integer modules and returns
    ``{"frozen": number of quantizers, "integer": number of integer layers}``.

    Raises:
        ConfigError: the model has no QAT quantizers.
    """
    import warnings

    warnings.warn("qat_convert_ is deprecated, use ts.finalize_(model) (kinds=['qat'] for the quantizers only); "
                  "qat_convert_ goes in the next release", DeprecationWarning, stacklevel=2)
    done = freeze_qat_(model)
    if done is None:
        raise ConfigError("the model has no fake-quant modules; call qat_prepare_ first")
    return done


def freeze_qat_(model: nn.Module) -> dict[str, Any] | None:
    """Freeze every quantizer (ranges and learned steps stay as trained), then make every int8
    layer an integer module (:func:`torchslim.quantize.int8.to_int8_`, the same integers the
    frozen fake-quant computes with); the model is then static int8 and no longer trains.

    This is the ``"qat"`` finalizer of ``ts.finalize_``. The conversion is recorded on the model
    (a ``"quantize"`` record with ``action="int8"``) so ``ts.save`` / ``ts.load`` rebuild it.

    Returns:
        ``{"frozen": number of quantizers, "integer": number of layers made integer}``, or None
        when the model has no QAT quantizers.
    """
    quantizers = [m for m in model.modules() if isinstance(m, (FakeQuantize, LSQFakeQuantize))]
    if not quantizers:
        return None
    set_qat_mode_(model, False)
    for m in quantizers:
        if isinstance(m, LSQFakeQuantize):
            m.scale.requires_grad_(False)
            m.offset.requires_grad_(False)
    from torchslim.quantize.api import INT8_ACTION, KIND
    from torchslim.quantize.int8 import to_int8_

    names = [n for n, m in model.named_modules() if hasattr(m, "input_quant") and hasattr(m, "parametrizations")]
    done, _ = to_int8_(model, names, bake_other_edits=False)  # masks / codebooks: their own finalizer
    if done:
        from torchslim._modelinfo import record_plan

        record_plan(model, {"kind": KIND, "action": INT8_ACTION, "integer": done})
    return {"frozen": len(quantizers), "integer": len(done)}


def _register_finalizer() -> None:
    from torchslim._finalize import register_finalizer

    register_finalizer("qat", freeze_qat_, family="quantize", order=10)


_register_finalizer()
