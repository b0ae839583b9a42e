"""AWQ-style activation-aware weight quantization (Lin et al. 2023), on the layer-wise engine.

A few input channels of a Linear carry much larger activations than the rest; their weights
matter most, yet a group's min-max grid treats them like any other. AWQ scales input channel
``j`` of the weight up by ``s_j`` before quantizing, ``Q(W diag(s))``, and the input down,
``x / s``, so the product is unchanged in float while the salient weights get relatively finer
steps. Here:

* ``s = rms(x)^alpha`` (per input channel, from the calibration activations; normalized so
  ``max(s) min(s) = 1``), ``alpha`` searched on a grid (``alpha = 0`` is plain rounding), and the
  alpha kept is the one with the least *output* error of the quantized layers,
  ``sum_rows dW H dW^T`` with ``H = X^T X`` and ``dW = Q(W diag(s)) diag(s)^-1 - W`` (the
  layer-wise statistics :mod:`torchslim._layerwise` collects; no activations are stored), ``H``
  taken through its top-64 eigenpairs plus the diagonal they leave, so a candidate costs
  ``out x in x 64``;
* Linears that read one input share one ``s`` (``q/k/v`` behind the attention norm, ``gate/up``
  behind the MLP norm), and ``1/s`` is folded into what produces that input: the RMSNorm's
  scale (Gemma's ``1 + w`` convention handled), ``v_proj``'s output rows for ``o_proj`` (with
  grouped-query attention one scale per key/value head channel, the geometric mean over the heads
  that share it) and ``up_proj``'s rows for ``down_proj``, so the model stays a stock
  transformers model with no extra multiply;
* then each group of ``group_size`` weights of every row may clip its range (``clip=True``): the
  shrink ratio in ``{1, 0.95, ..., 0.6}`` with the least error weighted by ``diag(H)`` is kept.

Layers with no known place to fold a scale (``lm_head``, layers of other architectures) get the
clip search only. Storage is the packed :class:`~torchslim.quantize.weight_only.QuantizedLinear`
of ``QuantConfig(mode="weight-only")`` (int4 in groups of 32 by default), recorded as a weight-only
``quantize`` plan (``algorithm="awq"``), so ``ts.save`` / ``ts.load`` reproduce it: the folded norm
scales are ordinary weights.

Example:
    >>> import torch
    >>> from torchslim.quantize import QuantConfig
    >>> from torchslim.quantize.awq import awq_
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    >>> plan = awq_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=32),
    ...             calibration=[torch.randn(64, 64)])
    >>> plan.layers
    ['0', '2']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchslim._layerwise import LayerStats, materialize_batches, run_layerwise
from torchslim.data import batches_of
from torchslim.errors import ConfigError
from torchslim.quantize.api import QuantConfig, QuantPlan
from torchslim.quantize.gptq import (
    _group_size,
    check_weight_only,
    finish_weight_only,
    gptq_quantize,
    restoring_on_error,
    weight_only_layers,
)
from torchslim.quantize.primitives import QScheme, choose_qparams, qrange
from torchslim.quantize.weight_only import QuantizedLinear

#: clipping ratios searched per group (``clip=True``)
CLIP_RATIOS = [1.0 - 0.05 * k for k in range(9)]

__all__ = ["ScaleGroup", "awq_", "clip_quantize", "fold_scale_", "scale_groups"]


@dataclass
class ScaleGroup:
    """Linears that read one input, and where ``1/s`` of their input scale is folded.

    Attributes:
        readers: every Linear that reads the input (all get ``W diag(s)``).
        prev: the module producing the input: an RMSNorm or a Linear.
        prev_kind: ``"norm"``, ``"norm1"`` (Gemma: scale ``1 + w``) or ``"linear"``.
        repeat: for ``prev_kind="linear"``: readers' inputs per ``prev`` output (GQA heads per
            key/value head; 1 otherwise).
        head_dim: the channels of one head (for ``repeat > 1``).
    """

    readers: list[str]
    prev: str
    prev_kind: str
    repeat: int = 1
    head_dim: int = 0


def scale_groups(model: nn.Module) -> list[ScaleGroup]:
    """The scale groups of a transformers decoder (Llama, Mistral, Qwen2, Gemma-3 layouts): per
    block ``q/k/v`` behind the input norm, ``o`` behind ``v``, ``gate/up`` behind the MLP norm,
    ``down`` behind ``up``. Other models: none."""
    out: list[ScaleGroup] = []
    for p, layer in model.named_modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norm_in = getattr(layer, "input_layernorm", None)
        norm_mlp = getattr(layer, "pre_feedforward_layernorm", None) or getattr(layer, "post_attention_layernorm", None)
        if attn is None or mlp is None or norm_in is None or norm_mlp is None:
            continue
        names = {k: getattr(attn, k, None) for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
        names.update({k: getattr(mlp, k, None) for k in ("gate_proj", "up_proj", "down_proj")})
        if not all(isinstance(m, nn.Linear) for m in names.values()):
            continue
        pre = f"{p}." if p else ""
        def kind(norm: nn.Module) -> str | None:
            cls = type(norm).__name__
            if not cls.endswith("RMSNorm") or getattr(norm, "bias", None) is not None:
                return None
            return "norm1" if cls.startswith("Gemma") else "norm"
        k_in, k_mlp = kind(norm_in), kind(norm_mlp)
        n_in = "input_layernorm"
        n_mlp = "pre_feedforward_layernorm" if getattr(layer, "pre_feedforward_layernorm", None) is not None else "post_attention_layernorm"
        if k_in:
            out.append(ScaleGroup([f"{pre}self_attn.{k}" for k in ("q_proj", "k_proj", "v_proj")], f"{pre}{n_in}", k_in))
        v, o = names["v_proj"], names["o_proj"]
        head_dim = int(getattr(attn, "head_dim", 0) or 0)
        if getattr(attn, "v_norm", None) is None and head_dim and o.in_features % v.out_features == 0 \
                and v.out_features % head_dim == 0:
            out.append(ScaleGroup([f"{pre}self_attn.o_proj"], f"{pre}self_attn.v_proj", "linear",
                                   o.in_features // v.out_features, head_dim))
        if k_mlp:
            out.append(ScaleGroup([f"{pre}mlp.gate_proj", f"{pre}mlp.up_proj"], f"{pre}{n_mlp}", k_mlp))
        if names["up_proj"].out_features == names["down_proj"].in_features:
            out.append(ScaleGroup([f"{pre}mlp.down_proj"], f"{pre}mlp.up_proj", "linear"))
    return out


def _sketch(h: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, r)`` with ``H ~ B B^T + diag(r)``: ``H``'s dominant ``rank``-dimensional part (a
    randomized range finder with one power step: ``O(in^2 rank)``, where a full eigendecomposition
    costs ``O(in^3)``) and the diagonal it leaves, so the output error ``tr(dW H dW^T)`` of a
    candidate costs ``out x in x rank`` instead of ``out x in x in``."""
    n = h.shape[0]
    h = h.float()
    if n <= rank:
        vals, vecs = torch.linalg.eigh(h.double())
        b = (vecs * vals.clamp_min(0).sqrt()).float()
        return b, torch.zeros(n)
    g = torch.Generator().manual_seed(seed)
    y = h @ (h @ torch.randn(n, rank, generator=g))
    q, _ = torch.linalg.qr(y)
    vals, u = torch.linalg.eigh((q.T @ h @ q).double())
    b = (q.double() @ u * vals.clamp_min(0).sqrt()).float()
    rest = (torch.diagonal(h) - (b * b).sum(1)).clamp_min(0)
    return b, rest


def _output_error(w: torch.Tensor, dq: torch.Tensor, sketch: tuple[torch.Tensor, torch.Tensor]) -> float:
    d = (dq - w).float()
    b, rest = sketch
    return float(((d @ b) ** 2).sum() + (d * d * rest).sum())


@torch.no_grad()
def clip_quantize(weight: torch.Tensor, hdiag: torch.Tensor, scheme: QScheme, ratios: Iterable[float] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``(out, in)`` ``weight`` group-wise, each group's range shrunk by the ratio with the
    least squared error weighted by ``hdiag`` (``(in,)``, the input energy per channel):
    ``(ints, scale, zero_point)`` as :func:`~torchslim.quantize.gptq.rtn_quantize` returns them.
    ``ratios=[1.0]`` is round-to-nearest (the default tries 1.0, 0.95, ..., 0.6)."""
    rows, cols = weight.shape
    gs = _group_size(scheme, cols)
    qmin, qmax = qrange(scheme)
    ratios = CLIP_RATIOS if ratios is None else list(ratios)
    w = weight.detach().float().reshape(rows, cols // gs, gs)
    hd = hdiag.float().reshape(1, cols // gs, gs)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)

    def params(r: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zp = choose_qparams(lo * r, hi * r, scheme)
        return scale.half().float(), zp

    best_r = torch.ones_like(lo)
    if len(ratios) > 1:
        best_err = torch.full_like(lo, float("inf"))
        for r in ratios:
            scale, zp = params(r)
            q = torch.clamp(torch.round(w / scale) + zp, qmin, qmax)
            err = (((q - zp) * scale - w).square_() * hd).sum(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(lo, r), best_r)
    scale, zp = params(best_r)
    q = torch.clamp(torch.round(w / scale) + zp, qmin, qmax)
    return q.reshape(rows, cols).to(torch.int32), scale, zp


def _rms(stats: LayerStats) -> torch.Tensor:
    return (stats.sq / max(stats.rows, 1)).sqrt()


def _constrain(s: torch.Tensor, group: ScaleGroup) -> torch.Tensor:
    """One scale per ``prev`` output channel: the geometric mean over the heads that share it."""
    if group.repeat <= 1:
        return s
    v = s.log().reshape(-1, group.repeat, group.head_dim).mean(1, keepdim=True)
    return v.expand(-1, group.repeat, -1).reshape(-1).exp()


@torch.no_grad()
def fold_scale_(model: nn.Module, group: ScaleGroup, s: torch.Tensor,
                quantized: dict[str, QuantizedLinear] | None = None) -> None:
    """Scale the readers' input channels by ``s`` and fold ``1/s`` into ``group.prev`` (the float
    function of the model is unchanged). A ``prev`` Linear already in ``quantized`` absorbs ``1/s``
    in its fp16 row scales (its integers stay as they are)."""
    prev = model.get_submodule(group.prev)
    if group.prev_kind == "norm":
        prev.weight.div_(s.to(prev.weight.dtype))
    elif group.prev_kind == "norm1":
        prev.weight.copy_(((1.0 + prev.weight.double()) / s.double() - 1.0).to(prev.weight.dtype))
    else:
        s_out = s.reshape(-1, group.repeat, group.head_dim)[:, 0].reshape(-1) if group.repeat > 1 else s
        if quantized is not None and group.prev in quantized:
            qp = quantized[group.prev]
            shape = (-1,) + (1,) * (qp.scale.dim() - 1)
            qp.scale.copy_((qp.scale.float() / s_out.reshape(shape)).half())
            prev.weight.copy_(qp.dequantized_weight().to(prev.weight.dtype))
        else:
            prev.weight.div_(s_out.unsqueeze(1).to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s_out.to(prev.bias.dtype))
    for r in group.readers:
        lin = model.get_submodule(r)
        lin.weight.mul_(s.unsqueeze(0).to(lin.weight.dtype))


def awq_(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    data: Any = None,
    calibration: Iterable[Any] | None = None,
    grid: int = 10,
    clip: bool = True,
    sequential: bool = True,
    rank: int = 64,
    rounding: str = "clip",
) -> QuantPlan:
    """Quantize ``model``'s Linear weights with activation-aware scaling, in place (weight-only).

    Args:
        model: its Linear layers (as ``config.modules`` / ``config.skip`` select) become
            :class:`~torchslim.quantize.weight_only.QuantizedLinear`; norm scales and ``v_proj`` /
            ``up_proj`` rows absorb the input scales (see the module doc).
        config: a ``QuantConfig(mode="weight-only", ...)``; default int4 in groups of 32.
        data: the batches (a ``DataBundle``: its train split; or any iterable of batches).
        calibration: batches of model inputs (e.g. token windows ``(batch, tokens)``).
        grid: alphas searched: ``0, 1/grid, ..., (grid-1)/grid``.
        clip: search a clipping ratio per group after scaling.
        rounding: how the scaled weights are rounded: ``"clip"`` (to nearest, after the clip
            search) or ``"gptq"`` (GPTQ's error compensation with the scaled inputs' Hessian).
        rank: the output error of each candidate is measured through the top-``rank`` eigenpairs
            of ``H`` plus the diagonal they leave (exact when ``rank`` >= the input width).
        sequential: measure each group of layers after the earlier ones were quantized (the
            engine's setting); ``False`` measures every layer once on the float model (one pass
            over the calibration data: much faster on a deep model).

    Returns:
        The :class:`~torchslim.quantize.api.QuantPlan`, recorded with ``algorithm="awq"`` and the
        alpha chosen per group.

    Raises:
        ConfigError: not weight-only, tensor granularity, an already-quantized model, a group size
            that does not divide a layer, no calibration data, a bad ``grid``. The model is unchanged then.
    """
    calibration = batches_of(data, calibration, where="awq_")
    config = check_weight_only(model, config, "AWQ", default_group=32)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ConfigError(f"grid must be a positive integer (alphas searched); got {grid!r}")
    if rounding not in ("clip", "gptq"):
        raise ConfigError(f"rounding must be 'clip' or 'gptq'; got {rounding!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer; got {rank!r}")
    layers, tables = weight_only_layers(model, config, "awq_")
    batches = materialize_batches(calibration, config.calibration_batches, "AWQ")
    owner: dict[str, ScaleGroup] = {}
    for g in scale_groups(model):
        if any(r in layers for r in g.readers):
            for r in g.readers:
                owner[r] = g
    results: dict[str, QuantizedLinear] = {}
    alphas: dict[str, float] = {}
    ratios = CLIP_RATIOS if clip else [1.0]

    def quantize_member(name: str, module: nn.Linear, stats: LayerStats, s: torch.Tensor | None) -> None:
        scheme = config.weight_scheme(name)
        if rounding == "gptq":  # GPTQ on the scaled weight, whose input is x / s: H / (s s^T)
            h = stats.hessian(module.weight.device)
            if s is not None and stats.rows:
                h = h / (s.unsqueeze(0) * s.unsqueeze(1))
            ints, scale, zp = gptq_quantize(module.weight, h, scheme)
        else:
            hdiag = stats.sq if s is None else stats.sq / (s * s)
            ints, scale, zp = clip_quantize(module.weight, hdiag, scheme, ratios)
        q = QuantizedLinear.from_ints(module, ints, scale, zp, scheme)
        with torch.no_grad():  # later layers are measured on this layer's quantized output
            module.weight.copy_(q.dequantized_weight().to(module.weight.dtype))
        results[name] = q

    def process(name: str, module: nn.Linear, stats: LayerStats) -> None:
        if name in results:
            return
        group = owner.get(name)
        if group is None or stats.rows == 0:
            quantize_member(name, module, stats, None)
            return
        members = [r for r in group.readers if r in layers]
        sketch = _sketch(stats.hessian(module.weight.device).float(), rank)
        rms = _rms(stats).clamp_min(1e-5)
        best = (float("inf"), 0.0, torch.ones_like(rms))
        for i in range(grid):
            alpha = i / grid
            s = rms.pow(alpha)
            s = _constrain(s / (s.max() * s.min()).sqrt(), group).clamp(1e-3, 1e3)
            err = 0.0
            for r in members:
                w = layers[r].weight.detach().float()
                ints, sc, zp = clip_quantize(w * s.unsqueeze(0), rms, config.weight_scheme(r), [1.0])
                dq = ((ints.reshape(sc.shape[0], sc.shape[1], -1) - zp) * sc).reshape(w.shape)
                err += _output_error(w, dq / s.unsqueeze(0), sketch)
            if err < best[0]:
                best = (err, alpha, s)
        _, alpha, s = best
        fold_scale_(model, group, s, results)
        for r in members:
            alphas[r] = alpha
            quantize_member(r, layers[r], stats, s)

    with restoring_on_error(model, layers):
        run_layerwise(model, layers, batches, process, full=True, sequential=sequential)
    extra = {"awq": {"grid": grid, "clip": clip, "sequential": sequential, "rank": rank, "rounding": rounding, "alpha": alphas}}
    return finish_weight_only(model, config, layers, tables, results, len(batches), "awq", extra)
