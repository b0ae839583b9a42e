"""SmoothQuant-style scale migration for Linear layers (Xiao et al. 2022).

Transformer activations have a few input channels with outliers tens of times larger than the
rest; a per-tensor activation scale set by them leaves the other channels with a handful of
integer levels. SmoothQuant moves that difficulty into the weights, which are quantized per
output channel and tolerate it: for input channel ``j`` of a Linear layer,

    s_j = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha),   X' = X / s,   W' = W * s

so ``X' W'^T == X W^T`` exactly in float. ``max|X_j|`` comes from the calibration batches, and
the weight is rescaled in place. The division goes where it is free if it can: into the weight
and bias of a LayerNorm / RMSNorm whose output only these layers read (pre-LN transformers), a
fold checked on the model's output. Otherwise it is a per-channel ``smooth_scale`` buffer
applied by a forward pre-hook just before the input quantizer (an elementwise Mul in the ONNX
graph), which works whatever produces the Linear's input. Layers reading the same tensor share
one scale (one Mul in the graph after ONNX export merges the identical ones).

In ``dynamic`` mode the activation range is measured per batch at run time, so an outlier
channel costs every other channel its resolution on every batch; smoothing helps there as much
as in static mode (all-MiniLM-L6-v2 in ``benchmarks/quantize_minilm.py``).

Example:
    >>> import torch
    >>> from torchslim.quantize import QuantConfig, quantize_
    >>> _ = torch.manual_seed(0)
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
) -> tuple[dict[str, torch.Tensor], list[list[str]], dict[str, torch.Tensor], dict[str, str]]:
    """Per-input-channel ``max|X|`` of every layer over the calibration batches, and the groups
    of layers that read the very same input tensor (siblings such as Q, K and V), found on the
    first batch: siblings get one shared scale, so their divisions are one and the same. Also
    which normalization module's output each layer reads as it is (``{layer: norm}``), where
    the division could be folded."""
    from torchslim.quantize.ptq import run_calibration

    amax: dict[str, torch.Tensor] = {}
    first: list[tuple[torch.Tensor, str]] = []  # references held for the first batch only (no id reuse)
    norm_out: list[tuple[torch.Tensor, str]] = []
    state = {"first": True}

    def norm_hook(name: str):
        def post(mod: nn.Module, args: Any, out: Any) -> None:
            if state["first"] and isinstance(out, torch.Tensor):
                norm_out.append((out, name))
        return post

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
    handles += [m.register_forward_hook(norm_hook(n)) for n, m in model.named_modules() if _foldable_norm(m)]
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
    producer = {}
    for t, name in first:
        for u, norm in norm_out:
            if u is t and counts.get(name) == 1:
                producer[name] = norm
    return amax, out, sample, producer


def _foldable_norm(module: nn.Module) -> bool:
    """A LayerNorm / RMSNorm-like module (by class name: ``nn.LayerNorm``, ``nn.RMSNorm``,
    transformers' ``LlamaRMSNorm``, ...) with a per-channel ``weight`` (and ``bias``) that could
    absorb a per-channel division; whether it really does is checked on the model's output."""
    name = type(module).__name__
    if not (name.endswith("LayerNorm") or name.endswith("RMSNorm")):
        return False
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or not w.is_floating_point():
        return False
    return b is None or (isinstance(b, torch.Tensor) and b.shape == w.shape)


def _output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach().float()] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def _model_outputs(model: nn.Module, loader: Iterable[Any]) -> list[torch.Tensor]:
    """The model's floating outputs on the first batch of ``loader``."""
    from torchslim.quantize.ptq import run_calibration

    got: list[torch.Tensor] = []
    h = model.register_forward_hook(lambda mod, args, out: got.extend(_output_tensors(out)))
    try:
        run_calibration(model, loader, 1)
    finally:
        h.remove()
    return got


def _same_outputs(ref: list[torch.Tensor], now: list[torch.Tensor], tol: float = 1e-4) -> bool:
    if len(ref) != len(now) or not ref:
        return False
    for a, b in zip(ref, now):
        if a.shape != b.shape:
            return False
        if float((a - b).norm()) > tol * max(float(a.norm()), 1e-12):
            return False
    return True


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
) -> tuple[list[str], dict[str, str]]:
    """Migrate activation outliers of every float ``nn.Linear`` in ``layers`` into its weight.

    Call before the quantizers are attached. Outputs are unchanged in float (up to rounding).
    Layers that read the same input tensor (Q, K and V of an attention block) share one scale,
    computed from the largest weight of the group in each input channel, as in the paper.

    Where the layers read a LayerNorm / RMSNorm's output as it is (pre-LN transformers: ViT's
    ``norm1 -> qkv``, Llama's ``input_layernorm -> q/k/v_proj``), the division is folded into
    the norm's weight and bias, as the paper does, and costs nothing at run time; the fold is
    kept only if the model's output on the first calibration batch is unchanged (a norm whose
    output also feeds something else, like BERT's post-LN residual, fails that check and the
    fold is undone). Such a group is smoothed whenever that lowers its simulated int8 error.
    Elsewhere the division is a multiply before the layer (:func:`attach_smoothing_`), kept only
    if it divides the group's simulated int8 error (on the first calibration batch) by at least
    ``min_gain`` (3, about 5 dB): each such multiply costs run time, and a layer that gains
    little is not worth it (all-MiniLM-L6-v2: the default smooths 25 of 36 layers, two fifths
    of the multiplied elements of smoothing all, for 0.996 embedding cosine against 0.998;
    ``min_gain=0`` smooths every layer).

    Returns:
        ``(multiplied, folded)``: the layers given an input multiply (in model order), and
        ``{layer: norm}`` for those whose division was folded into a norm.
    """
    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    if not linears:
        return [], {}
    amax, groups, sample, producer = _input_absmax(model, linears, loader, batches)
    probe: list[Any] = []  # folds are checked on one fixed batch (a shuffling loader differs per pass)
    reference: list[torch.Tensor] = []
    if producer:
        probe = [next(iter(loader))]
        reference = _model_outputs(model, probe)
    done: list[str] = []
    folded: dict[str, str] = {}
    for group in groups:
        wmax = torch.stack([linears[n].weight.detach().abs().amax(0).float() for n in group]).amax(0)
        a = torch.stack([amax[n] for n in group]).amax(0).to(wmax.device)
        s = a.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)
        s = torch.where((a > 0) & (wmax > 0), s, torch.ones_like(s))
        gain = float("inf")
        x = sample.get(group[0])
        if x is not None:
            w = torch.cat([linears[n].weight.detach().float() for n in group]).to(x.device)
            sx = s.to(x.device)
            gain = _int8_error(x, w) / max(_int8_error(x / sx, w * sx), 1e-30)
        norm = producer.get(group[0])
        if norm is not None and all(producer.get(n) == norm for n in group) and (gain > 1 or min_gain == 0):
            if _fold_into_norm(model, model.get_submodule(norm), [linears[n] for n in group], s, reference, probe):
                folded.update({n: norm for n in group})
                continue
        if min_gain > 0 and gain < min_gain:
            continue  # the multiply would cost more run time than the accuracy is worth
        for n in group:
            m = linears[n]
            m.weight.mul_(s.to(m.weight.dtype).unsqueeze(0))
            attach_smoothing_(m, s.to(m.weight.dtype).clone())
            done.append(n)
    return sorted(done, key=list(linears).index), folded


@torch.no_grad()
def _fold_into_norm(
    model: nn.Module, norm: nn.Module, group: list[nn.Linear], s: torch.Tensor, reference: list[torch.Tensor], probe: list[Any]
) -> bool:
    """Divide ``norm``'s weight (and bias) by ``s`` and multiply the group's weights by it; keep
    that only if the model's outputs on the ``probe`` batch still match ``reference``."""
    params = [norm.weight] + ([norm.bias] if getattr(norm, "bias", None) is not None else [])
    saved = [p.detach().clone() for p in params] + [m.weight.detach().clone() for m in group]
    for p in params:
        p.div_(s.to(p.device, p.dtype))
    for m in group:
        m.weight.mul_(s.to(m.weight.device, m.weight.dtype).unsqueeze(0))
    if _same_outputs(reference, _model_outputs(model, probe)):
        return True
    for p, old in zip(params + [m.weight for m in group], saved):
        p.copy_(old)
    return False
