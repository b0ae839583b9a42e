"""Weight-only low-bit quantization of decoder LLMs: :func:`quantize_llm_`, one entry point for
every method (round to nearest, GPTQ, AWQ, AWQ-GPTQ, HQQ; rotation; the token table and ``lm_head``
with their own bits, a tied table kept once), and :func:`llm_calibration`, the calibration windows
a text data spec gives. Everything runs on :func:`~torchslim.quantize.api.quantize_`'s config and
plan and the layer-wise engine of :mod:`torchslim.quantize.gptq`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from torchslim._select import as_patterns
from torchslim.data import batches_of
from torchslim.errors import ConfigError
from torchslim.quantize import ptq
from torchslim.quantize.api import QuantConfig, QuantPlan, quantize_

__all__ = ["LLM_CALIBRATION", "LLM_METHODS", "llm_calibration", "quantize_llm_", "tie_heads"]


#: the weight-only methods :func:`quantize_llm_` runs
LLM_METHODS = ("rtn", "gptq", "awq", "awq-gptq", "hqq")
#: calibration a text spec gives :func:`quantize_llm_`: windows of tokens from its train split
LLM_CALIBRATION = {"windows": 16, "length": 256, "batch_size": 8}


def llm_calibration(model: nn.Module, data: Any, *, tokenizer: Any = None, windows: int = LLM_CALIBRATION["windows"],
                    length: int = LLM_CALIBRATION["length"], batch_size: int = LLM_CALIBRATION["batch_size"],
                    seed: int = 0) -> list[torch.Tensor]:
    """Calibration batches for a causal LM: ``windows`` token windows of ``length`` drawn (seeded)
    from the calibration (``train``) split of a text data spec (``shakespeare``, ``text:PATH``) or
    :class:`~torchslim.data.text.TextBundle`, tokenized with the model's tokenizer, in batches of
    ``batch_size`` rows ``(batch, length)``. The evaluation (``test``) split is never read.

    Raises:
        ConfigError: ``data`` holds no text, no tokenizer is known for the model, bad numbers.
    """
    from torchslim.data import DataBundle, load_data
    from torchslim.data.text import TextBundle
    from torchslim.lm.evaluate import resolve_tokenizer

    bundle = load_data(data) if isinstance(data, str) else data
    if not isinstance(bundle, TextBundle):
        spec = bundle.spec if isinstance(bundle, DataBundle) else type(data).__name__
        raise ConfigError(f"data {spec!r} holds no text; an LLM calibrates on a text data spec: shakespeare or text:path/to/file.txt")
    for what, v in (("windows", windows), ("length", length), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{what} must be a positive integer; got {v!r}")
    ids = bundle.calibration_sequences(resolve_tokenizer(model, tokenizer), windows, length, seed=seed)
    return list(ids.split(batch_size))


def _lm_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Linear):
        for n, m in model.named_modules():
            if m is head:
                return n
    return None


def quantize_llm_(
    model: nn.Module,
    *,
    bits: int = 4,
    group_size: int = 32,
    method: str = "rtn",
    rotate: bool = False,
    embedding_bits: int | None = 8,
    lm_head_bits: int | None = 8,
    data: Any = None,
    calibration: Iterable[Any] | None = None,
    sequential: bool = False,
    skip: tuple[str, ...] = (),
    layer_bits: dict[str, int] | None = None,
    seed: int = 0,
    scale_rule: str = "search",
    act_order: bool = False,
    tie_head: bool | str = "auto",
    compute: str = "auto",
) -> QuantPlan:
    """Weight-only low-bit quantization of a decoder LLM, one entry point for every method.

    The body's Linears get ``bits`` (int4 by default) in groups of ``group_size``; the embedding
    table and ``lm_head`` get their own bits (int8 by default; ``None`` keeps them float: Gemma-3's
    262k-token table is 63% of its parameters). ``rotate=True`` first rotates the residual stream
    (:func:`torchslim.quantize.rotate.rotate_`, Llama-style models only).

    Methods: ``"rtn"`` round to nearest (symmetric, scales searched per group; with ``data`` the
    search weighs each input column by its energy, :func:`~torchslim.quantize.gptq.rtn_`); ``"gptq"``
    (:func:`~torchslim.quantize.gptq.gptq_`) and ``"awq"`` (:func:`~torchslim.quantize.awq.awq_`)
    calibrate on ``data``, ``"awq-gptq"`` rounds AWQ's scaled weights with GPTQ; ``"hqq"`` (:func:`~torchslim.quantize.hqq.hqq_`, asymmetric with
    zero points) needs no data. ``sequential=False`` (default here) measures every layer once on
    the float model: one pass over the calibration windows instead of one per layer group.

    Args:
        model: a causal LM (``pretrained:smollm2-135m``) or any model with Linear layers.
        data: calibration: a text data spec / ``TextBundle`` (its ``train`` split, windows as
            :func:`llm_calibration` draws them) or batches of token ids; ``calibration=`` is the
            same for batches.
        skip: more layers to leave in float.
        layer_bits: bits of single layers overriding ``bits`` (mixed precision: e.g. the most
            sensitive decoder layers in int8, see :mod:`torchslim.quantize.llm_sensitivity`).
        scale_rule: symmetric int4 group scales (rtn, gptq, awq-gptq): ``"search"`` (default; see
            :mod:`torchslim.quantize.scale_search`) or ``"absmax"`` (``max|w| / 7.5``, the older rule).
        act_order: gptq only: columns by decreasing input energy, static groups
            (:func:`~torchslim.quantize.gptq.gptq_quantize`).
        compute: what the quantized layers' inputs are (:attr:`QuantConfig.compute`): ``"auto"``
            / ``"int8"`` rounds them to int8 per group at run time, which is what ONNX Runtime's
            fast ``MatMulNBits`` kernels (``accuracy_level=4``) and llama.cpp compute with;
            ``"float"`` keeps float inputs.
        tie_head: when ``lm_head`` shares its weight with the token table (tied embeddings),
            ``True`` keeps it tied to the one quantized table
            (:class:`~torchslim.quantize.embedding.TiedQuantizedHead`: the table is stored once,
            in ``embedding_bits``; needs ``lm_head_bits == embedding_bits`` and no ``rotate``);
            ``False`` quantizes ``lm_head`` apart (a second copy of the table, in
            ``lm_head_bits``). ``"auto"`` (default) ties it when that is possible and the table
            holds most of the model's parameters (Gemma-3-270M: 63%; a second int8 copy would
            cost more than the whole int4 body), else quantizes it apart (SmolLM2-135M: 21%; its
            int8 ``lm_head`` is what the ONNX decoder writes as ``MatMulNBits``). Untied models:
            ignored.

    Returns:
        The :class:`QuantPlan` (recorded; ``ts.save`` / ``ts.load`` replay the rotation and the
        quantization).

    Raises:
        ConfigError: an unknown method, bad bits, no calibration data for gptq / awq, a model
            ``rotate`` does not know. The model is unchanged then.

    Example:
        >>> import torch, transformers
        >>> from torchslim.quantize import quantize_llm_
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                num_attention_heads=4, num_key_value_heads=2)
        >>> plan = quantize_llm_(transformers.LlamaForCausalLM(cfg), method="hqq", embedding_bits=None)
        >>> plan.layers[-1], plan.config.layer_bits
        ('lm_head', {'lm_head': 8})
        >>> tied = transformers.LlamaForCausalLM(cfg.__class__(**{**cfg.to_dict(), "tie_word_embeddings": True}))
        >>> quantize_llm_(tied, method="rtn", tie_head=True).tied_heads
        {'lm_head': 'model.embed_tokens'}
    """
    if method not in LLM_METHODS:
        raise ConfigError(f"method must be one of {', '.join(LLM_METHODS)}; got {method!r}")
    if not isinstance(rotate, bool):
        raise ConfigError(f"rotate must be True or False; got {rotate!r}")
    if not isinstance(act_order, bool) or (act_order and method != "gptq"):
        raise ConfigError(f"act_order must be True or False, and True only with method='gptq'; got {act_order!r} with method={method!r}")
    head = tied_head = _lm_head_name(model)
    table = _tied_table(model, head, tie_head, rotate, embedding_bits, lm_head_bits)
    if table is not None:  # the head multiplies by the quantized table: it is not quantized apart
        head, skip = None, tuple(as_patterns(skip, "skip", none_ok=False)) + (tied_head,)
    if layer_bits is not None and (not isinstance(layer_bits, dict) or not all(isinstance(k, str) for k in layer_bits)):
        raise ConfigError(f"layer_bits must map layer names to bits; got {layer_bits!r}")
    own = {head: lm_head_bits} if head and lm_head_bits is not None and lm_head_bits != bits else {}
    layer_bits = {**{k: v for k, v in (layer_bits or {}).items() if v != bits}, **own} or None
    skip = tuple(as_patterns(skip, "skip", none_ok=False)) + ((head,) if head and lm_head_bits is None else ())
    config = QuantConfig(mode="weight-only", bits=bits, granularity="group", group_size=group_size,
                         symmetric=method != "hqq", skip=skip, layer_bits=layer_bits,
                         embeddings=embedding_bits is not None, embedding_bits=embedding_bits,
                         scale_rule=scale_rule, compute=compute)
    calibration = batches_of(data if not _is_text(data) else None, calibration, where="quantize_llm_")
    if _is_text(data) and method in ("gptq", "awq", "awq-gptq", "rtn"):  # hqq reads no data
        calibration = llm_calibration(model, data, seed=seed)
    if method in ("gptq", "awq", "awq-gptq") and calibration is None:
        raise ConfigError(f"method={method!r} calibrates on data: pass data='shakespeare' (or text:PATH, or batches of token ids)")
    batches = list(calibration) if calibration is not None else None
    if batches is not None and not batches:
        raise ConfigError("the calibration data is empty")
    config = config.replace(calibration_batches=max(len(batches or ()), 1))
    from torchslim.quantize.gptq import check_weight_only, weight_only_layers

    check_weight_only(model, config, method)  # every check before the rotation changes anything
    _, tables = weight_only_layers(model, config, "quantize_llm_")
    if table is not None and table not in tables:
        raise ConfigError(f"lm_head would stay tied to the table {table!r}, but skip= leaves that table float; "
                          "quantize it or pass tie_head=False")
    plan = _run_llm_method(model, method, config, batches, rotate, seed, sequential, act_order)
    if table is not None and tied_head is not None:
        from torchslim._modelinfo import model_info

        plan.tied_heads = {tied_head: table}
        blocks = tie_heads(model, plan.tied_heads, int8_inputs=bool(config.act_block))
        model_info(model).plans[-1]["tied_heads"] = dict(plan.tied_heads)  # the record of this call
        if any(blocks.values()):
            model_info(model).plans[-1]["tied_head_act_blocks"] = blocks
    return plan


def _tied_table(model: nn.Module, head: str | None, tie_head: Any, rotate: bool, embedding_bits: int | None,
                lm_head_bits: int | None) -> str | None:
    """The token table ``lm_head`` stays tied to (its name), or None (quantized apart / untied)."""
    if not (isinstance(tie_head, bool) or tie_head == "auto"):
        raise ConfigError(f"tie_head must be True, False or 'auto'; got {tie_head!r}")
    if head is None or tie_head is False:
        return None
    weight = model.get_submodule(head).weight
    table = next((n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m.weight is weight), None)
    if table is None:  # not tied
        return None
    why = ("rotate=True unties the table (the head then holds the rotated norm)" if rotate
           else "embedding_bits=None keeps the table float" if embedding_bits is None
           else f"lm_head_bits={lm_head_bits} differs from embedding_bits={embedding_bits}" if lm_head_bits != embedding_bits
           else None)
    if tie_head is True:
        if why:
            raise ConfigError(f"tie_head=True keeps lm_head tied to the quantized table {table!r}, but {why}; "
                              "pass tie_head=False or 'auto'")
        return table
    total = sum(p.numel() for p in model.parameters())  # parameters() lists the tied table once
    return table if why is None and 2 * weight.numel() > total else None


def tie_heads(model: nn.Module, heads: dict[str, str], *, int8_inputs: bool = False,
              act_blocks: dict[str, int] | None = None) -> dict[str, int]:
    """Make each named output projection a :class:`~torchslim.quantize.embedding.TiedQuantizedHead`
    of its quantized table (``{head: table}``); the quantize plan's ``tied_heads``, which
    :func:`replay_quantize` ties again.

    ``int8_inputs``: each head rounds its inputs to int8 per block of its table's group (the
    ``compute="int8"`` rule of the body's layers, so the ONNX decoder runs the head's 8-bit
    ``MatMulNBits`` at ``accuracy_level=4``, its fast kernel); ``act_blocks`` gives each head's
    block instead (a saved model's record). Returns ``{head: act_block}`` (0: float inputs).

    Raises:
        ConfigError: a table that is not a ``QuantizedEmbedding`` or widths that do not match.
    """
    from torchslim.quantize.embedding import QuantizedEmbedding, TiedQuantizedHead

    out: dict[str, int] = {}
    for head, table in heads.items():
        t = model.get_submodule(table)
        old = model.get_submodule(head)
        if not isinstance(t, QuantizedEmbedding):
            raise ConfigError(f"{head} can only be tied to a quantized table; {table} is {type(t).__name__}")
        shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
        if shape != (t.num_embeddings, t.embedding_dim) or getattr(old, "bias", None) is not None:
            raise ConfigError(f"{head} (out, in = {shape}, bias: {getattr(old, 'bias', None) is not None}) cannot multiply by "
                              f"{table} ({t.num_embeddings} x {t.embedding_dim}, no bias)")
        block = (act_blocks or {}).get(head, t.scheme.group_size if int8_inputs else 0)
        ptq._set(model, head, TiedQuantizedHead(t, act_block=int(block)))
        out[head] = int(block)
    return out


def _run_llm_method(model: nn.Module, method: str, config: QuantConfig, batches: list[Any] | None, rotate: bool,
                    seed: int, sequential: bool, act_order: bool) -> QuantPlan:
    if rotate:
        from torchslim.quantize.rotate import rotate_

        rotate_(model, seed=seed)
    if method == "rtn" and batches is not None:  # the scale search weighs the inputs' energy
        from torchslim.quantize.gptq import rtn_

        return rtn_(model, config, calibration=batches, sequential=sequential)
    if method == "rtn":
        return quantize_(model, config)
    if method == "hqq":
        from torchslim.quantize.hqq import hqq_

        return hqq_(model, config)
    if method == "gptq":
        from torchslim.quantize.gptq import gptq_

        return gptq_(model, config, calibration=batches, sequential=sequential, act_order=act_order)
    from torchslim.quantize.awq import awq_

    return awq_(model, config, calibration=batches, sequential=sequential,
                rounding="gptq" if method == "awq-gptq" else "clip")


def _is_text(data: Any) -> bool:
    from torchslim.data.text import TextBundle

    return isinstance(data, (str, TextBundle))
