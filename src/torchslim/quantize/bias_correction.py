"""Empirical bias correction for static PTQ (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Quantizing a layer's weights (and its input) shifts the mean of its output: with weight error
``eps = W_q - W``, ``E[y_q] - E[y] = eps E[x]``, which is not zero when the input has a non-zero
mean (after ReLU it always has). The empirical variant measures that shift on calibration
batches and subtracts it from the bias, per output channel:

    bias <- bias + E[layer_float(x)] - E[layer_quantized(x)]

where ``x`` is the layer's input in the quantized model, ``layer_float`` runs it with the float
weights and no input quantization, and the mean is over the batch and every spatial / token
position. All layers are measured in one pass over the batches, then corrected together. A layer
without a bias gets one (recorded in the plan as ``bias_added`` so ``ts.load`` can rebuild it).

Example:
    >>> import torch
    >>> from torchslim.quantize import QuantConfig, quantize_
    >>> _ = torch.manual_seed(0)
    >>> m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> calib = [torch.rand(32, 16) + 1.0 for _ in range(4)]
    >>> plan = quantize_(m, QuantConfig(mode="static", bits=4, bias_correction=True), calibration=calib)
    >>> sorted(plan.bias_corrected)
    ['0', '2']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize

__all__ = ["bias_correct_", "add_missing_biases_"]


def _weight_quantizer(module: nn.Module) -> nn.Module | None:
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return None
    return next((p for p in plist if isinstance(p, (FakeQuantize, LSQFakeQuantize))), None)


def _channel_mean(y: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Per-output-channel mean: channels are dim 1 for convs, the last dim for Linear."""
    y = y.detach().double()
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1]).mean(0)
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(1)


def add_missing_biases_(model: nn.Module, names: Iterable[str]) -> None:
    """Give the named layers a zero bias (structure only; used by the correction and by replay)."""
    for n in names:
        m = model.get_submodule(n)
        if m.bias is None:
            out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            m.bias = nn.Parameter(torch.zeros(out, device=m.weight.device, dtype=m.weight.dtype))


@torch.no_grad()
def bias_correct_(model: nn.Module, layers: dict[str, nn.Module], loader: Iterable[Any], batches: int) -> tuple[list[str], list[str]]:
    """Correct the bias of every quantized layer in ``layers`` by its mean output shift.

    ``model`` must already be quantized and calibrated (:func:`torchslim.quantize.ptq.attach_quantizers_`
    and :func:`~torchslim.quantize.ptq.calibrate_`). Runs up to ``batches`` batches of ``loader``.

    Returns:
        ``(corrected layer names, names of layers that got a new bias)``.

    Raises:
        InputShapeError: a batch does not fit the model.
    """
    from torchslim.quantize.ptq import run_calibration

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    inputs: dict[str, torch.Tensor] = {}
    busy = [False]
    handles = []

    def pre(name: str):
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if not busy[0] and args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0]
        return hook

    def post(name: str):
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if busy[0] or name not in inputs or not isinstance(out, torch.Tensor):
                return
            x = inputs.pop(name)
            wq, iq = _weight_quantizer(mod), getattr(mod, "input_quant", None)
            switched = [q for q in (wq, iq) if q is not None and q.enabled]
            busy[0] = True
            try:
                for q in switched:
                    q.enabled = False
                ref = mod(x)
            finally:
                for q in switched:
                    q.enabled = True
                busy[0] = False
            diff = _channel_mean(ref, mod) - _channel_mean(out, mod)
            sums[name] = sums.get(name, 0) + diff
            counts[name] = counts.get(name, 0) + 1
        return hook

    for name, m in layers.items():
        handles.append(m.register_forward_pre_hook(pre(name), prepend=True))
        handles.append(m.register_forward_hook(post(name)))
    try:
        run_calibration(model, loader, batches)
    finally:
        for h in handles:
            h.remove()
    added = [name for name in sums if layers[name].bias is None]
    add_missing_biases_(model, added)
    for name, total in sums.items():
        b = layers[name].bias
        b.add_((total / counts[name]).to(b.dtype))
    return sorted(sums), added
