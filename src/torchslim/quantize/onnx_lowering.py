"""How the quantize family's modules become ONNX: registered with the one integer writer of export.

At import this module registers, in :mod:`torchslim.export.onnx_int`:

* a lowering per quantized module type: :class:`~torchslim.quantize.weight_only.QuantizedLinear`
  -> ``nn.Linear`` with the dequantized weight (its SmoothQuant division kept) and, for int4
  group-wise weights, its stored integers as an :class:`~torchslim.export.onnx_nbits.Int4Weight`;
  :class:`~torchslim.quantize.embedding.QuantizedEmbedding` -> ``nn.Embedding`` (and its int4
  table); :class:`~torchslim.quantize.dynamic_rnn.QuantizedRNN` -> ``nn.LSTM`` / ``nn.GRU``;
  :class:`~torchslim.quantize.int8.Int8Linear` / :class:`~torchslim.quantize.int8.Int8Conv` ->
  the float layer with the dequantized weight; fake-quant modules switched off in the float twin;
* the scheme reader: the last ``"quantize"`` plan recorded on a model decides how it is written
  (``static`` / ``qat`` -> QDQ with the calibrated input ranges of every quantized layer, and
  the integer layers' own per-channel weight scales, so ONNX Runtime stores the very integers
  the torch model holds,
  ``dynamic`` and 8-bit ``weight-only`` -> dynamic int8, ``weight-only`` with 4-bit layers ->
  MatMulNBits / GatherBlockQuantized).

So ``ts.export(model, inputs, "m.onnx")`` and
:func:`torchslim.export.onnx_int.export_integer_onnx` write a quantized model's integer file
without the export package importing this family. :func:`onnx_parity` compares such a file with
the torch model. :func:`export_onnx` is the old name of the writer (deprecated).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from torchslim._utils import evaluating, model_device
from torchslim.export.onnx_int import (
    IntegerScheme,
    OnnxLowering,
    export_integer_onnx,
    float_twin,
    register_integer_scheme,
    register_onnx_lowering,
)
from torchslim.export.onnx_nbits import Int4Weight, nbits_blocker
from torchslim.export.ort import ort_run
from torchslim.quantize.dynamic_rnn import QuantizedRNN
from torchslim.quantize.embedding import QuantizedEmbedding, float_embedding
from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize
from torchslim.quantize.int8 import INT8_TYPES
from torchslim.quantize.primitives import sqnr
from torchslim.quantize.weight_only import QuantizedLinear

__all__ = ["quant_plan_of", "integer_scheme_of", "int4_blocker", "int4_weight", "onnx_parity", "export_onnx"]

_ORT_METHOD = {"minmax": "MinMax", "moving_average": "MinMax", "mse": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def quant_plan_of(model: nn.Module) -> dict[str, Any] | None:
    """The last ``"quantize"`` plan recorded on ``model`` (``None`` if it was never quantized);
    records of a later step (``action``, e.g. QAT's int8 conversion) are not plans of their own."""
    from torchslim._modelinfo import model_info

    info = model_info(model)
    plans = [p for p in (info.plans if info else []) if p.get("kind") == "quantize" and "action" not in p]
    return plans[-1] if plans else None


# --------------------------------------------------------------------------- float twin


def _linear_float(m: nn.Module) -> nn.Module:
    assert isinstance(m, QuantizedLinear)
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None).to(m.scale.device)
    with torch.no_grad():
        lin.weight.copy_(m.dequantized_weight())
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    if hasattr(m, "smooth_scale"):  # SmoothQuant's input division travels with the layer
        from torchslim.quantize.smoothquant import attach_smoothing_

        attach_smoothing_(lin, m.smooth_scale.detach().clone())
    return lin


def _int8_float(m: nn.Module) -> nn.Module:
    new = m.to_float()
    if hasattr(m, "smooth_scale"):
        from torchslim.quantize.smoothquant import attach_smoothing_

        attach_smoothing_(new, m.smooth_scale.detach().clone())
    return new


def _fake_quant_off(m: nn.Module) -> None:
    """Fake-quant modules stay in the twin, switched off (a deep copy shares parametrized classes
    with the original, so removing parametrizations would strip the original's ``weight``)."""
    m.enabled = False
    if isinstance(m, FakeQuantize):
        m.observing = m.qat = False


# --------------------------------------------------------------------------- int4 weights


def int4_blocker(module: nn.Module) -> str | None:
    """Why ``module`` (a QuantizedLinear or QuantizedEmbedding) cannot ship as int4 ONNX, or
    ``None`` when it can. Eligible: 2-4 bit (stored as int4) group-wise weights whose group size is
    a power of two >= 16 (ONNX Runtime's ``block_size`` rule) dividing the row."""
    if isinstance(module, QuantizedLinear):
        s, cols = module.scheme, module.in_features
    elif isinstance(module, QuantizedEmbedding):
        s, cols = module.scheme, module.embedding_dim
    else:
        return f"{type(module).__name__} is not a QuantizedLinear or QuantizedEmbedding"
    if s.bits > 4:
        return f"int{s.bits} weights: only int4 (bits <= 4) ships as MatMulNBits / GatherBlockQuantized"
    if s.granularity != "group":
        return f"granularity={s.granularity!r}: the int4 ONNX ops need granularity='group'"
    return nbits_blocker(s.group_size, cols)


@torch.no_grad()
def int4_weight(module: nn.Module) -> Int4Weight | str:
    """``module``'s stored 4-bit integers as an :class:`Int4Weight` (rows = output channels /
    table rows), or why it has none (:func:`int4_blocker`)."""
    reason = int4_blocker(module)
    if reason is not None:
        return reason
    s = module.scheme
    if isinstance(module, QuantizedLinear):
        rows, cols = module.out_features, module.in_features
        g = cols // s.group_size
        # dequantized_weight computes (ints - zp) * scale with ints = s + (0 if signed else 8) and zp
        # the stored zero point (0 when symmetric): as a zero point of the unsigned code s + 8 that
        # is zp + (8 if signed else 0)
        z = module.zero_point.detach().float().cpu().reshape(rows, g) if not s.symmetric else torch.zeros(rows, g)
        zp = (z + (8 if s.signed else 0)).round().clamp(0, 15).to(torch.uint8).numpy()
        if bool((zp == 8).all()):
            zp = None
    else:
        rows, cols = module.num_embeddings, module.embedding_dim
        zp = None
    return Int4Weight(
        rows=rows, cols=cols, block=s.group_size,
        packed=module.qweight.detach().cpu().numpy().reshape(-1),
        scale=module.scale.detach().float().cpu().numpy().reshape(rows, cols // s.group_size),
        zero_point=zp, weight=module.dequantized_weight().detach().float().cpu().numpy(),
        accuracy_level=4 if getattr(module, "act_block", 0) else 0,
    )


# --------------------------------------------------------------------------- scheme


def _input_ranges(model: nn.Module) -> dict[str, tuple[float, int]]:
    """Layer name -> (scale, zero point) of its per-tensor calibrated input quantizer."""
    ranges: dict[str, tuple[float, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, INT8_TYPES):
            ranges[name] = (float(m.input_scale), int(m.input_zero_point))
            continue
        fq = getattr(m, "input_quant", None)
        if isinstance(fq, FakeQuantize):
            scale, zp = fq.scale, fq.zero_point
        elif isinstance(fq, LSQFakeQuantize):
            scale, zp = fq.qparams()
        else:
            continue
        if scale.numel() == 1:
            ranges[name] = (float(scale), int(torch.clamp(zp.round(), 0, 255)))
    return ranges


def _weight_scales(model: nn.Module) -> dict[str, tuple[float, ...]]:
    """Integer layer name -> its per-output-channel weight scales."""
    return {n: tuple(float(v) for v in m.weight_scale.detach().cpu()) for n, m in model.named_modules()
            if isinstance(m, INT8_TYPES)}


def _has_int4(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) and m.scheme.bits <= 4 for m in model.modules())


def integer_scheme_of(model: nn.Module) -> IntegerScheme | None:
    """How a model quantized by ``quantize_`` is written as integer ONNX (``None``: not quantized)."""
    plan = quant_plan_of(model)
    if plan is None:
        return None
    cfg = plan.get("config", {})
    mode = str(cfg.get("mode"))
    if mode == "weight-only" and _has_int4(model):
        kind = "int4"
    elif mode in ("dynamic", "weight-only"):
        kind = "dynamic"
    else:
        kind = "static"
    ranges = _input_ranges(model) if kind == "static" and cfg.get("act_bits", 8) == 8 else {}
    return IntegerScheme(
        mode=mode, kind=kind, calibration_method=_ORT_METHOD.get(cfg.get("observer", "minmax"), "MinMax"),
        calibration_batches=cfg.get("calibration_batches"), input_ranges=ranges,
        weight_scales=_weight_scales(model) if kind == "static" else {},
    )


register_onnx_lowering(QuantizedLinear, OnnxLowering(float_module=_linear_float, int4_weight=int4_weight))
register_onnx_lowering(QuantizedEmbedding, OnnxLowering(float_module=float_embedding, int4_weight=int4_weight))
register_onnx_lowering(QuantizedRNN, OnnxLowering(float_module=lambda m: m.to_float()))
for _t in INT8_TYPES:
    register_onnx_lowering(_t, OnnxLowering(float_module=_int8_float))
register_onnx_lowering(FakeQuantize, OnnxLowering(float_module=_fake_quant_off))
register_onnx_lowering(LSQFakeQuantize, OnnxLowering(float_module=_fake_quant_off))
register_integer_scheme(integer_scheme_of)


# --------------------------------------------------------------------------- parity, old name


def _complete(model: nn.Module, x: Any) -> tuple[torch.Tensor, ...]:
    """``x`` as a tuple of positional inputs; a lone tensor of a multi-input model is completed
    with the model's remembered example inputs of the same shape (e.g. a text batch's mask)."""
    if isinstance(x, (tuple, list)):
        return tuple(x)
    from torchslim._modelinfo import model_info

    info = model_info(model)
    rest = info.example.args[1:] if info is not None else ()
    if rest and all(isinstance(t, torch.Tensor) and t.shape == x.shape for t in rest):
        return (x, *rest)
    return (x,)


@torch.no_grad()
def onnx_parity(model: nn.Module, files: dict[str, str], x: Any) -> dict[str, float]:
    """SQNR (dB) of the ORT outputs against torchslim on ``x``: the integer file vs the quantized
    torch model, and the fp32 file vs its float twin (an export sanity check).

    ``files`` is what :func:`~torchslim.export.onnx_int.export_integer_onnx` returned.
    """
    xs = _complete(model, x)
    with evaluating(model):
        device = model_device(model)
        quant = model(*(t.to(device) for t in xs)).float().cpu()
    twin = float_twin(model).cpu()
    return {
        "int8_vs_torch_quantized_db": sqnr(quant, ort_run(files["onnx"], xs)),
        "fp32_vs_torch_float_db": sqnr(twin(*(t.cpu() for t in xs)), ort_run(files["onnx_fp32"], xs)),
    }


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> dict[str, str]:
    """Deprecated: use :func:`torchslim.export.onnx_int.export_integer_onnx` (same arguments and result)."""
    warnings.warn(
        "torchslim.quantize.export_onnx is deprecated; use torchslim.export.export_integer_onnx "
        "(same arguments), or ts.export(model, inputs, 'm.onnx')",
        DeprecationWarning,
        stacklevel=2,
    )
    return export_integer_onnx(model, example_inputs, path, **options)
