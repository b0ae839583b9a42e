"""ONNX Runtime int8 path: fp32 ONNX export of a quantized model's float twin, then ORT quantization.

:func:`export_onnx` writes two files: ``<name>.fp32.onnx`` (the float model the quantized one
stands for: BN folded, weights as the fake-quant originals / the dequantized integers) and
``<name>.onnx``, quantized for ONNX Runtime's integer kernels:

* ``dynamic`` / 8-bit ``weight-only``: ``onnxruntime.quantization.quantize_dynamic`` on MatMul /
  Gemm (int8 weights per channel, activations quantized at run time: ``MatMulInteger``); the
  weights it quantizes are the already-quantized ones dequantized;
* ``weight-only`` with 4-bit (or fewer) layers / tables: torchslim's own writer
  (:mod:`torchslim.quantize._nbits`) ships the stored integers as ``MatMulNBits`` /
  ``GatherBlockQuantized`` (ONNX Runtime's int4 kernels).
* ``static`` / ``qat``: ``onnxruntime.quantization.quantize_static`` in QDQ format, per-channel
  int8 weights, uint8 activations.

The input of every quantized Conv / Gemm / MatMul gets torchslim's calibrated scale and zero
point (ORT ``TensorQuantOverrides``, matched through the weight initializer's name); the other
tensors ORT quantizes (layer outputs, pooling, adds) get ORT's calibration on the same batches.
Every integer file then goes through :func:`avoid_skip_layernorm_fusion` (residual ``Add`` ->
``LayerNormalization`` written as ``Sum``: ORT's fused CPU ``SkipLayerNormalization`` is slower
than the pair). :func:`ort_latency` times a file with ORT.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._optional import require
from torchslim.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["float_twin", "export_fp32", "avoid_skip_layernorm_fusion", "input_names", "export_onnx", "ort_latency", "ort_run", "onnx_parity", "torchslim_ranges", "quant_mode_of"]

_PASS_THROUGH = {"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}
_ORT_METHOD = {"minmax": "MinMax", "moving_average": "MinMax", "mse": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def quant_mode_of(model: nn.Module) -> dict[str, Any] | None:
    """The last ``"quantize"`` plan recorded on ``model`` (``None`` if it was never quantized)."""
    from torchslim.zoo.spec import model_info

    info = model_info(model)
    plans = [p for p in (info.plans if info else []) if p.get("kind") == "quantize"]
    return plans[-1] if plans else None


def float_twin(model: nn.Module) -> nn.Module:
    """A float copy of a quantized model: quantizers switched off, integer weights dequantized.

    (Parametrizations are switched off rather than removed: a deep copy shares the parametrized
    class with the original, and removing them would strip the original's ``weight`` property.)
    """
    from torchslim.quantize._nbits import QuantizedEmbedding, float_embedding
    from torchslim.quantize.dynamic_rnn import QuantizedRNN
    from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize
    from torchslim.quantize.ptq import _set
    from torchslim.quantize.weight_only import QuantizedLinear

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, QuantizedLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None).to(m.scale.device)
            with torch.no_grad():
                lin.weight.copy_(m.dequantized_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            if hasattr(m, "smooth_scale"):  # SmoothQuant's input division travels with the layer
                from torchslim.quantize.smoothquant import attach_smoothing_

                attach_smoothing_(lin, m.smooth_scale.detach().clone())
            _set(twin, name, lin)
        elif isinstance(m, QuantizedEmbedding):
            _set(twin, name, float_embedding(m))
        elif isinstance(m, QuantizedRNN):  # an ONNX LSTM / GRU node with the dequantized weights
            _set(twin, name, m.to_float())
        elif isinstance(m, (FakeQuantize, LSQFakeQuantize)):
            m.enabled = False
            if isinstance(m, FakeQuantize):
                m.observing = m.qat = False
    return twin.eval()


def export_fp32(model: nn.Module, example: tuple[Any, ...], path: str | os.PathLike[str]) -> Path:
    """Export ``model`` (float) to ONNX with a dynamic batch dimension."""
    require("onnx", "ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = tuple(t.detach().cpu() for t in example)
    model = model.cpu().eval()
    names = input_names(model, len(example))
    # token inputs (2-D integer tensors, e.g. input_ids) also get a dynamic sequence length
    tokens = [t.dim() == 2 and not t.is_floating_point() for t in example]
    try:
        if any(isinstance(m, nn.RNNBase) for m in model.modules()):
            # torch.export specialises the batch of an RNN's zero initial state; the TorchScript
            # exporter writes a batch-dynamic ONNX LSTM / GRU node (which ORT can quantize)
            raise NotImplementedError("RNN: use the TorchScript exporter")
        batch = torch.export.Dim("batch", min=1, max=4096)
        seq = torch.export.Dim("sequence", min=2, max=4096)
        dyn = tuple({0: batch, 1: seq} if tok else {0: batch} for tok in tokens)
        with torch.no_grad():
            prog = torch.onnx.export(
                model, example, dynamo=True, input_names=names, output_names=["output"],
                dynamic_shapes=dyn, optimize=True, verbose=False,
            )
        prog.save(str(path))
    except Exception:  # noqa: BLE001 - fall back to the TorchScript exporter
        with torch.no_grad():
            torch.onnx.export(
                model, example, str(path), dynamo=False, input_names=names, output_names=["output"],
                dynamic_axes={n: ({0: "batch", 1: "sequence"} if tok else {0: "batch"}) for n, tok in zip(names, tokens)},
                opset_version=17,
            )
    merge_duplicate_nodes(path)
    return path


def merge_duplicate_nodes(path: str | os.PathLike[str]) -> int:
    """Common-subexpression elimination on the ONNX file at ``path``, in place; returns the
    number of nodes removed.

    Two nodes merge when they have the same op, domain and attributes and read the same tensors,
    where two initializers with equal type, shape and bytes count as the same tensor. This is
    what makes the three SmoothQuant divisions of Q, K and V (one shared scale, three buffers)
    one Div, which ONNX Runtime's own CSE does not do (it compares initializers by name).
    Nodes with subgraphs or several outputs are left alone.
    """
    import hashlib

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    digest = {
        i.name: f"init:{i.data_type}:{list(i.dims)}:" + hashlib.sha1(numpy_helper.to_array(i).tobytes()).hexdigest()
        for i in graph.initializer
    }
    rename: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}
    keep = []
    for node in graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        if len(node.output) != 1 or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            keep.append(node)
            continue
        key = (
            node.op_type, node.domain, tuple(digest.get(x, x) for x in node.input),
            tuple(a.SerializeToString(deterministic=True) for a in node.attribute),
        )
        if key in first and node.output[0] not in {o.name for o in graph.output}:
            rename[node.output[0]] = first[key]
            continue
        first.setdefault(key, node.output[0])
        keep.append(node)
    removed = len(graph.node) - len(keep)
    if removed:
        del graph.node[:]
        graph.node.extend(keep)
        kept_vi = [v for v in graph.value_info if v.name not in rename]
        del graph.value_info[:]
        graph.value_info.extend(kept_vi)
        used = {x for n in graph.node for x in n.input}
        live = [i for i in graph.initializer if i.name in used or i.name in {o.name for o in graph.output}]
        del graph.initializer[:]
        graph.initializer.extend(live)
        tmp = Path(str(path) + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return removed


def avoid_skip_layernorm_fusion(path: str | os.PathLike[str]) -> int:
    """Turn every ``Add`` whose only reader is a ``LayerNormalization`` into a two-input ``Sum``,
    in place; return how many.

    The two ops compute the same thing, but ONNX Runtime's CPU provider fuses ``Add`` +
    ``LayerNormalization`` on 3-D tensors into its ``SkipLayerNormalization`` kernel, which runs
    several times slower than the two ops it replaces (ORT 1.32, one thread: 0.89 ms against
    0.13 ms at 32 x 14 x 384, 27 us against 9 us at 1 x 11 x 384; the residual adds of a post-LN
    BERT are all of this shape). Its fusion matches ``Add`` only, so a ``Sum`` keeps the fast
    pair: all-MiniLM-L6-v2's int8 file runs 10-20% faster (``benchmarks/quantize_minilm.py``).
    Used on the integer files torchslim writes (ONNX Runtime CPU kernels); the fp32 file keeps
    the plain graph (other execution providers do gain from the fused kernel).
    """
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)  # nodes only: weights stored beside stay there
    graph = model.graph
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for x in node.input:
            readers.setdefault(x, []).append(node)
    outputs = {o.name for o in graph.output}
    changed = 0
    for node in graph.node:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        after = readers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "LayerNormalization" and after[0].input[0] == node.output[0] \
                and node.output[0] not in outputs:
            node.op_type = "Sum"  # same broadcasting (multidirectional) and types as Add
            changed += 1
    if changed:
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return changed


def input_names(model: nn.Module, n: int) -> list[str]:
    """ONNX input names: the model's own ``input_names`` (e.g. a text encoder's ``input_ids``,
    ``attention_mask``, ``token_type_ids``) when it declares ``n`` or more, else ``input``,
    ``input1``, ..."""
    declared = getattr(model, "input_names", None)
    if isinstance(declared, (tuple, list)) and len(declared) >= n and all(isinstance(x, str) for x in declared):
        return list(declared[:n])
    return [f"input{i}" if i else "input" for i in range(n)]


def _complete(model: nn.Module, x: Any) -> tuple[torch.Tensor, ...]:
    """``x`` as a tuple of positional inputs; a lone tensor of a multi-input model is completed
    with the model's remembered example inputs of the same shape (e.g. a text batch's mask)."""
    if isinstance(x, (tuple, list)):
        return tuple(x)
    from torchslim.zoo.spec import model_info

    info = model_info(model)
    rest = info.example.args[1:] if info is not None else ()
    if rest and all(isinstance(t, torch.Tensor) and t.shape == x.shape for t in rest):
        return (x, *rest)
    return (x,)


def _feed(sess: Any, x: Any) -> dict[str, Any]:
    xs = x if isinstance(x, (tuple, list)) else (x,)
    return {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), xs)}


class _Reader:
    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.name = name
        self.it = iter(batches)

    def get_next(self) -> dict[str, Any] | None:
        x = next(self.it, None)
        return None if x is None else {self.name: x.detach().cpu().numpy()}


def _has_int4(model: nn.Module) -> bool:
    from torchslim.quantize._nbits import QuantizedEmbedding
    from torchslim.quantize.weight_only import QuantizedLinear

    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) and m.scheme.bits <= 4 for m in model.modules())


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    calibration: Iterable[Any] | None = None,
    calibration_batches: int | None = None,
) -> dict[str, str]:
    """Write ``<path stem>.fp32.onnx`` and the ORT-quantized ``path``; return ``{"onnx_fp32", "onnx"}``.

    ``model`` must have been quantized with :func:`torchslim.quantize.quantize_` (the mode and
    observer come from its plan). This is the hook ``torchslim.export`` calls for quantized models.

    Raises:
        ConfigError: the model is not quantized, or static/qat without calibration batches.
    """
    ortq = require("onnxruntime.quantization", "int8 ONNX Runtime export")
    plan = quant_mode_of(model)
    if plan is None:
        raise ConfigError("export_onnx needs a model quantized with quantize_ (no 'quantize' plan recorded)")
    cfg = plan["config"]
    example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    path = Path(path)
    fp32 = path.with_name(path.stem + ".fp32.onnx")
    export_fp32(float_twin(model), example, fp32)
    int4 = cfg["mode"] == "weight-only" and _has_int4(model)
    if int4:
        # our own writer: the 4-bit integers of every eligible layer / table become ONNX Runtime's
        # MatMulNBits / GatherBlockQuantized inputs as they are (no re-quantization)
        from torchslim.quantize._nbits import write_int4_onnx

        report = write_int4_onnx(model, fp32, path, accuracy_level=4)  # int8 compute: ORT's fast CPU kernels
        if report["left_float"]:
            log.warning("int4 ONNX: %d quantized layer(s) shipped as float: %s", len(report["left_float"]),
                        "; ".join(f"{k}: {v}" for k, v in report.get("why_float", {}).items()) or report["left_float"])
    elif cfg["mode"] in ("dynamic", "weight-only"):
        # the layers torchslim quantizes in these modes (Linear -> MatMul / Gemm) and embedding
        # tables (Gather on a weight initializer: a third of a BERT's bytes); ORT's ConvInteger is
        # slower than its fp32 conv, so convs stay float
        ortq.quantize_dynamic(
            str(fp32), str(path), per_channel=True, weight_type=ortq.QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Gather", "LSTM"],
        )
    else:
        if calibration is None:
            raise ConfigError(f"mode={cfg['mode']!r} ONNX export needs calibration batches for ONNX Runtime's QDQ calibration")
        n = calibration_batches or cfg.get("calibration_batches") or 16
        batches = []
        for b in calibration:
            if len(batches) >= n:
                break
            batches.append(b[0] if isinstance(b, (tuple, list)) else b)
        if not batches:
            raise ConfigError("the calibration loader gave no batches")
        method = getattr(ortq.CalibrationMethod, _ORT_METHOD.get(cfg.get("observer", "minmax"), "MinMax"))
        overrides = torchslim_ranges(model, fp32) if cfg.get("act_bits", 8) == 8 else {}
        ortq.quantize_static(
            str(fp32), str(path), _Reader("input", batches), quant_format=ortq.QuantFormat.QDQ, per_channel=True,
            activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8, calibrate_method=method,
            extra_options={"TensorQuantOverrides": overrides} if overrides else None,
        )
    avoid_skip_layernorm_fusion(path)
    return {"onnx_fp32": str(fp32), "onnx": str(path)}


def torchslim_ranges(model: nn.Module, fp32_path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """ORT ``TensorQuantOverrides`` giving each quantized layer's input tensor torchslim's calibrated
    scale / zero point (matched through the layer's weight initializer name)."""
    import numpy as np
    import onnx

    from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize

    params: dict[str, tuple[float, int]] = {}
    for name, m in model.named_modules():
        fq = getattr(m, "input_quant", None)
        if isinstance(fq, FakeQuantize):
            scale, zp = fq.scale, fq.zero_point
        elif isinstance(fq, LSQFakeQuantize):
            scale, zp = fq.qparams()
        else:
            continue
        if scale.numel() == 1:
            params[name] = (float(scale), int(torch.clamp(zp.round(), 0, 255)))
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = node.input[1]
        for suffix in (".parametrizations.weight.original", ".weight"):
            if w.endswith(suffix) and w[: -len(suffix)] in params and node.input[0] not in overrides:
                scale, zp = params[w[: -len(suffix)]]
                value = [{"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(zp, dtype=np.uint8)}]
                # ORT shares one scale through pooling / reshapes: set it on the whole chain up to the producer
                t = node.input[0]
                while True:
                    overrides.setdefault(t, value)
                    prev = producer.get(t)
                    if prev is None or prev.op_type not in _PASS_THROUGH:
                        break
                    t = prev.input[0]
                break
    return overrides


def ort_latency(path: str | os.PathLike[str], x: torch.Tensor | tuple[torch.Tensor, ...], runs: int = 20, warmup: int = 3, threads: int = 1) -> float:
    """Median ONNX Runtime latency of one forward (ms) on CPU with ``threads`` intra-op threads."""
    ort = require("onnxruntime", "ONNX Runtime latency")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = _feed(sess, x)
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2]


def ort_run(path: str | os.PathLike[str], x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Run an ONNX file on ``x`` (a tensor, or a tuple fed to the inputs in order) with ONNX Runtime
    (CPU) and return the first output."""
    ort = require("onnxruntime", "ONNX Runtime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, _feed(sess, x))[0])


@torch.no_grad()
def onnx_parity(model: nn.Module, files: dict[str, str], x: torch.Tensor) -> dict[str, float]:
    """SQNR (dB) of the ORT outputs against torchslim on ``x``: the int8 file vs the quantized
    torch model, and the fp32 file vs its float twin (an export sanity check)."""
    from torchslim.quantize.primitives import sqnr

    xs = _complete(model, x)
    was = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        quant = model(*(t.to(device) for t in xs)).float().cpu()
    finally:
        model.train(was)
    twin = float_twin(model).cpu()
    return {
        "int8_vs_torch_quantized_db": sqnr(quant, ort_run(files["onnx"], xs)),
        "fp32_vs_torch_float_db": sqnr(twin(*(t.cpu() for t in xs)), ort_run(files["onnx_fp32"], xs)),
    }
