"""HQQ-style calibration-free weight quantization: half-quadratic optimization of the zero points.

Round-to-nearest picks each group's scale and zero point from its minimum and maximum, which lets
one outlier decide the grid of the whole group. HQQ (Badri & Shaji 2023, "Half-Quadratic
Quantization") keeps the min-max scale but moves the zero point ``z`` of every group to minimize
an ``l_p`` norm (``p < 1``) of the weight error ``W - (Q - z) s``; a sparsity-promoting norm lets a
few weights (the outliers) carry a large error so that the bulk is represented well. The problem
is split with an auxiliary error variable ``E`` and solved by alternating two closed-form steps
(half-quadratic splitting), with the penalty ``beta`` growing by ``kappa`` each round:

1. ``E = shrink_p(W - (Q - z) s, beta)``, the generalized soft-threshold
   ``sign(x) max(|x| - |x|^(p-1) / beta, 0)`` (the proximal step of ``|x|^p``);
2. ``z = mean_group(Q - (W - E) / s)``, then ``Q = clamp(round(W / s + z))``.

No data is needed: it is a weight-only method, seconds for a 135M-parameter model on a CPU. The
zero points are not integers, so the result is asymmetric unsigned storage (int4 0..15) with fp16
zero points, the :class:`~torchslim.quantize.weight_only.QuantizedLinear` layout that
``QuantConfig(mode="weight-only", symmetric=False)`` describes; the iterate with the smallest
mean absolute error (computed with the fp16 zero points actually stored) is kept, so the result is
never worse than min-max rounding in that measure.

Example:
    >>> import torch
    >>> from torchslim.quantize.hqq import hqq_quantize
    >>> from torchslim.quantize.primitives import QScheme
    >>> torch.manual_seed(0) and None
    >>> w = torch.randn(16, 64)
    >>> s = QScheme(bits=4, symmetric=False, signed=False, granularity="group", group_size=32)
    >>> ints, scale, zp = hqq_quantize(w, s)
    >>> ints.shape, scale.shape, int(ints.min()) >= 0 and int(ints.max()) <= 15
    (torch.Size([16, 64]), torch.Size([16, 2, 1]), True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.quantize.api import QuantConfig, QuantPlan
from torchslim.quantize.gptq import (
    _group_size,
    check_weight_only,
    dequantize_grouped,
    finish_weight_only,
    weight_only_layers,
)
from torchslim.quantize.primitives import QScheme, choose_qparams, qrange
from torchslim.quantize.weight_only import QuantizedLinear

__all__ = ["hqq_", "hqq_quantize"]


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal operator of ``|x|^p / beta`` (generalized soft threshold)."""
    mag = x.abs()
    return torch.sign(x) * torch.relu(mag - mag.clamp_min(1e-8).pow(p - 1) / beta)


@torch.no_grad()
def hqq_quantize(
    weight: torch.Tensor, scheme: QScheme, *, iters: int = 20, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ one ``(out, in)`` weight: ``(ints, scale, zero_point)`` in the layout of
    :func:`~torchslim.quantize.gptq.gptq_quantize` (``scale``/``zero_point`` ``(out, groups, 1)``,
    the zero points fp16-representable floats).

    Raises:
        ConfigError: a symmetric scheme (its zero point is fixed), bad ``iters`` / ``p`` / ``beta`` / ``kappa``.
    """
    if scheme.symmetric:
        raise ConfigError("HQQ optimizes the zero points: it needs an asymmetric scheme (symmetric=False)")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"iters must be an integer >= 0; got {iters!r}")
    if not 0 < p <= 1 or beta <= 0 or kappa < 1:
        raise ConfigError(f"HQQ needs 0 < p <= 1, beta > 0 and kappa >= 1; got p={p}, beta={beta}, kappa={kappa}")
    rows, cols = weight.shape
    gs = _group_size(scheme, cols)
    qmin, qmax = qrange(scheme)
    w = weight.detach().float().reshape(rows, cols // gs, gs)
    scale, zp = choose_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), scheme)
    scale = scale.half().float()
    zero = zp.half().float()

    def rounded(z: torch.Tensor) -> tuple[torch.Tensor, float]:
        q = torch.clamp(torch.round(w / scale + z), qmin, qmax)
        return q, float(((q - z) * scale - w).abs().mean())

    q, err = rounded(zero)
    best = (err, q, zero)
    for _ in range(iters):
        e = _shrink(w - (q - zero) * scale, beta, p)
        zero = (q - (w - e) / scale).mean(-1, keepdim=True).half().float()
        q, err = rounded(zero)
        if err < best[0]:
            best = (err, q, zero)
        beta *= kappa
    _, q, zero = best
    return q.reshape(rows, cols).to(torch.int32), scale, zero


def hqq_(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> QuantPlan:
    """Quantize ``model``'s Linear weights with HQQ, in place (weight-only, no calibration data).

    Args:
        model: its Linear layers (as ``config.modules`` / ``config.skip`` select) become
            :class:`~torchslim.quantize.weight_only.QuantizedLinear`.
        config: ``QuantConfig(mode="weight-only", symmetric=False, ...)``; default int4 in groups of
            64, asymmetric (``layer_bits`` sets per-layer bits, ``embeddings`` stores tables too).
        iters, p, beta, kappa: the half-quadratic solver (rounds, the ``l_p`` norm, the initial
            penalty and its growth per round).

    Returns:
        The :class:`~torchslim.quantize.api.QuantPlan` (recorded as a weight-only plan, ``algorithm="hqq"``).

    Raises:
        ConfigError: not weight-only, symmetric, tensor granularity, an already-quantized model, a
            group size that does not divide a layer. The model is unchanged then.
    """
    config = check_weight_only(model, config, "HQQ", default_group=64, symmetric=False)
    if config.symmetric:
        raise ConfigError("HQQ optimizes zero points: QuantConfig.symmetric must be False (asymmetric int4 with zero points)")
    layers, tables = weight_only_layers(model, config, "hqq_")
    results: dict[str, QuantizedLinear] = {}
    for name, module in layers.items():  # every check and every layer first: nothing changes on an error
        scheme = config.weight_scheme(name)
        ints, scale, zp = hqq_quantize(module.weight, scheme, iters=iters, p=p, beta=beta, kappa=kappa)
        results[name] = QuantizedLinear.from_ints(module, ints, scale, zp, scheme)
    extra: dict[str, Any] = {"hqq": {"iters": iters, "p": p, "beta": beta, "kappa": kappa}}
    return finish_weight_only(model, config, layers, tables, results, 0, "hqq", extra)


def weight_error(weight: torch.Tensor, ints: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> float:
    """Mean absolute error of a grouped quantization of ``weight`` (for comparisons)."""
    return float((dequantize_grouped(ints, scale, zp) - weight.float()).abs().mean())
