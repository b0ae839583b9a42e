"""Recipe stages that train: finetune, distill, distill_hidden (schemas generated from
:class:`~torchslim.train.TrainConfig` and :class:`~torchslim.distill.DistillConfig`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pydantic
from torch import nn

from torchslim.distill import DistillConfig, distill, distill_hidden_
from torchslim.recipe.schema import _Strict, schema_from_config
from torchslim.recipe.stages import StageContext, fit_model, signature_defaults, stage, train_callbacks
from torchslim.train import TrainConfig

__all__: list[str] = []


class _SparseDump(_Strict):
    """Training overrides: only the fields a recipe set are kept (the rest come from ``finetune``)."""

    @pydantic.model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


# every field optional: unset ones come from the recipe's ``finetune`` defaults, then TrainConfig's
TrainOverrides = schema_from_config(TrainConfig, optional=True, base=_SparseDump, name="FinetuneStage")


@stage("finetune", schema=TrainOverrides, needs_data=lambda c: True, check=lambda c: None, trains=True,
       description="train the compressed model on the data's train split")
def run_finetune(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    result = fit_model(model, ctx, ctx.train_config(cfg))
    return model, {"epochs": result.epochs_run, "best_val_accuracy": result.best_val_accuracy}


@stage("distill", config=DistillConfig, drop=("train",),
       extra={"train": (TrainOverrides, pydantic.Field(default_factory=TrainOverrides))},
       needs_data=lambda c: True, trains=True,
       description="knowledge distillation from the original model (KD, hints, attention)")
def run_distill(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    values = {k: v for k, v in cfg.items() if k != "train"}
    dcfg = DistillConfig.from_dict({**values, "train": ctx.train_config(cfg.get("train")).to_dict()})
    result = distill(model, ctx.teacher(), ctx.data, dcfg, callbacks=train_callbacks(model),
                     checkpoint_dir=ctx.dir / "train.checkpoint", resume=True, progress=ctx.progress)
    return model, {"epochs": result.train.epochs_run, "teacher_accuracy": result.teacher_accuracy}


# ``distill_hidden_`` has no config: its keyword defaults are the schema's
DistillHiddenSchema = pydantic.create_model(
    "DistillHiddenStage", __base__=_Strict,
    **signature_defaults(distill_hidden_, "epochs", "lr", "batch_size", "hidden_weight", "attention_weight",
                         "output_weight"),
    freeze=(list[str], pydantic.Field(default_factory=lambda: ["*word_embeddings*"])),
    max_sentences=(int | None, None),
)


@stage("distill_hidden", schema=DistillHiddenSchema, check=lambda c: None, trains=True,
       description="TinyBERT-style hidden-state distillation on the bundled sentences")
def run_distill_hidden(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.data.sentences import train_sentences

    sentences = list(train_sentences())
    if cfg["max_sentences"]:
        sentences = sentences[: cfg["max_sentences"]]
    values = {k: v for k, v in cfg.items() if k != "max_sentences"}
    values["freeze"] = tuple(values["freeze"])
    result = distill_hidden_(model, ctx.teacher(), sentences, seed=ctx.seed, **values)
    return model, {"result": dataclasses.asdict(result) if dataclasses.is_dataclass(result) else str(result)}
