"""GGUF export of decoder LLMs (llama.cpp, ollama): Q4_0 and Q8_0 carried over bit-exactly, F16 / F32.

:func:`export_gguf` writes a transformers decoder (``LlamaForCausalLM``; ``Gemma3ForCausalLM``)
as one GGUF file with the ``gguf`` package. Tensor names come from ``gguf``'s own name map, the
architecture hyperparameters from the module shapes themselves (so a pruned model, with fewer
layers, heads or MLP channels, is described as it is; per-layer widths that differ are written as
arrays), and the tokenizer and ``general.*`` keys from the source GGUF file of a
``pretrained:NAME`` model (or ``tokenizer_from=``), so llama.cpp can run the file as it stands.

**Integer weights are carried over, not requantized.** A ``QuantizedLinear`` (or
``QuantizedEmbedding``) of torchslim whose value is ``c * s`` with integers ``c`` in ``[-8, 7]``
and one fp16 scale ``s`` per 32 consecutive input elements is a Q4_0 block exactly: ggml's Q4_0
stores ``d`` (fp16) and ``q = c + 8`` in ``0..15`` and computes ``(q - 8) * d``. That covers
every symmetric torchslim scheme with 2..4 bits and groups of 32 (or any multiple of 32, or per
channel, or per tensor: the scale is repeated per block). Integers in ``[-128, 127]`` (symmetric
5..8 bits, per channel or in groups of a multiple of 32) are Q8_0 blocks (``q * d``) exactly.
The integers and scales are recovered from the module's own dequantized weight and stored scales
and checked (``c * s`` must reproduce the weight bit for bit) before they are written.

Torchslim's symmetric int4 picks ``s = max|w| / 7.5`` and rounds half to even into ``[-8, 7]``;
ggml's Q4_0 quantizer picks ``d = w_max / -8`` (``w_max`` the value of largest magnitude, so
``d`` may be negative) and rounds half up. The grids are the same (16 levels ``-8d .. 7d``), the
choice of scale differs: both are written exactly. :func:`gguf_scheme` gives the QScheme fields
that make torchslim's RTN / GPTQ / AWQ produce Q4_0- or Q8_0-exact weights, and
:func:`ggml_quantize` computes ggml's own integers and scales (bit-identical to
``gguf.quants.quantize``) for a torchslim module built with ``QuantizedLinear.from_ints``.

**Weights not on a GGUF grid** (asymmetric zero points, groups that are not a multiple of 32,
int8 asked to be Q4_0) are *snapped*: requantized with ggml's rounding from the module's
dequantized weight (integer weights asked to be F16 are rounded to fp16 where they are not fp16
numbers), and ``info["snapped"]`` names each such tensor with the largest absolute change it
caused (``info["max_snap_error"]`` the largest of all). With
``requantize=False`` they are refused with a :class:`~torchslim.errors.ConfigError` instead.
A weight whose rows are not a multiple of 32 cannot be Q4_0 / Q8_0 at all and is written in
``float_type`` (listed in ``info["float_fallback"]``).

Float tensors: norms are always F32; float Linear weights follow ``weight_type`` (``"auto"``:
``float_type``, F32 by default, so a float model is written losslessly); a float embedding
follows ``embedding_type``. Explicit ``"q4_0"`` / ``"q8_0"`` quantize float weights with
ggml's rounding (``info["quantized_from_float"]`` reports their largest error). A tied
``lm_head`` is written once, as ``token_embd`` (what llama.cpp expects), also when it multiplies
by the quantized table (``TiedQuantizedHead`` of ``quantize_llm_``: the table's integers are
``token_embd``); an ``lm_head`` that is no longer tied (e.g. quantized apart from the embedding)
is written as ``output``.

LLaMA's Q and K projections are stored by llama.cpp with the rows of each head interleaved for
its rotary embedding (transformers' GGUF loader undoes it); the writer permutes those rows (and
their scales, biases) the same way, which keeps every 32-element block intact.

The file is built under a temporary name and renamed into place (:mod:`torchslim._fs`).
:func:`read_gguf_weights` and :func:`gguf_metadata` read a file back (dequantized with
``gguf.quants``). ``ts.export(model, inputs, "model.gguf")`` uses this writer with the defaults
and checks the file by loading it into transformers and comparing logits (:func:`export_checked`).

Example:
    >>> import tempfile, os, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from torchslim.export.gguf import export_gguf, read_gguf_weights
    >>> _ = torch.manual_seed(0)
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     r = export_gguf(model, os.path.join(d, "tiny.gguf"), weight_type="q8_0")
    ...     w = read_gguf_weights(r.path)
    >>> r.info["types"]
    {'F32': 4, 'Q8_0': 8}
    >>> tuple(w["blk.0.ffn_up.weight"].shape)
    (64, 32)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim._fs import atomic_path
from torchslim._optional import require
from torchslim.errors import ConfigError, type_error
from torchslim.export._base import ExportError, failure_reason, staging
from torchslim.export.api import ExportResult
from torchslim.export.gguf_grids import QBLOCK, encode_blocks, ggml_quantize, gguf_scheme
from torchslim.export.gguf_read import (
    _gguf,
    _read_kv,
    gguf_metadata,
    gguf_tensor_types,
    read_gguf_weights,
)
from torchslim.graph.inputs import Inputs

__all__ = [
    "GGUF_TYPES",
    "export_gguf",
    "ggml_quantize",
    "gguf_metadata",
    "gguf_scheme",
    "gguf_tensor_types",
    "read_gguf_weights",
]

GGUF_TYPES = ("auto", "q4_0", "q8_0", "f16", "f32")
_FLOAT_TYPES = ("f32", "f16")
_ARCHS = {  # transformers model_type -> (GGUF architecture, Q/K rows interleaved for rope, added to norm weights)
    "llama": ("llama", True, 0.0),
    "gemma3_text": ("gemma3", False, 1.0),
}


# --------------------------------------------------------------------------- one tensor


def _is_quantized(module: nn.Module) -> bool:
    """A torchslim integer-weight module (duck-typed: the export layer does not import quantize)."""
    return callable(getattr(module, "dequantized_weight", None)) and hasattr(module, "scheme") and hasattr(module, "scale")


def _block_scales(module: nn.Module, rows: int, cols: int) -> torch.Tensor | None:
    """The stored scale of each 32-element block, ``(rows, cols / 32)``, or None when one block
    would hold several scales (groups that are not a multiple of 32) or the layout is unknown."""
    s = module.scheme
    scale = module.scale.detach().float()
    nb = cols // QBLOCK
    if s.granularity == "tensor" and scale.numel() == 1:
        return scale.reshape(1, 1).expand(rows, nb)
    if s.granularity == "channel" and getattr(s, "axis", 0) == 0 and scale.numel() == rows:
        return scale.reshape(rows, 1).expand(rows, nb)
    if (s.granularity == "group" and s.group_size % QBLOCK == 0 and cols % s.group_size == 0
            and scale.numel() == rows * (cols // s.group_size)):
        return scale.reshape(rows, cols // s.group_size).repeat_interleave(s.group_size // QBLOCK, dim=1)
    return None


def _exact_ints(module: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """``(ints, block scales, min int, max int)`` when ``weight`` (the module's dequantized weight)
    is integers times one stored fp16 scale per 32-element block, checked bit for bit; else None."""
    rows, cols = weight.shape
    if not getattr(module.scheme, "symmetric", False) or cols % QBLOCK:
        return None
    per_block = _block_scales(module, rows, cols)
    if per_block is None or not bool(torch.isfinite(per_block).all()):
        return None
    if not torch.equal(per_block.half().float(), per_block):
        return None
    s3 = per_block.unsqueeze(-1)
    w3 = weight.reshape(rows, cols // QBLOCK, QBLOCK)
    ints = torch.round(w3 / torch.where(s3 == 0, torch.ones_like(s3), s3))  # a zero scale holds zeros: 0 / 1
    lo, hi = torch.aminmax(ints)
    if lo < -128 or hi > 127 or not torch.equal(ints * s3, w3):
        return None
    return ints.to(torch.int16).reshape(rows, cols), per_block.half(), int(lo), int(hi)


def _float_array(w: torch.Tensor, kind: str) -> np.ndarray:
    return w.detach().to(torch.float16 if kind == "f16" else torch.float32).contiguous().numpy()


class _Plan:
    """Decides and encodes each tensor; collects what the returned ``info`` says about them."""

    def __init__(self, weight_type: str, embedding_type: str, float_type: str, requantize: bool) -> None:
        self.weight_type, self.embedding_type, self.float_type = weight_type, embedding_type, float_type
        self.requantize = requantize
        self.types: dict[str, str] = {}
        self.exact: list[str] = []
        self.snapped: dict[str, float] = {}
        self.from_float: dict[str, float] = {}
        self.fallback: list[str] = []

    def matrix(self, name: str, module: nn.Module, weight: torch.Tensor, rows_perm: torch.Tensor | None,
               requested: str) -> tuple[np.ndarray, Any]:
        """Encode a 2-D weight (Linear / Embedding, float or torchslim-quantized)."""
        gguf = _gguf()
        quantized = _is_quantized(module)
        rows, cols = weight.shape
        exact = _exact_ints(module, weight) if quantized else None
        if requested == "auto":
            if exact is not None:
                kind = "q4_0" if exact[2] >= -8 and exact[3] <= 7 else "q8_0"
            elif quantized:
                bits = module.scheme.bits
                kind = "q4_0" if bits <= 4 else "q8_0" if bits <= 8 else self.float_type
            else:
                kind = self.float_type
        else:
            kind = requested
        if kind in ("q4_0", "q8_0") and cols % QBLOCK:
            self.fallback.append(name)
            kind = self.float_type
        if kind in _FLOAT_TYPES:
            self.types[name] = kind.upper()
            w = weight if rows_perm is None else weight[rows_perm]
            data = _float_array(w, kind)
            if quantized and kind == "f16":  # integers times fp16 scales need not be fp16 numbers
                err = float((torch.from_numpy(data).float() - w).abs().max()) if w.numel() else 0.0
                if err > 0:
                    self._refuse_unless_requantize(name, module, kind)
                    self.snapped[name] = err
            return data, None
        lo, hi = (-8, 7) if kind == "q4_0" else (-128, 127)
        if exact is not None and exact[2] >= lo and exact[3] <= hi:
            ints, scales = exact[0], exact[1]
            self.exact.append(name)
        else:
            if quantized:
                self._refuse_unless_requantize(name, module, kind)
            ints, scales = ggml_quantize(weight, kind)
            err = float((ints.float().reshape(rows, -1, QBLOCK) * scales.float().unsqueeze(-1)).reshape(rows, cols)
                        .sub(weight.float()).abs().max()) if weight.numel() else 0.0
            (self.snapped if quantized else self.from_float)[name] = err
        if rows_perm is not None:
            ints, scales = ints[rows_perm], scales[rows_perm]
        self.types[name] = kind.upper()
        qtype = gguf.GGMLQuantizationType.Q4_0 if kind == "q4_0" else gguf.GGMLQuantizationType.Q8_0
        return encode_blocks(ints, scales, kind), qtype

    def _refuse_unless_requantize(self, name: str, module: nn.Module, kind: str) -> None:
        if self.requantize:
            return
        s = module.scheme
        raise ConfigError(
            f"{name} ({type(module).__name__}, int{s.bits} {'symmetric' if s.symmetric else 'asymmetric'} "
            f"{s.granularity}{'' if s.granularity != 'group' else ' ' + str(s.group_size)}) is not on the "
            f"{kind.upper()} grid; pass requantize=True to snap it, or quantize with gguf_scheme('q4_0' or 'q8_0')")


# --------------------------------------------------------------------------- model walk


def _config_value(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _rope(config: Any, arch: str) -> tuple[float, dict[str, Any]]:
    """rope theta (of the full-attention layers) and the parameters, refusing scaled rope."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, Mapping) and "full_attention" in params:  # per layer type (Gemma-3, transformers 5)
        params = params["full_attention"] or {}
    theta = params.get("rope_theta") if isinstance(params, Mapping) else None
    theta = theta if theta is not None else _config_value(config, "rope_theta", default=10000.0)
    rope_type = (params.get("rope_type") or params.get("type") or "default") if isinstance(params, Mapping) else "default"
    scaling = getattr(config, "rope_scaling", None)
    if rope_type == "default" and isinstance(scaling, Mapping):
        rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "linear") or (rope_type == "linear" and arch != "gemma3_text"):
        raise ConfigError(f"GGUF export supports default rotary embeddings only for {arch}; this model uses rope "
                          f"type {rope_type!r}")
    return float(theta), dict(params) if isinstance(params, Mapping) else {}


def _layers(model: nn.Module) -> Any:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ConfigError(f"export_gguf needs a transformers decoder with model.layers (LlamaForCausalLM, "
                          f"Gemma3ForCausalLM); got {type(model).__name__}")
    return inner, layers


def _out_features(module: nn.Module) -> int:
    return int(module.out_features if hasattr(module, "out_features") else module.weight.shape[0])


def _hyperparameters(model: nn.Module, arch: str) -> dict[str, Any]:
    """The architecture keys, read from the module shapes (a pruned model is described as it is)."""
    config = model.config
    inner, layers = _layers(model)
    emb = inner.embed_tokens
    vocab, hidden = (emb.num_embeddings, emb.embedding_dim)
    heads0 = int(config.num_attention_heads)
    head_dim = int(_config_value(config, "head_dim", default=0) or config.hidden_size // heads0)
    ffn, heads, kv = [], [], []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        ffn.append(_out_features(mlp.gate_proj))
        heads.append(_out_features(attn.q_proj) // head_dim)
        kv.append(_out_features(attn.k_proj) // head_dim)
    theta, _ = _rope(config, config.model_type)
    one = lambda xs: xs[0] if len(set(xs)) == 1 else list(xs)  # noqa: E731  (an array when layers differ)
    hp: dict[str, Any] = {
        "context_length": int(_config_value(config, "max_position_embeddings", default=2048)),
        "embedding_length": int(hidden),
        "block_count": len(layers),
        "feed_forward_length": one(ffn),
        "attention.head_count": one(heads),
        "attention.head_count_kv": one(kv),
        "rope.freq_base": theta,
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "vocab_size": int(vocab),
    }
    if arch == "llama":
        hp["rope.dimension_count"] = head_dim
        if heads[0] and head_dim * heads[0] != hidden:
            hp["attention.key_length"] = hp["attention.value_length"] = head_dim
    else:  # gemma3
        _check_gemma3(config, len(layers), head_dim)
        hp["attention.key_length"] = hp["attention.value_length"] = head_dim
        window = _config_value(config, "sliding_window")
        if window:
            hp["attention.sliding_window"] = int(window)
        scaling = getattr(config, "rope_scaling", None) or {}
        params = getattr(config, "rope_parameters", None) or {}
        full = params.get("full_attention", params) if isinstance(params, Mapping) else {}
        factor = (full or {}).get("factor") or (scaling.get("factor") if isinstance(scaling, Mapping) else None)
        if factor and float(factor) != 1.0:
            hp["rope.scaling.type"] = "linear"
            hp["rope.scaling.factor"] = float(factor)
    return hp


def _check_gemma3(config: Any, n_layers: int, head_dim: int) -> None:
    """llama.cpp fixes three things of Gemma-3 that GGUF does not describe: every 6th layer global
    (the others sliding-window), rope theta 10000 on the sliding layers, and 1/sqrt(head_dim)
    attention scaling. A model that differs would run wrongly there: refuse it."""
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
    types = list(getattr(config, "layer_types", None) or expected)
    if types != expected:
        raise ConfigError(f"GGUF export of Gemma-3: llama.cpp makes every 6th layer global; this model's layer types "
                          f"are {types} (e.g. after removing layers)")
    params = getattr(config, "rope_parameters", None) or {}
    local = (params.get("sliding_attention") or {}).get("rope_theta") if isinstance(params, Mapping) else None
    local = local if local is not None else _config_value(config, "rope_local_base_freq", default=10000.0)
    if float(local) != 10000.0:
        raise ConfigError(f"GGUF export of Gemma-3: llama.cpp uses rope theta 10000 on sliding layers; this model "
                          f"uses {local}")
    scalar = _config_value(config, "query_pre_attn_scalar", default=head_dim)
    if int(scalar) != head_dim:
        raise ConfigError(f"GGUF export of Gemma-3: llama.cpp scales attention by 1/sqrt(head_dim={head_dim}); this "
                          f"model has query_pre_attn_scalar={scalar}")


def _qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp stores Q / K in: within each head, rows (2, half) are stored (half, 2)."""
    if n_head < 1 or rows % (2 * n_head):
        raise ConfigError(f"cannot interleave {rows} Q/K rows into {n_head} rotary heads")
    half = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, 2, half).transpose(1, 2).reshape(-1)


def _source_gguf(model: nn.Module, tokenizer_from: Any) -> Path | None:
    if tokenizer_from is False:
        return None
    if tokenizer_from is None:
        from torchslim._modelinfo import model_info

        info = model_info(model)
        spec = getattr(info, "spec", None) or ""
        if not (isinstance(spec, str) and spec.startswith("pretrained:")):
            return None
        tokenizer_from = spec
    if isinstance(tokenizer_from, str) and tokenizer_from.startswith("pretrained:"):
        from torchslim.zoo.pretrained_llm import gguf_file, is_llm

        name = tokenizer_from.split(":", 1)[1]
        if not is_llm(name):
            raise ConfigError(f"tokenizer_from={tokenizer_from!r} is not a pretrained decoder LLM with a GGUF file")
        return gguf_file(name)
    if isinstance(tokenizer_from, (str, os.PathLike)):
        p = Path(tokenizer_from)
        if not p.is_file():
            raise ConfigError(f"tokenizer_from={str(tokenizer_from)!r} is not a file; give a GGUF file, "
                              "'pretrained:NAME', None (the model's own source) or False (no tokenizer)")
        return p
    raise type_error("tokenizer_from", tokenizer_from, "a GGUF file path, 'pretrained:NAME', None or False")


_SKIP_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")
def _copy_metadata(writer: Any, source: Path, vocab: int) -> int:
    """Copy ``general.*`` and ``tokenizer.*`` keys of ``source`` into ``writer``; returns the number copied."""
    gguf = _gguf()
    fields = _read_kv(source)
    tokens = next((v for k, _, v, _ in fields if k == "tokenizer.ggml.tokens"), None)
    if tokens is not None and len(tokens) != vocab:
        raise ConfigError(f"the tokenizer of {source.name} has {len(tokens)} tokens but the model's vocabulary "
                          f"has {vocab} rows; pass tokenizer_from=False or a matching GGUF file")
    n = 0
    for key, vtype, value, sub in fields:
        if not (key.startswith("general.") or key.startswith("tokenizer.")) or key in _SKIP_KEYS:
            continue
        writer.add_key_value(key, value, gguf.GGUFValueType(vtype),
                             sub_type=None if sub is None else gguf.GGUFValueType(sub))
        n += 1
    return n


def _add_hparam(writer: Any, arch: str, key: str, value: Any) -> None:
    gguf = _gguf()
    full = f"{arch}.{key}"
    if isinstance(value, list):
        writer.add_key_value(full, [int(v) for v in value], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    elif isinstance(value, str):
        writer.add_string(full, value)
    elif isinstance(value, float):
        writer.add_float32(full, value)
    else:
        writer.add_uint32(full, int(value))


@contextlib.contextmanager
def _float_inputs(model: nn.Module) -> Iterator[None]:
    """Within the block, layers that round their inputs to int8 per group (``act_block``) take float
    inputs; restored after."""
    saved = [(m, m.act_block) for m in model.modules() if getattr(m, "act_block", 0)]
    for m, _ in saved:
        m.act_block = 0
    try:
        yield
    finally:
        for m, block in saved:
            m.act_block = block


def _check_type(what: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value.lower()


@torch.no_grad()
def export_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    weight_type: str = "auto",
    embedding_type: str = "auto",
    float_type: str = "f32",
    requantize: bool = True,
    tokenizer_from: Any = None,
) -> ExportResult:
    """Write a transformers decoder LLM as a GGUF file (see the module doc).

    Args:
        model: ``LlamaForCausalLM`` or ``Gemma3ForCausalLM``, float or with torchslim integer
            layers (not modified).
        path: the ``.gguf`` file to write (its directory must exist).
        weight_type: Linear weights: ``"auto"`` (integer layers in the exact GGUF type, float
            layers in ``float_type``), ``"q4_0"``, ``"q8_0"``, ``"f16"`` or ``"f32"``.
        embedding_type: the token embedding (and a tied output), same choices.
        float_type: ``"f32"`` or ``"f16"`` for float weights under ``"auto"`` and for rows that
            cannot be blocked (norms are always F32).
        requantize: snap integer weights not on the requested grid (with the error reported in
            ``info["snapped"]``); ``False`` refuses them with a ConfigError.
        tokenizer_from: the GGUF file whose ``general.*`` / ``tokenizer.*`` keys are copied: a path,
            ``"pretrained:NAME"``, ``None`` (the model's own ``pretrained:`` source, if any) or
            ``False`` (none: llama.cpp then cannot tokenize, transformers still loads the weights).

    Returns:
        An :class:`~torchslim.export.api.ExportResult` (format ``"gguf"``, no parity report);
        ``info`` holds ``arch``, ``hyperparameters``, ``types`` (tensor count per GGUF type),
        ``tensor_types``, ``exact`` (integer tensors carried over bit-exactly), ``snapped`` and
        ``max_snap_error``, ``quantized_from_float``, ``float_fallback``, ``tied_embeddings``,
        ``tokenizer`` (the source file or None).

    Raises:
        ConfigError: an unsupported architecture (the message names the supported ones), a bad
            option, a path in a missing directory, or (``requantize=False``) a weight off the grid.
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise type_error("model", model, "an nn.Module (a transformers decoder)")
    weight_type = _check_type("weight_type", weight_type, GGUF_TYPES)
    embedding_type = _check_type("embedding_type", embedding_type, GGUF_TYPES)
    float_type = _check_type("float_type", float_type, _FLOAT_TYPES)
    if not isinstance(requantize, bool):
        raise type_error("requantize", requantize, "True or False")
    if not isinstance(path, (str, os.PathLike)):
        raise type_error("path", path, "a file path (str or os.PathLike)")
    target = Path(path)
    if not target.parent.is_dir():
        raise ConfigError(f"cannot write {str(target)!r}: the directory {str(target.parent)!r} does not exist")
    if target.is_dir():
        raise ConfigError(f"{str(target)!r} is a directory; give a file path such as {target / 'model.gguf'}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHS:
        raise ConfigError(f"GGUF export supports the architectures {', '.join(sorted(_ARCHS))} (LlamaForCausalLM, "
                          f"Gemma3ForCausalLM); got {type(model).__name__} (model_type {model_type!r})")
    gguf = _gguf()
    arch, permute_qk, norm_offset = _ARCHS[model_type]
    hp = _hyperparameters(model, arch)
    source = _source_gguf(model, tokenizer_from)
    inner, layers = _layers(model)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], len(layers))
    plan = _Plan(weight_type, embedding_type, float_type, requantize)

    emb = inner.embed_tokens
    head = getattr(model, "lm_head", None)
    head_w = getattr(head, "weight", None)
    tied = head is None or getattr(head, "table", None) is emb or (  # a TiedQuantizedHead multiplies by emb itself
        isinstance(head_w, torch.Tensor) and isinstance(getattr(emb, "weight", None), torch.Tensor)
        and head_w.data_ptr() == emb.weight.data_ptr())
    heads = hp["attention.head_count"]
    kv = hp["attention.head_count_kv"]
    heads_of = (lambda i: heads[i] if isinstance(heads, list) else heads)  # noqa: E731
    kv_of = (lambda i: kv[i] if isinstance(kv, list) else kv)  # noqa: E731

    tensors: list[tuple[str, np.ndarray, Any]] = []
    for mname, module in model.named_modules():
        if mname == "lm_head" and tied:
            continue
        quantized = _is_quantized(module)
        if not quantized and not isinstance(module, (nn.Linear, nn.Embedding)):
            if next(module.children(), None) is not None or not isinstance(getattr(module, "weight", None), torch.Tensor):
                continue
        base = name_map.get_name(mname)
        if base is None:
            raise ConfigError(f"GGUF export of {arch}: the module {mname!r} ({type(module).__name__}) has no "
                              "GGUF tensor name (llama.cpp could not use it)")
        perm = None
        if permute_qk and (".attn_q" in base or ".attn_k" in base) and not base.endswith("_norm"):
            block = int(base.split(".")[1])
            n_head = heads_of(block) if base.endswith("attn_q") else kv_of(block)
            perm = _qk_permutation(_out_features(module), n_head)
        if quantized or isinstance(module, (nn.Linear, nn.Embedding)):
            weight = module.dequantized_weight() if quantized else module.weight
            weight = weight.detach().float().cpu()
            requested = embedding_type if base == "token_embd" else weight_type
            data, qtype = plan.matrix(base + ".weight", module, weight, perm, requested)
            tensors.append((base + ".weight", data, qtype))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                b = bias.detach().float().cpu()
                tensors.append((base + ".bias", _float_array(b if perm is None else b[perm], "f32"), None))
                plan.types[base + ".bias"] = "F32"
        else:  # a norm (a leaf with a 1-D weight)
            w = module.weight.detach().float().cpu()
            if w.dim() != 1:
                raise ConfigError(f"GGUF export: {mname!r} ({type(module).__name__}) holds a {w.dim()}-D weight; "
                                  "only Linear, Embedding and norm layers are supported")
            tensors.append((base + ".weight", _float_array(w + norm_offset, "f32"), None))
            plan.types[base + ".weight"] = "F32"
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                tensors.append((base + ".bias", _float_array(bias.detach().float().cpu(), "f32"), None))
                plan.types[base + ".bias"] = "F32"

    counts: dict[str, int] = {}
    for t in plan.types.values():
        counts[t] = counts.get(t, 0) + 1
    linear_types = [t for n, t in plan.types.items() if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n]
    majority = max(set(linear_types), key=linear_types.count) if linear_types else "F32"
    file_type = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "F16": gguf.LlamaFileType.MOSTLY_F16}.get(majority, gguf.LlamaFileType.ALL_F32)

    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        copied = _copy_metadata(writer, source, hp["vocab_size"]) if source is not None else 0
        for key, value in hp.items():
            _add_hparam(writer, arch, key, value)
        writer.add_file_type(int(file_type))
        if any(t in ("Q4_0", "Q8_0") for t in plan.types.values()):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    info: dict[str, Any] = {
        "arch": arch,
        "hyperparameters": hp,
        "types": dict(sorted(counts.items())),
        "tensor_types": dict(plan.types),
        "exact": list(plan.exact),
        "snapped": dict(plan.snapped),
        "max_snap_error": max(plan.snapped.values(), default=0.0),
        "quantized_from_float": dict(plan.from_float),
        "float_fallback": list(plan.fallback),
        "tied_embeddings": bool(tied),
        "tokenizer": None if source is None else str(source),
        "metadata_copied": copied,
        "weight_type": weight_type,
        "embedding_type": embedding_type,
        "float_type": float_type,
    }
    size = os.path.getsize(target)
    return ExportResult(path=target, format="gguf", files={"model": str(target)}, sizes={"model": size}, info=info,
                        parity=None, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- ts.export(..., "model.gguf")


def _load(path: Path, device: torch.device) -> Callable[[Inputs], list[torch.Tensor]]:
    """The GGUF file as transformers loads it (dequantized), returning ``[logits]``."""
    transformers = require("transformers", "loading a GGUF file back")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        logging = transformers.utils.logging
        was = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                       dtype=torch.float32).eval().to(device)
        finally:
            if was:
                logging.enable_progress_bar()
    except Exception as exc:  # transformers raises many kinds; say the file does not load
        raise ExportError(f"the GGUF file {path.name} does not load into transformers: {failure_reason(exc)}",
                          format="gguf", reason="load failed") from exc

    def run(inputs: Inputs) -> list[torch.Tensor]:
        with torch.no_grad():
            out = loaded(*inputs.args, **inputs.kwargs)
        return [out.logits if hasattr(out, "logits") else out[0]]

    return run


def export_checked(
    model: nn.Module, example_inputs: Any, path: str | os.PathLike[str], *, check: bool = True, strict: bool = True,
    tolerance: Any = None, random_inputs: int = 2, seed: int = 0, **options: Any,
) -> ExportResult:
    """What ``ts.export(model, inputs, "model.gguf")`` runs: :func:`export_gguf` with ``options``,
    then (``check``) the file loaded into transformers and its logits compared with the model's on
    the example and ``random_inputs`` random token sequences (default tolerance 1e-4: the file
    holds the model's own weights when they are float or on a GGUF grid). With ``strict`` a
    mismatch raises :class:`~torchslim.export.parity.ParityError` and no file is kept.

    A model whose layers round their inputs to int8 (weight-only ``compute="int8"``) is compared
    with that rounding off: the reader computes on float inputs (llama.cpp rounds them to its own
    8-bit blocks), and the weights are what the file carries exactly.

    GGUF is not a registered :class:`~torchslim.export._base.Format` (those take any model, a GGUF
    file only a decoder LLM); ``ts.export`` sends ``.gguf`` paths and ``format="gguf"`` here.
    """
    from torchslim.export.parity import ParityError, Tolerance, check_parity
    from torchslim.graph.inputs import as_inputs

    if not isinstance(path, (str, os.PathLike)):
        raise type_error("path", path, "a file path (str or os.PathLike)")
    target = Path(path)
    if not target.parent.is_dir():
        raise ConfigError(f"cannot export to {str(target)!r}: the directory {str(target.parent)!r} does not exist "
                          "(create it first)")
    tol = Tolerance.coerce(tolerance, (1e-4, 1e-4))
    inputs = None
    if check:
        if example_inputs is None:
            from torchslim._modelinfo import example_inputs as remembered

            example_inputs = remembered(model)
        inputs = as_inputs(example_inputs)
    t0 = time.perf_counter()
    with staging(target) as staged:
        result = export_gguf(model, staged, **options)
        report = None
        if check and inputs is not None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            with _float_inputs(model):  # transformers computes the file's layers on float inputs
                report = check_parity(model, _load(staged, device), inputs.to(device), format="gguf", tolerance=tol,
                                      random_cases=random_inputs, seed=seed)
            if strict and not report.ok:
                bad = next(c for c in report.cases if not c.ok)
                why = bad.problem or f"max abs diff {bad.max_abs:.3g} on the {bad.name} inputs"
                raise ParityError(f"gguf export of {type(model).__name__} does not match the model: {why} (tolerance "
                                  f"{tol.describe()}); no file was written. Pass a looser tolerance=, or strict=False "
                                  "to keep the file.", report)
    size = os.path.getsize(target)
    return ExportResult(path=target, format="gguf", files={"model": str(target)}, sizes={"model": size},
                        info=result.info, parity=report, seconds=time.perf_counter() - t0)
