"""Recipe stages for decoder LLMs: weight-only low-bit quantization (RTN, GPTQ, AWQ, HQQ, rotation).

``quantize_llm`` runs :func:`torchslim.quantize.quantize_llm_` on the model: the body's Linears
to ``bits`` in groups of ``group_size``, the embedding table and ``lm_head`` to their own bits,
calibrated (GPTQ, AWQ) on the run's text data (``--data shakespeare``: its calibration plays). The
``export`` stage then ships it as an ONNX decoder with a KV cache and a GGUF file.
"""

from __future__ import annotations

from typing import Any

import pydantic
from torch import nn

from torchslim.errors import ConfigError
from torchslim.quantize import quantize_llm_
from torchslim.quantize.api import LLM_METHODS
from torchslim.recipe.schema import _Strict
from torchslim.recipe.stages import StageContext, signature_defaults, stage

__all__: list[str] = []

_FIELDS = ("bits", "group_size", "method", "rotate", "embedding_bits", "lm_head_bits", "sequential")
QuantizeLLMSchema = pydantic.create_model("QuantizeLlmStage", __base__=_Strict,
                                          **signature_defaults(quantize_llm_, *_FIELDS))


def _check(cfg: dict[str, Any]) -> None:
    if cfg.get("method") not in LLM_METHODS:
        raise ConfigError(f"field 'method' must be one of {', '.join(LLM_METHODS)}; got {cfg.get('method')!r}")
    bits = cfg.get("bits")
    if bits not in (2, 3, 4, 8):
        raise ConfigError(f"field 'bits' must be 2, 3, 4 or 8; got {bits!r}")
    for key in ("embedding_bits", "lm_head_bits"):
        if cfg.get(key) not in (None, 4, 8):
            raise ConfigError(f"field {key!r} must be 4, 8 or null (float); got {cfg.get(key)!r}")


@stage("quantize_llm", schema=QuantizeLLMSchema, check=_check,
       needs_data=lambda c: c.get("method") not in ("rtn", "hqq"), reduces=("size",),
       description="decoder LLM weight-only int4 / int8 (rtn, gptq, awq, awq-gptq, hqq; rotation; own embedding / lm_head bits)")
def run_quantize_llm(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.data.text import TextBundle

    data = ctx.data if isinstance(ctx.data, TextBundle) else None
    if cfg["method"] not in ("rtn", "hqq") and data is None:
        raise ConfigError(f"method {cfg['method']!r} calibrates on text: run with --data shakespeare (or text:PATH)")
    plan = quantize_llm_(model, data=data, seed=ctx.seed, **{k: cfg[k] for k in _FIELDS})
    return model, {"plan": plan.to_dict()}
