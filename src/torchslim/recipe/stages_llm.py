"""Recipe stages for decoder LLMs: weight-only low-bit quantization (RTN, GPTQ, AWQ, HQQ, rotation).

``quantize_llm`` runs :func:`torchslim.quantize.quantize_llm_` on the model: the body's Linears
to ``bits`` in groups of ``group_size``, the embedding table and ``lm_head`` to their own bits,
calibrated (GPTQ, AWQ; RTN's scale search weighs the inputs' energy when data is given) on the run's
text data (``--data shakespeare``: its calibration plays); ``scale_rule`` picks how symmetric int4
group scales are chosen (``search`` by default, ``absmax`` the older rule). The
``export`` stage then ships it as an ONNX decoder with a KV cache and a GGUF file.
"""

from __future__ import annotations

from typing import Any

import pydantic
from torch import nn

from torchslim.distill.heal import PRECISIONS, SCHEDULES, heal_
from torchslim.errors import ConfigError
from torchslim.quantize import quantize_llm_
from torchslim.quantize.llm import LLM_METHODS
from torchslim.quantize.primitives import SCALE_RULES
from torchslim.recipe.schema import _Strict
from torchslim.recipe.stages import StageContext, signature_defaults, stage

__all__: list[str] = []

_FIELDS = ("bits", "group_size", "method", "rotate", "embedding_bits", "lm_head_bits", "sequential", "scale_rule", "act_order")
QuantizeLLMSchema = pydantic.create_model("QuantizeLlmStage", __base__=_Strict,
                                          **signature_defaults(quantize_llm_, *_FIELDS))


def _check(cfg: dict[str, Any]) -> None:
    if cfg.get("method") not in LLM_METHODS:
        raise ConfigError(f"field 'method' must be one of {', '.join(LLM_METHODS)}; got {cfg.get('method')!r}")
    bits = cfg.get("bits")
    if bits not in (2, 3, 4, 8):
        raise ConfigError(f"field 'bits' must be 2, 3, 4 or 8; got {bits!r}")
    if cfg.get("scale_rule", "search") not in SCALE_RULES:
        raise ConfigError(f"field 'scale_rule' must be one of {', '.join(SCALE_RULES)}; got {cfg.get('scale_rule')!r}")
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


# ---- smaller, not just lower-bit: width / depth pruning healed by distillation ---------------------------------
def _text_data(ctx: StageContext, what: str) -> Any:
    from torchslim.data.text import TextBundle

    if not isinstance(ctx.data, TextBundle):
        raise ConfigError(f"stage {what!r} calibrates on text: run with --data shakespeare (or text:PATH)")
    return ctx.data


def _prune_fields() -> dict[str, Any]:
    from torchslim.prune.llm import prune_llm_

    return signature_defaults(prune_llm_, *_PRUNE_FIELDS)


_PRUNE_FIELDS = ("target", "mode", "max_tokens", "depth_share", "round_to")
PruneLLMSchema = pydantic.create_model("PruneLlmStage", __base__=_Strict, **_prune_fields())


def _check_prune(cfg: dict[str, Any]) -> None:
    from torchslim.prune.llm import MODES

    if cfg.get("mode") not in MODES:
        raise ConfigError(f"field 'mode' must be one of {', '.join(MODES)}; got {cfg.get('mode')!r}")
    target = cfg.get("target")
    if not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ConfigError(f"field 'target' must be the fraction of non-embedding parameters to remove, in (0, 1); "
                          f"got {target!r}")


@stage("prune_llm", schema=PruneLLMSchema, check=_check_prune, needs_data=lambda c: True, reduces=("size", "params"),
       description="decoder LLM width / depth pruning by calibrated importance (activations; block influence)")
def run_prune_llm(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.prune.llm import prune_llm_

    plan = prune_llm_(model, _text_data(ctx, "prune_llm"), **{k: cfg[k] for k in _PRUNE_FIELDS})
    return model, {"plan": plan.to_dict()}


_HEAL_FIELDS = ("minutes", "max_steps", "seq_len", "batch_size", "lr", "temperature", "hidden_weight", "hidden_loss",
                "lora_rank", "precision", "schedule")
HealSchema = pydantic.create_model("HealStage", __base__=_Strict, **signature_defaults(heal_, *_HEAL_FIELDS))


def _check_heal(cfg: dict[str, Any]) -> None:
    minutes = cfg.get("minutes")
    if not isinstance(minutes, (int, float)) or minutes <= 0:
        raise ConfigError(f"field 'minutes' must be a wall-clock budget > 0; got {minutes!r}")
    if cfg.get("hidden_loss") not in ("cosine", "mse"):
        raise ConfigError(f"field 'hidden_loss' must be cosine or mse; got {cfg.get('hidden_loss')!r}")
    if cfg.get("precision") not in PRECISIONS:
        raise ConfigError(f"field 'precision' must be one of {', '.join(PRECISIONS)}; got {cfg.get('precision')!r}")
    if cfg.get("schedule") not in SCHEDULES:
        raise ConfigError(f"field 'schedule' must be one of {', '.join(SCHEDULES)}; got {cfg.get('schedule')!r}")


@stage("heal", schema=HealSchema, check=_check_heal, needs_data=lambda c: True, trains=True,
       description="heal a pruned decoder LLM: distil the original into it (logits KL; hidden states optional) within minutes, "
                   "resumable; optional LoRA merged back")
def run_heal(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    teacher = ctx.teacher()
    result = heal_(model, teacher, _text_data(ctx, "heal"), checkpoint_dir=ctx.dir / "heal.checkpoint", resume=True,
                   progress=ctx.progress, seed=ctx.seed, **{k: cfg[k] for k in _HEAL_FIELDS})
    return model, {"heal": result.to_dict()}
