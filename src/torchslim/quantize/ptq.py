"""Static post-training quantization: BN folding, fake-quant insertion, calibration.

The model keeps its own modules. Each quantized Conv/Linear gets

* a weight fake-quant as a :mod:`torch.nn.utils.parametrize` parametrization (the ``original``
  weight is the same ``Parameter`` as before, so QAT optimizers keep working), and
* an input fake-quant submodule ``input_quant`` applied by a forward pre-hook.

After calibration, ``quantize_`` (static) replaces every int8 layer by its integer module
(:mod:`torchslim.quantize.int8`); the fake-quant stage here is what calibration, bias correction
and QAT work on.

Conv -> BatchNorm pairs are folded first (the BN becomes ``nn.Identity`` and the conv gets the
folded bias), so conv + BN + ReLU run as one quantized conv whose ReLU output is what the next
layer's input quantizer sees: no quantization happens between conv, BN and ReLU.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.quantize.ptq import fold_batchnorm_
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    >>> x = torch.randn(2, 1, 8, 8); y = m(x)
    >>> fold_batchnorm_(m, (x,))
    [('0', '1')]
    >>> torch.allclose(m(x), y, atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim._select import select_modules
from torchslim._utils import evaluating, model_device
from torchslim.errors import ConfigError, InputShapeError
from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize
from torchslim.quantize.primitives import QScheme

__all__ = [
    "QUANTIZABLE",
    "find_conv_bn_pairs",
    "fold_batchnorm_",
    "apply_fold",
    "quantizable_layers",
    "attach_quantizers_",
    "iter_fake_quants",
    "calibrate_",
]

QUANTIZABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def find_conv_bn_pairs(model: nn.Module, example_inputs: Any) -> list[tuple[str, str]]:
    """``(conv, bn)`` name pairs where the BatchNorm consumes the conv's output directly (one forward)."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    handles = []

    def conv_post(mod: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (names[mod], out)

    def bn_pre(mod: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in produced:
            conv_name, t = produced[id(args[0])]
            if t is args[0]:
                pairs.append((conv_name, names[mod]))

    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(m.register_forward_hook(conv_post))
        elif isinstance(m, _BN):
            handles.append(m.register_forward_pre_hook(bn_pre))
    try:
        with evaluating(model), torch.no_grad():
            _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    seen_conv: set[str] = set()
    out = []
    for c, b in pairs:
        if c not in seen_conv:  # a conv feeding two BNs cannot be folded into both
            seen_conv.add(c)
            out.append((c, b))
    return out


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def apply_fold(model: nn.Module, pairs: Sequence[Sequence[str]]) -> None:
    """Structure of a fold only: BNs become Identity and their convs get a bias (for replay)."""
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
        _set(model, bn_name, nn.Identity())


def fold_batchnorm_(model: nn.Module, example_inputs: Any) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a conv into it (eval-mode statistics); return the pairs."""
    pairs = find_conv_bn_pairs(model, example_inputs)
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
            beta = bn.bias if bn.affine else torch.zeros_like(bn.running_var)
            inv = gamma / torch.sqrt(bn.running_var + bn.eps)
            shape = [-1] + [1] * (conv.weight.dim() - 1)
            conv.weight.mul_(inv.reshape(shape))
            b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new_bias = (b - bn.running_mean) * inv + beta
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias.clone())
            else:
                conv.bias.copy_(new_bias)
            _set(model, bn_name, nn.Identity())
    return pairs


def quantizable_layers(
    model: nn.Module, modules: Iterable[str] | None = None, skip: Iterable[str] = (),
    types: tuple[type[nn.Module], ...] = QUANTIZABLE,
) -> dict[str, nn.Module]:
    """Layers of ``types`` (Conv/Linear by default) selected by ``modules`` globs (all by default) minus
    ``skip`` globs.

    Raises:
        ConfigError: nothing selected.
    """
    modules = list(modules) if modules is not None else None
    skip = list(skip)
    found = {name: model.get_submodule(name) for name in select_modules(model, modules, skip, kinds=types)}
    if not found:
        allowed = [n for n, m in model.named_modules() if isinstance(m, types) and n]
        kinds = "Conv/Linear" if types == QUANTIZABLE else "/".join(t.__name__ for t in types)
        raise ConfigError(f"modules={modules!r} skip={skip!r} select no {kinds} layer; the model has: {', '.join(allowed) or 'none'}")
    return found


def _input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor):
        return (module.input_quant(args[0]), *args[1:])
    return None


def attach_quantizers_(
    layers: dict[str, nn.Module],
    weight_scheme: QScheme | dict[str, QScheme],
    act_scheme: QScheme | None,
    *,
    weight_observer: str = "minmax",
    act_observer: str = "minmax",
    lsq: str | None = None,
) -> None:
    """Give each layer a weight fake-quant parametrization and (when ``act_scheme``) an input quantizer.

    ``weight_scheme`` is one scheme or one per layer name. ``lsq`` is ``None`` (observer + STE),
    ``"lsq"`` or ``"lsq+"`` (learned step sizes).
    """
    for name, module in layers.items():
        w = module.weight
        scheme = weight_scheme[name] if isinstance(weight_scheme, dict) else weight_scheme
        if lsq:
            wfq: nn.Module = LSQFakeQuantize(scheme, tuple(w.shape), learn_offset=False)
        else:
            wfq = FakeQuantize(scheme, weight_observer, tuple(w.shape))
        wfq.to(w.device)
        if not lsq:  # weights are known: calibrate their quantizer now
            wfq.observer.update(w.detach())
            wfq.freeze()
        parametrize.register_parametrization(module, "weight", wfq)
        if act_scheme is not None:
            if lsq:
                afq: nn.Module = LSQFakeQuantize(act_scheme, None, learn_offset=(lsq == "lsq+"))
            else:
                afq = FakeQuantize(act_scheme, act_observer, None)
            module.input_quant = afq.to(w.device)
            module.register_forward_pre_hook(_input_hook)


def iter_fake_quants(model: nn.Module, inputs_only: bool = False) -> list[nn.Module]:
    """Every :class:`FakeQuantize` / :class:`LSQFakeQuantize` in the model (input quantizers only if asked)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (FakeQuantize, LSQFakeQuantize)):
            if inputs_only and not name.endswith("input_quant"):
                continue
            out.append(m)
    return out


@torch.no_grad()
def run_calibration(model: nn.Module, loader: Iterable[Any], batches: int) -> int:
    """Run up to ``batches`` batches of ``loader`` through ``model`` in eval mode (modes restored);
    observers, hooks or fake-quant switches set by the caller see them. Returns the batches run.

    Raises:
        InputShapeError: a batch does not fit the model.
    """
    device = model_device(model)
    n = 0
    with evaluating(model):
        for batch in loader:
            if n >= batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            try:
                _call(model, x.to(device) if isinstance(x, torch.Tensor) else x)
            except (RuntimeError, ValueError) as exc:
                raise InputShapeError(
                    f"calibration batch of shape {tuple(getattr(x, 'shape', ()))} does not fit the model: {exc}"
                ) from exc
            n += 1
    return n


def _record_output_range(module: nn.Module, args: Any, out: Any) -> None:
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
        low, high = float(out.min()), float(out.max())
        seen = module._ts_output_range
        if seen is not None:
            low, high = min(seen[0], low), max(seen[1], high)
        # with the weights' fingerprint: a range measured before training (QAT) no longer holds after
        module._ts_output_range = (low, high, weight_fingerprint(module))


@torch.no_grad()
def weight_fingerprint(module: nn.Module) -> tuple[float, float]:
    """Sum and absolute sum of the layer's stored weight (the parametrization's ``original``):
    equal as long as nothing trained or edited it (bias correction's small shift of the bias
    is let through)."""
    w = module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") else module.weight
    flat = w.detach().double().reshape(-1)
    return float(flat.sum()), float(flat.abs().sum())


@torch.no_grad()
def calibrate_(model: nn.Module, loader: Iterable[Any], batches: int) -> int:
    """Run up to ``batches`` batches through the model with input observers on, then freeze them.

    Returns the number of batches used.

    Raises:
        ConfigError: the loader is empty.
        InputShapeError: a batch does not fit the model.
    """
    fqs = [m for m in iter_fake_quants(model, inputs_only=True) if isinstance(m, FakeQuantize)]
    for fq in fqs:
        fq.reset_observer()
        fq.observing = True
    # each quantized layer's output range too: the integer module keeps it, and the compiled
    # int8 path quantizes an output on it where the output feeds a residual add
    owners = [m for m in model.modules() if isinstance(getattr(m, "input_quant", None), FakeQuantize)]
    hooks = []
    for m in owners:
        m._ts_output_range = None
        hooks.append(m.register_forward_hook(_record_output_range))
    try:
        n = run_calibration(model, loader, batches)
    finally:
        for fq in fqs:
            fq.observing = False
        for h in hooks:
            h.remove()
    if n == 0:
        raise ConfigError("the calibration loader gave no batches; static quantization needs at least one")
    for fq in fqs:
        fq.freeze()
    return n
