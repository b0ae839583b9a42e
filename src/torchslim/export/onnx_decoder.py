"""An ONNX decoder with a KV cache: a Llama-family causal LM for ONNX Runtime, int4 where it was.

:func:`export_onnx_decoder` writes one ONNX file that runs both phases of generation:

* inputs ``input_ids`` ``[batch, seq]`` (int64), ``attention_mask`` ``[batch, past + seq]``
  (int64, 1 = a real token) and, per layer ``i``, ``past_key_values.{i}.key`` / ``.value``
  ``[batch, kv_heads, past, head_dim]`` (float32; ``past = 0`` for the prefill);
* outputs ``logits`` ``[batch, seq, vocab]`` and ``present.{i}.key`` / ``.value``
  ``[batch, kv_heads, past + seq, head_dim]``: fed back as the next step's past.

Grouped-query attention keeps each key/value head once (``kv_heads`` of them, not repeated to the
query heads). Batch, sequence and past lengths are dynamic axes. Two graphs hold this contract:

* ``fused`` (the default where it applies): built node by node with ONNX Runtime's fused CPU
  ops - ``GroupQueryAttention`` (rotary embedding and the cache concat inside it, cos/sin tables
  from the model's own ``inv_freq`` and attention scaling), ``SimplifiedLayerNormalization`` /
  ``SkipSimplifiedLayerNormalization`` (RMSNorm with the residual add), one matmul for q/k/v and
  one for gate/up, SiLU as ``Sigmoid`` x ``Mul``: about 12 nodes per layer. Positions are the
  past length plus the index (GroupQueryAttention reads ``sum(attention_mask) - 1`` as each row's
  last position): no left padding. Needs ``head_dim`` a multiple of 16 and a SiLU MLP.
* ``reference`` (``fused=False``, and the automatic choice where the fused one cannot hold the
  model): :class:`LlamaDecoder`, a plain-torch re-implementation of the transformers Llama forward
  (RMSNorm, rotary, GQA attention with queries grouped per key/value head and an explicit cache
  concat, the gated MLP) reading the model's modules, exported by the TorchScript-based
  ``torch.onnx.export`` (opset 17). Positions are ``cumsum(attention_mask) - 1``: left padding
  works.

Both equal the transformers forward to float rounding (tested); rope types computed once at load
(``default``, ``linear``, ``llama3``, ``yarn``) are kept, those that change with the length are
refused. A quantized model is exported through its float twin
(:func:`~torchslim.export.onnx_int.float_twin`), and:

* every int4 group-wise Linear (``QuantizedLinear``, from ``quantize_`` / ``gptq_`` ...) becomes
  ``com.microsoft.MatMulNBits`` holding its very integers (the fused graph concatenates the
  integers of q/k/v and of gate/up), at the compute type the layer has in torch: a layer that
  rounds its inputs to int8 per block (weight-only ``compute="int8"``, the default of group-wise
  weights and of ``quantize_llm_``) gets ``accuracy_level`` 4 (ONNX Runtime quantizes the
  activations the same way and runs its integer CPU kernels), a float-input layer gets 0; either
  way the file's logits equal the torch model's to float rounding;
* an int4 embedding table (``QuantizedEmbedding``) becomes ``com.microsoft.GatherBlockQuantized``
  with its integers; an int8 one (or a float one with ``embedding_bits=8``) a
  ``GatherBlockQuantized`` with ``bits=8`` (uint8 codes ``q + 128``, zero point 128, one fp
  scale per group of ``embedding_group_size``).

Tied embeddings (SmolLM2): in a float model the table is stored once, read by the Gather and by
the head's ``Gemm(transB=1)``. A quantized model whose ``lm_head`` became int4 stores the head as
MatMulNBits and the table separately (float, int8 or int4): both count in the file's bytes.

Only Llama-layout decoders are written (``LlamaForCausalLM`` and the same layout: Mistral,
Qwen2 with q/k/v biases); other architectures (Gemma-3: sandwich norms, ``1 + weight`` RMSNorm,
sliding windows) raise :class:`~torchslim.errors.ConfigError` naming the architecture.

Example:
    >>> import tempfile, pathlib, torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     info = export_onnx_decoder(model, pathlib.Path(d) / "decoder.onnx")
    ...     dec = OnnxDecoder(info["path"])
    ...     logits, past = dec.step(torch.tensor([[1, 2, 3]]))
    ...     ref = model(torch.tensor([[1, 2, 3]])).logits
    >>> info["layers"], info["kv_heads"], tuple(past[0].shape)
    (1, 1, (1, 1, 3, 8))
    >>> bool(torch.allclose(logits, ref, atol=1e-4))
    True
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim._fs import atomic_path
from torchslim._optional import require
from torchslim.errors import ConfigError
from torchslim.export.onnx_decoder_run import META_KEY, OnnxDecoder, decoder_metadata, is_onnx_decoder

__all__ = ["LlamaDecoder", "OnnxDecoder", "export_onnx_decoder", "is_onnx_decoder", "decoder_metadata"]

_LLAMA_LAYOUT = ("llama", "mistral", "qwen2")
_ROPE_STATIC = ("default", "linear", "llama3", "yarn")
_MS = "com.microsoft"


# --------------------------------------------------------------------------- the decoder in plain torch


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def _check_model(model: nn.Module) -> None:
    """Refuse what :class:`LlamaDecoder` cannot write, with the architecture named."""
    arch = _architecture(model)
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if cfg is None or inner is None or not hasattr(model, "lm_head") or not hasattr(inner, "layers"):
        raise ConfigError(f"export_onnx_decoder needs a transformers causal LM (model.model.layers, model.lm_head, "
                          f"model.config); got {type(model).__name__}")
    if arch not in _LLAMA_LAYOUT:
        raise ConfigError(f"export_onnx_decoder writes Llama-layout decoders ({', '.join(_LLAMA_LAYOUT)}); "
                          f"{type(model).__name__} is model_type {arch!r}, not supported yet")
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if rope not in _ROPE_STATIC:
        raise ConfigError(f"export_onnx_decoder: rope_type {rope!r} changes the rotary frequencies with the sequence "
                          f"length; supported: {', '.join(_ROPE_STATIC)}")
    if getattr(cfg, "sliding_window", None) and arch != "llama" and getattr(cfg, "use_sliding_window", True):
        raise ConfigError(f"export_onnx_decoder: {type(model).__name__} uses sliding-window attention "
                          f"(sliding_window={cfg.sliding_window}); not supported")
    act = str(getattr(cfg, "hidden_act", "silu"))
    if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
        raise ConfigError(f"export_onnx_decoder: hidden_act {act!r} is not supported (silu, gelu, relu)")


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(var + norm.variance_epsilon))


class LlamaDecoder(nn.Module):
    """The Llama forward with an explicit KV cache, in ops every exporter handles.

    ``forward(input_ids, attention_mask, *past)`` with ``past`` = ``k0, v0, k1, v1, ...``
    (``[batch, kv_heads, past, head_dim]`` each) returns ``(logits, k0', v0', ...)`` with the
    new keys/values appended (``[batch, kv_heads, past + seq, head_dim]``). It reads ``model``'s
    modules (no copy of the weights).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _check_model(model)
        self.lm = model
        cfg = model.config
        self.layers = len(model.model.layers)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        attn = model.model.layers[0].self_attn
        self.head_dim = int(getattr(attn, "head_dim", None) or cfg.hidden_size // self.heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        rot = model.model.rotary_emb
        self.register_buffer("inv_freq", rot.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inner = self.lm.model
        b, s = input_ids.shape
        total = attention_mask.shape[1]
        start = total - s  # past length
        x = inner.embed_tokens(input_ids)
        # positions from the mask (left padding), rotary tables [b, 1, s, head_dim]
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
        freqs = pos.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.rope_scale).unsqueeze(1)
        sin = (emb.sin() * self.rope_scale).unsqueeze(1)
        # causal + padding mask as an additive bias [b, 1, 1, s, total]
        q_pos = torch.arange(s, device=input_ids.device) + start
        k_pos = torch.arange(total, device=input_ids.device)
        allowed = (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)).unsqueeze(0) & attention_mask.bool().unsqueeze(1)
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
        bias = bias[:, None, None]
        rep = self.heads // self.kv_heads
        hd = self.head_dim
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = _rms_norm(layer.input_layernorm, x)
            q = attn.q_proj(h).view(b, s, self.heads, hd).transpose(1, 2)
            k = attn.k_proj(h).view(b, s, self.kv_heads, hd).transpose(1, 2)
            v = attn.v_proj(h).view(b, s, self.kv_heads, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            # GQA without repeating the cache: queries grouped per kv head [b, kv, rep, s, hd]
            qg = q.reshape(b, self.kv_heads, rep, s, hd)
            scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * self.scaling + bias
            probs = torch.softmax(scores, dim=-1)
            o = torch.matmul(probs, v.unsqueeze(2)).reshape(b, self.heads, s, hd).transpose(1, 2).reshape(b, s, self.heads * hd)
            x = x + attn.o_proj(o)
            h = _rms_norm(layer.post_attention_layernorm, x)
            mlp = layer.mlp
            x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
        # a 2-D input, so that a head tied to the table can become one Gemm(transB=1) on it (_share_tied_head)
        h = _rms_norm(inner.norm, x)
        logits = self.lm.lm_head(h.reshape(b * s, h.shape[-1]))
        return (logits.reshape(b, s, logits.shape[-1]), *presents)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


# --------------------------------------------------------------------------- writing the file


def _names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, present


def _int8_table(weight: torch.Tensor, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 groups of a float table: ``(uint8 codes q + 128 (rows, cols), fp32 scales (rows, cols/group))``."""
    rows, cols = weight.shape
    w = weight.detach().float().cpu().reshape(rows, cols // group, group)
    scale = (w.abs().amax(-1) / 127.0).clamp(min=1e-12)
    q = torch.clamp(torch.round(w / scale[..., None]), -127, 127)
    return (q.reshape(rows, cols) + 128).to(torch.uint8).numpy(), scale.numpy().astype(np.float32)


def _is_int8_table(module: nn.Module) -> bool:
    """An 8-bit ``QuantizedEmbedding`` (written as a bits=8 GatherBlockQuantized of its own integers)."""
    return type(module).__name__ == "QuantizedEmbedding" and getattr(module.scheme, "bits", None) == 8


def _shares_int8_table(model: nn.Module) -> bool:
    """``lm_head`` is a :class:`~torchslim.quantize.embedding.TiedQuantizedHead` of the model's 8-bit table."""
    head = getattr(model, "lm_head", None)
    return (type(head).__name__ == "TiedQuantizedHead" and head.table is model.model.embed_tokens
            and _is_int8_table(model.model.embed_tokens))


def _embedding_int8(model: nn.Module, group: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The int8 codes of the model's table: an 8-bit ``QuantizedEmbedding``'s own integers, or a float table's."""
    emb = model.model.embed_tokens
    if _is_int8_table(emb):
        rows, cols = emb.num_embeddings, emb.embedding_dim
        q = emb.qweight.detach().cpu().reshape(rows, cols).to(torch.int16) + 128
        return q.to(torch.uint8).numpy(), emb.scale.detach().float().cpu().numpy().reshape(rows, -1)
    if isinstance(emb, nn.Embedding):
        return _int8_table(emb.weight, group)
    return None


def _gather_to_int8(onnx: Any, proto: Any, codes: np.ndarray, scales: np.ndarray, table: np.ndarray) -> bool:
    """Replace the Gather on the float table ``table`` by a bits=8 GatherBlockQuantized; True if done."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    target = None
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            if w.shape == table.shape and np.array_equal(w, table):
                target = node
                break
    if target is None:
        return False
    group = table.shape[1] // scales.shape[1]
    name = target.input[0]
    data_name, scale_name, zp_name = name + "_Q8", name + "_scales", name + "_zero_points"
    zp = np.full(scales.shape, 128, np.uint8)
    graph.initializer.extend([numpy_helper.from_array(codes, data_name), numpy_helper.from_array(scales.astype(np.float32), scale_name),
                              numpy_helper.from_array(zp, zp_name)])
    new = onnx.helper.make_node("GatherBlockQuantized", [data_name, target.input[1], scale_name, zp_name], list(target.output),
                                name=(target.name or "embed") + "_Q8", domain="com.microsoft", gather_axis=0, quantize_axis=1,
                                block_size=group, bits=8)
    nodes = [new if n is target else n for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(n.input and name in n.input for n in graph.node):  # the float table is read by nobody else
        keep = [i for i in graph.initializer if i.name != name]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return True


def _share_tied_head(onnx: Any, proto: Any, table: np.ndarray) -> bool:
    """A MatMul on a transposed copy of the embedding table (the exporter's constant-folded
    ``lm_head`` of tied embeddings) becomes ``Gemm(A, table, transB=1)`` reading the table's own
    initializer, and the copy is dropped: the table is stored once. True if done."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    table_name = next((n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                       and tuple(inits[n.input[0]].dims) == table.shape), None)
    if table_name is None:
        return False
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or tuple(inits[node.input[1]].dims) != table.shape[::-1]:
            continue
        if not np.array_equal(numpy_helper.to_array(inits[node.input[1]]), table.T):
            continue
        copy = node.input[1]
        gemm = onnx.helper.make_node("Gemm", [node.input[0], table_name], list(node.output), name=node.name + "_tied", transB=1)
        nodes = [gemm if n is node else n for n in graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
        if not any(copy in n.input for n in graph.node):
            keep = [i for i in graph.initializer if i.name != copy]
            del graph.initializer[:]
            graph.initializer.extend(keep)
        return True
    return False


class _Graph:
    """Nodes and initializers of a hand-built ONNX graph (the fused decoder)."""

    def __init__(self, onnx: Any) -> None:
        self.onnx, self.nodes, self.inits, self.n = onnx, [], [], 0

    def init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op: str, ins: list[str], outs: int | list[str] = 1, domain: str = "", **attrs: Any) -> list[str]:
        self.n += 1
        names = [f"{op}_{self.n}_{k}" for k in range(outs)] if isinstance(outs, int) else outs
        self.nodes.append(self.onnx.helper.make_node(op, ins, names, name=f"{op}_{self.n}", domain=domain, **attrs))
        return names


def _int4_of(module: nn.Module) -> Any:
    """The module's Int4Weight (a registered int4 lowering), else None; computed once per module
    (``_int4_cache``, cleared by :func:`export_onnx_decoder`)."""
    from torchslim.export.onnx_int import onnx_lowering
    from torchslim.export.onnx_nbits import Int4Weight, nbits_blocker

    key = id(module)
    if key not in _int4_cache:
        lowering = onnx_lowering(module)
        w = None if lowering is None or lowering.int4_weight is None else lowering.int4_weight(module)
        _int4_cache[key] = w if isinstance(w, Int4Weight) and nbits_blocker(w.block, w.cols) is None else None
    return _int4_cache[key]


_int4_cache: dict[int, Any] = {}


def _int8_of(module: nn.Module) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``(uint8 codes q + 128 as (rows, blocks, block), fp32 scales (rows * blocks,), block)`` of a
    symmetric int8 ``QuantizedLinear`` (per group or per channel, a power-of-two block >= 16 that
    divides the row): what a bits=8 ``MatMulNBits`` holds (its default zero point is 128). Else None."""
    if type(module).__name__ != "QuantizedLinear":
        return None
    s = module.scheme
    if s.bits != 8 or not s.symmetric or not s.signed or s.granularity not in ("group", "channel"):
        return None
    rows, cols = module.out_features, module.in_features
    block = s.group_size if s.granularity == "group" else cols
    if block < 16 or block & (block - 1) or cols % block:
        return None
    q = module.qweight.detach().cpu().reshape(rows, cols).to(torch.int16) + 128
    codes = q.to(torch.uint8).numpy().reshape(rows, cols // block, block)
    scales = module.scale.detach().cpu().float().reshape(rows * (cols // block)).numpy()
    return codes, scales, block


def _fused_needs_twin(model: nn.Module) -> bool:
    """Whether a quantized module of ``model`` ships as float (then the fused graph reads the float
    twin's weights); int4 Linears / tables and 8-bit tables are written from their integers."""
    from torchslim.export.onnx_int import onnx_lowering

    for m in model.modules():
        lowering = onnx_lowering(m)
        if lowering is None or lowering.float_module is None:
            continue
        if _int4_of(m) is not None and (type(m).__name__ != "QuantizedEmbedding" or _int4_of(m).zero_point is None):
            continue
        if _is_int8_table(m) or (type(m).__name__ == "TiedQuantizedHead" and _shares_int8_table(model)):
            continue
        return True
    return False


def _level(mods: list[nn.Module], accuracy_level: int | None) -> int:
    """The ``MatMulNBits`` compute type of these layers: the one asked for, else theirs (4 when they
    round their inputs to int8 per block, ``compute="int8"``; 0 for float inputs)."""
    return accuracy_level if accuracy_level is not None else (4 if all(getattr(m, "act_block", 0) for m in mods) else 0)


def _linear(g: _Graph, x: str, name: str, mods: list[nn.Module], floats: list[nn.Module], accuracy_level: int | None,
            report: dict[str, Any]) -> str:
    """``x @ [W_1; W_2; ...].T (+ biases)`` for the layers ``mods`` (their float twins ``floats``)
    fused along the output axis: one MatMulNBits of their integers when all are int4 with one
    group size and zero-point kind, else one float MatMul."""
    ws = [_int4_of(m) for m in mods]
    int4 = all(w is not None for w in ws) and len({(w.block, w.zero_point is None) for w in ws}) == 1
    if len(mods) > 1 and not int4 and any(w is not None for w in ws):  # mixed: one matmul each, outputs concatenated
        parts = [_linear(g, x, f"{name}.{k}", [m], [f], accuracy_level, report) for k, (m, f) in enumerate(zip(mods, floats))]
        return g.op("Concat", parts, axis=-1)[0]
    if int4:
        block, cols = ws[0].block, ws[0].cols
        rows = sum(w.rows for w in ws)
        packed = np.concatenate([np.asarray(w.packed, np.uint8).reshape(w.rows, -1) for w in ws])
        ins = [x, g.init(name + ".q4", (packed ^ 0x88).reshape(rows, cols // block, block // 2)),
               g.init(name + ".scales", np.concatenate([np.asarray(w.scale, np.float32) for w in ws]))]
        if ws[0].zero_point is not None:
            z = np.concatenate([np.asarray(w.zero_point, np.uint8) for w in ws])
            z = z if z.shape[1] % 2 == 0 else np.concatenate([z, np.zeros((rows, 1), np.uint8)], axis=1)
            ins.append(g.init(name + ".zero_points", z[:, 0::2] | (z[:, 1::2] << 4)))
        y = g.op("MatMulNBits", ins, domain=_MS, K=cols, N=rows, bits=4, block_size=block,
                 accuracy_level=_level(mods, accuracy_level))[0]
        report["matmul_nbits"] += [name]
    elif len(mods) == 1 and _int8_of(mods[0]) is not None:  # an int8 layer (e.g. lm_head): its own integers, 8-bit
        codes, scales, block = _int8_of(mods[0])
        ins = [x, g.init(name + ".q8", codes), g.init(name + ".scales", scales)]
        y = g.op("MatMulNBits", ins, domain=_MS, K=codes.shape[1] * block, N=codes.shape[0], bits=8, block_size=block,
                 accuracy_level=_level(mods, accuracy_level))[0]
        report["matmul_nbits"] += [name]
    else:
        w = torch.cat([f.weight.detach().float().cpu() for f in floats])
        y = g.op("MatMul", [x, g.init(name + ".weight_t", w.T.contiguous().numpy())])[0]
        if any(w is None and type(m).__name__ == "QuantizedLinear" for w, m in zip(ws, mods)):
            report["left_float"] += [name]
    if any(getattr(f, "bias", None) is not None for f in floats):
        b = torch.cat([f.bias.detach().float().cpu() if f.bias is not None else torch.zeros(f.out_features) for f in floats])
        y = g.op("Add", [y, g.init(name + ".bias", b.numpy())])[0]
    return y


def _fused_blocker(model: nn.Module) -> str | None:
    """Why the fused graph cannot hold ``model`` (ONNX Runtime's GroupQueryAttention rules), or None."""
    cfg = model.config
    act = str(getattr(cfg, "hidden_act", "silu"))
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r} (the fused MLP is SiLU-gated)"
    attn = model.model.layers[0].self_attn
    hd = int(getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    if hd % 16:
        return f"head_dim {hd} (GroupQueryAttention needs a multiple of 16)"
    return None


def _fused_graph(onnx: Any, model: nn.Module, twin: nn.Module, accuracy_level: int | None, embedding_int8: Any,
                 report: dict[str, Any]) -> Any:
    """The decoder as ONNX Runtime's fused CPU ops: GroupQueryAttention (rotary inside, the cache
    concat inside), SkipSimplifiedLayerNormalization, MatMulNBits; q/k/v and gate/up fused."""
    helper, TP = onnx.helper, onnx.TensorProto
    cfg, inner, tinner = model.config, model.model, twin.model
    dec = LlamaDecoder(twin)
    L, H, KV, hd = dec.layers, dec.heads, dec.kv_heads, dec.head_dim
    hidden, vocab = int(cfg.hidden_size), int(cfg.vocab_size)
    past_names, present_names = _names(L)
    g = _Graph(onnx)
    mask = "attention_mask"
    one = g.init("const.one", np.array([1], np.int64))
    seqlens = g.op("Cast", [g.op("Sub", [g.op("ReduceSum", [mask, one], keepdims=0)[0], one])[0]], to=TP.INT32)[0]
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", [mask])[0], g.init("const.axis1", np.array(1, np.int64))])[0]],
                 to=TP.INT32)[0]
    max_pos = int(getattr(cfg, "max_position_embeddings", 4096) or 4096)
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * dec.inv_freq[None]
    cos = g.init("rope.cos", (freqs.cos() * dec.rope_scale).numpy())
    sin = g.init("rope.sin", (freqs.sin() * dec.rope_scale).numpy())
    # embedding
    emb_mod = inner.embed_tokens
    w4 = _int4_of(emb_mod)
    if w4 is not None and w4.zero_point is None:
        name = "embed_tokens.q4"
        g.inits.append(helper.make_tensor(name, TP.INT4, [w4.rows, w4.cols], np.asarray(w4.packed, np.uint8).tobytes(), raw=True))
        x = g.op("GatherBlockQuantized", [name, "input_ids", g.init("embed_tokens.scales", np.asarray(w4.scale, np.float32))],
                 domain=_MS, gather_axis=0, quantize_axis=1, block_size=w4.block)[0]
        report["gather_block_quantized"] += ["model.embed_tokens"]
        embedding = "int4"
    elif embedding_int8 is not None and _shares_int8_table(model):
        # lm_head multiplies by this very table (TiedQuantizedHead): one set of codes in the file, laid
        # out (vocab, blocks, block) as the head's bits=8 MatMulNBits needs; the gather reads it per block
        codes, scales = embedding_int8
        blocks = scales.shape[1]
        codes3, scales3 = codes.reshape(vocab, blocks, -1), scales.reshape(vocab, blocks, 1)
        rows = g.op("GatherBlockQuantized", [g.init("embed_tokens.q8", codes3), "input_ids", g.init("embed_tokens.scales", scales3),
                                             g.init("embed_tokens.zero_points", np.full(scales3.shape, 128, np.uint8))],
                    domain=_MS, gather_axis=0, quantize_axis=2, block_size=hidden // blocks, bits=8)[0]
        x = g.op("Reshape", [rows, g.init("const.rows", np.array([0, 0, hidden], np.int64))])[0]
        embedding = "int8"
    elif embedding_int8 is not None:
        codes, scales = embedding_int8
        x = g.op("GatherBlockQuantized", [g.init("embed_tokens.q8", codes), "input_ids", g.init("embed_tokens.scales", scales),
                                          g.init("embed_tokens.zero_points", np.full(scales.shape, 128, np.uint8))],
                 domain=_MS, gather_axis=0, quantize_axis=1, block_size=hidden // scales.shape[1], bits=8)[0]
        embedding = "int8"
    else:
        table = tinner.embed_tokens.weight.detach().float().cpu()
        x = g.op("Gather", [g.init("embed_tokens.weight", table.numpy()), "input_ids"])[0]
        embedding = "float32"
    norms = [(lay.input_layernorm, lay.post_attention_layernorm) for lay in tinner.layers]

    def gamma(norm: nn.Module, name: str) -> tuple[str, float]:
        return g.init(name, norm.weight.detach().float().cpu().numpy()), float(norm.variance_epsilon)

    w, eps = gamma(norms[0][0], "layers.0.input_layernorm.weight")
    h = g.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=eps)[0]
    res = x
    for i, (lay, tlay) in enumerate(zip(inner.layers, tinner.layers)):
        p = f"layers.{i}."
        a, ta = lay.self_attn, tlay.self_attn
        qkv = _linear(g, h, p + "qkv_proj", [a.q_proj, a.k_proj, a.v_proj], [ta.q_proj, ta.k_proj, ta.v_proj], accuracy_level, report)
        attn = g.op("GroupQueryAttention", [qkv, "", "", past_names[2 * i], past_names[2 * i + 1], seqlens, total, cos, sin],
                    ["attn_" + str(i), present_names[2 * i], present_names[2 * i + 1]], domain=_MS, num_heads=H, kv_num_heads=KV,
                    do_rotary=1, rotary_interleaved=0, scale=dec.scaling)[0]
        o = _linear(g, attn, p + "o_proj", [a.o_proj], [ta.o_proj], accuracy_level, report)
        w, eps = gamma(norms[i][1], p + "post_attention_layernorm.weight")
        h, _, _, res = g.op("SkipSimplifiedLayerNormalization", [o, res, w], 4, domain=_MS, epsilon=eps)
        m, tm = lay.mlp, tlay.mlp
        inter = int(tm.gate_proj.out_features)
        gu = _linear(g, h, p + "gate_up_proj", [m.gate_proj, m.up_proj], [tm.gate_proj, tm.up_proj], accuracy_level, report)
        gate, up = g.op("Split", [gu, g.init(p + "split", np.array([inter, inter], np.int64))], 2, axis=-1)
        act_out = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])[0], up])[0]
        d = _linear(g, act_out, p + "down_proj", [m.down_proj], [tm.down_proj], accuracy_level, report)
        nxt = norms[i + 1][0] if i + 1 < L else tinner.norm
        w, eps = gamma(nxt, f"layers.{i + 1}.input_layernorm.weight" if i + 1 < L else "norm.weight")
        h, _, _, res = g.op("SkipSimplifiedLayerNormalization", [d, res, w], 4, domain=_MS, epsilon=eps)
    # head: int4, a float head tied to the float table (one Gemm on the table), the int8 table's own
    # codes (a TiedQuantizedHead: bits=8 MatMulNBits on the gather's initializer), or a float MatMul
    tied = getattr(tinner.embed_tokens, "weight", None) is getattr(twin.lm_head, "weight", 0) and embedding == "float32"
    if embedding == "int8" and _shares_int8_table(model):
        codes, scales = embedding_int8
        y = g.op("MatMulNBits", [h, "embed_tokens.q8", g.init("lm_head.scales", scales.reshape(-1))], domain=_MS, K=hidden,
                 N=vocab, bits=8, block_size=hidden // scales.shape[1], accuracy_level=_level([model.lm_head], accuracy_level))[0]
        report["matmul_nbits"] += ["lm_head"]
        g.op("Identity", [y], ["logits"])
        tied = True
    elif tied:
        flat = g.op("Reshape", [h, g.init("const.flat", np.array([-1, hidden], np.int64))])[0]
        y = g.op("Gemm", [flat, "embed_tokens.weight"], transB=1)[0]
        shape = g.op("Concat", [g.op("Shape", ["input_ids"])[0], g.init("const.vocab", np.array([vocab], np.int64))], axis=0)[0]
        g.op("Reshape", [y, shape], ["logits"])
    else:
        y = _linear(g, h, "lm_head", [model.lm_head], [twin.lm_head], accuracy_level, report)
        g.op("Identity", [y], ["logits"])
    f32 = TP.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TP.INT64, ["batch", "total"])]
    inputs += [helper.make_tensor_value_info(n, f32, ["batch", KV, "past", hd]) for n in past_names]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", vocab])]
    outputs += [helper.make_tensor_value_info(n, f32, ["batch", KV, "total", hd]) for n in present_names]
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(_MS, 1)],
                              producer_name="torchslim")
    proto.ir_version = 9
    return proto, embedding, tied


def _has_quantized(model: nn.Module) -> bool:
    from torchslim.export.onnx_int import onnx_lowering

    return any((lw := onnx_lowering(m)) is not None and lw.float_module is not None for m in model.modules())


def _spec(model: nn.Module) -> str | None:
    from torchslim._modelinfo import model_info

    info = model_info(model)
    return None if info is None else info.spec


@torch.no_grad()
def export_onnx_decoder(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    accuracy_level: int | None = None,
    embedding_bits: int | None = None,
    embedding_group_size: int = 32,
    fused: bool | None = None,
    opset: int = 17,
) -> dict[str, Any]:
    """Write ``model`` (a Llama-layout transformers causal LM, float or quantized) as an ONNX
    decoder with a KV cache at ``path`` (see the module doc for the inputs and outputs).

    The model is not changed (a quantized one is exported through a float copy).

    Args:
        model: ``LlamaForCausalLM`` (or Mistral / Qwen2), float or with int4 ``QuantizedLinear`` /
            ``QuantizedEmbedding`` layers (``quantize_``, ``gptq_``...).
        path: the ``.onnx`` file, written atomically.
        accuracy_level: ``MatMulNBits`` compute type of the int4 / int8 layers: ``None``
            (default) = each layer's own, so the file computes what the torch model does (4 =
            int8 activations per block, ONNX Runtime's fast CPU kernels, for layers quantized with
            ``compute="int8"``, the default of ``quantize_llm_``; 0 = float activations); an
            explicit 0..4 overrides every layer.
        embedding_bits: ``8`` writes a float (or 8-bit) embedding table as a bits=8
            ``GatherBlockQuantized`` (symmetric, groups of ``embedding_group_size``); ``None``
            keeps the table as the model stores it (float, or int4 ``QuantizedEmbedding``).
        embedding_group_size: the group size of ``embedding_bits=8`` for a float table.
        opset: ONNX opset of the TorchScript exporter (<= 17 recommended).

    Returns:
        ``{"path", "bytes", "layers", "heads", "kv_heads", "head_dim", "vocab", "matmul_nbits",
        "gather_block_quantized", "left_float", "embedding", "accuracy_level", "inputs", "outputs"}``.

    Raises:
        ConfigError: not a Llama-layout decoder (architecture named), bad ``accuracy_level`` /
            ``embedding_bits`` / group size.
    """
    onnx = require("onnx", "ONNX decoder export")
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level must be None (each layer's own) or 0..4 (MatMulNBits); got {accuracy_level!r}")
    if embedding_bits not in (None, 8):
        raise ConfigError(f"embedding_bits must be None (as stored) or 8; got {embedding_bits!r}")
    _check_model(model)
    if embedding_bits == 8 and isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight:
        raise ConfigError("embedding_bits=8: the float lm_head is tied to the embedding table, so the float table ships "
                          "anyway; quantize lm_head first (e.g. quantize_ weight-only int4) or leave embedding_bits=None")
    hidden = int(model.config.hidden_size)
    if embedding_bits == 8 and (embedding_group_size < 16 or embedding_group_size & (embedding_group_size - 1)
                                or hidden % embedding_group_size):
        raise ConfigError(f"embedding_group_size must be a power of two >= 16 dividing hidden_size {hidden}; "
                          f"got {embedding_group_size!r}")
    from torchslim._utils import evaluating
    from torchslim.export.onnx_int import float_twin

    blocker = _fused_blocker(model)
    if fused and blocker:
        raise ConfigError(f"export_onnx_decoder(fused=True): {blocker}; use fused=False (the reference graph)")
    fused = blocker is None if fused is None else bool(fused)
    if type(getattr(model, "lm_head", None)).__name__ == "TiedQuantizedHead" and not (fused and _shares_int8_table(model)):
        raise ConfigError("lm_head multiplies by the quantized token table (tie_head): the ONNX decoder shares an 8-bit "
                          "table with the head in the fused graph only" + ("" if fused else "; use fused=None")
                          + ("" if _is_int8_table(model.model.embed_tokens) else "; this table is not 8-bit: quantize "
                             "with embedding_bits=8, or tie_head=False"))
    quantized = _has_quantized(model)
    out = Path(path)
    report: dict[str, Any] = {"matmul_nbits": [], "gather_block_quantized": [], "left_float": [], "why_float": {}}
    with evaluating(model):
        _int4_cache.clear()
        # the fused graph writes int4 layers from their integers: the float twin only where some ship as float
        needs_twin = quantized and (not fused or _fused_needs_twin(model))
        twin = float_twin(model) if needs_twin else model
        dec = LlamaDecoder(twin).eval()
        int8 = _embedding_int8(model, embedding_group_size) if (embedding_bits == 8 or _is_int8_table(model.model.embed_tokens)) else None
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
            if fused:
                proto, embedding, tied = _fused_graph(onnx, model, twin, accuracy_level, int8, report)
            else:
                proto, embedding, tied, report = _reference_graph(onnx, model, twin, dec, Path(tmp), accuracy_level, int8,
                                                                  opset, quantized)
            levels = sorted({4 if getattr(m, "act_block", 0) else 0 for m in model.modules()
                             if type(m).__name__ == "QuantizedLinear"}) if accuracy_level is None else [accuracy_level]
            level = None if not report["matmul_nbits"] or not levels else levels[0] if len(levels) == 1 else levels
            meta = {"format": 1, "graph": "fused" if fused else "reference", "layers": dec.layers, "heads": dec.heads,
                    "kv_heads": dec.kv_heads, "head_dim": dec.head_dim, "vocab": int(model.config.vocab_size),
                    "architecture": type(model).__name__, "spec": _spec(model),
                    "positions": ("past length + index: no left padding (GroupQueryAttention reads sum(attention_mask) - 1 "
                                  "as each row's last position)") if fused else "cumsum(attention_mask) - 1 (left padding works)",
                    "accuracy_level": level, "embedding": embedding,
                    "tied_head_shares_table": bool(tied)}
            del proto.metadata_props[:]
            entry = proto.metadata_props.add()
            entry.key, entry.value = META_KEY, json.dumps(meta)
            with atomic_path(out) as final:
                onnx.save(proto, str(final))
        _int4_cache.clear()
    past_names, present_names = _names(dec.layers)
    return {"path": str(out), "bytes": out.stat().st_size, **{k: meta[k] for k in ("graph", "layers", "heads", "kv_heads", "head_dim", "vocab")},
            "matmul_nbits": list(report["matmul_nbits"]), "gather_block_quantized": list(report["gather_block_quantized"]),
            "left_float": list(report["left_float"]), "why_float": dict(report.get("why_float", {})), "embedding": embedding,
            "accuracy_level": meta["accuracy_level"], "tied_head_shares_table": meta["tied_head_shares_table"],
            "inputs": ["input_ids", "attention_mask", *past_names], "outputs": ["logits", *present_names]}


def _reference_graph(onnx: Any, model: nn.Module, twin: nn.Module, dec: LlamaDecoder, tmp: Path, accuracy_level: int | None,
                     int8: Any, opset: int, quantized: bool) -> tuple[Any, str, bool, dict[str, Any]]:
    """:class:`LlamaDecoder` through the TorchScript exporter, int4 weights rewritten by value."""
    from torchslim.export._base import quiet
    from torchslim.export.onnx_int import int4_weights
    from torchslim.export.onnx_nbits import write_nbits_onnx

    past_names, present_names = _names(dec.layers)
    b, s, p = 1, 2, 3
    device = next(twin.parameters()).device
    ids = torch.zeros(b, s, dtype=torch.long, device=device)
    mask = torch.ones(b, p + s, dtype=torch.long, device=device)
    past = [torch.zeros(b, dec.kv_heads, p, dec.head_dim, device=device) for _ in past_names]
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                                       "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in past_names})
    axes.update({n: {0: "batch", 2: "total"} for n in present_names})
    emb_weight = twin.model.embed_tokens.weight.detach().float().cpu().numpy()
    fp32 = tmp / "decoder.fp32.onnx"
    with quiet():
        torch.onnx.export(dec, (ids, mask, *past), str(fp32), dynamo=False, opset_version=opset,
                          input_names=["input_ids", "attention_mask", *past_names],
                          output_names=["logits", *present_names], dynamic_axes=axes, do_constant_folding=True)
    report: dict[str, Any] = {"matmul_nbits": [], "gather_block_quantized": [], "left_float": [], "why_float": {}}
    weights = int4_weights(model) if quantized else []
    staged = tmp / "decoder.onnx"
    if weights:
        report = write_nbits_onnx(fp32, staged, weights, accuracy_level=accuracy_level)
    else:
        staged = fp32
    proto = onnx.load(str(staged))
    tied = twin.lm_head.weight is twin.model.embed_tokens.weight and _share_tied_head(onnx, proto, emb_weight)
    embedding = "int4" if any("embed_tokens" in n for n in report["gather_block_quantized"]) else "float32"
    if int8 is not None and _gather_to_int8(onnx, proto, *int8, emb_weight):
        embedding = "int8"
    return proto, embedding, tied, report
