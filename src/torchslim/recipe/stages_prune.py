"""Recipe stages of the pruning family: prune_channels, sparsify, lottery, wanda, sparsegpt,
prune_heads (schemas generated from :class:`~torchslim.prune.PruneConfig` and friends)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from torchslim._config import ConfigDict
from torchslim._modelinfo import attach, model_info
from torchslim._utils import is_int, is_number
from torchslim.errors import ConfigError
from torchslim.prune import (
    LotteryConfig,
    OneShotConfig,
    PruneConfig,
    SparsifyConfig,
    drop_layers_,
    prune_channels_,
    prune_ffn_by_importance_,
    prune_heads_by_importance_,
    run_lottery,
    sparsegpt_,
    sparsify_,
    wanda_,
)
from torchslim.recipe.stages import StageContext, config_check, stage, text_or_data_calibration

__all__: list[str] = []

_DATA_METHODS = ("wanda", "snip", "movement")


def _check_prune(cfg: dict[str, Any]) -> None:
    if (cfg["ratio"] is None) == (cfg["target"] is None) and not cfg["ratios"]:
        raise ConfigError("give exactly one of 'ratio' (fraction of channels to remove) or 'target' (a budget such as {macs: 0.5})")
    if cfg["ratio"] is not None and not 0.0 <= cfg["ratio"] < 1.0:
        raise ConfigError(f"field 'ratio' must be in [0, 1); got {cfg['ratio']}")
    PruneConfig.from_dict(cfg)  # the budget, the importance and the rest


@stage("prune_channels", config=PruneConfig, renamed={"ignore": "skip"}, check=_check_prune,
       patterns=("ratios", "modules", "skip"), needs_data=lambda c: c["importance"] == "taylor",
       reduces=("macs", "size", "latency"), description="structured pruning: remove channels (really smaller)")
def run_prune_channels(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    values = dict(cfg)
    if values["ratio"] is None and values["target"] is None:
        values["ratio"] = 0.0  # only per-module ``ratios``
    plan = prune_channels_(model, PruneConfig.from_dict(values), data=ctx.data if cfg["importance"] == "taylor" else None)
    extras = {"removed_channels": plan.removed_channels, "total_channels": plan.total_channels, "ratio": plan.ratio}
    if plan.achieved:  # a budget's measured figures (latency: the ratio, runtime, threads, memory format)
        extras["achieved"] = plan.achieved
    return model, extras


def _check_sparsify(cfg: dict[str, Any]) -> None:
    s = cfg["sparsity"]
    if s is None and cfg["pattern"] == "unstructured":
        raise ConfigError("field 'sparsity' is required for unstructured sparsity (a fraction in [0, 1])")
    if s is not None and not 0.0 <= s <= 1.0:
        raise ConfigError(f"field 'sparsity' must be in [0, 1]; got {s}")
    SparsifyConfig.from_dict(cfg)


@stage("sparsify", config=SparsifyConfig, check=_check_sparsify, patterns=("modules", "skip", "overrides"),
       needs_data=lambda c: c["method"] in _DATA_METHODS, reduces=("size",),
       description="unstructured / N:M / block sparsity with reversible masks")
def run_sparsify(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    data = ctx.calibration() if cfg["method"] in _DATA_METHODS else None
    plan = sparsify_(model, SparsifyConfig.from_dict(cfg), data=data)
    return model, {"sparsity": plan.overall}


@stage("lottery", config=LotteryConfig, needs_data=lambda c: True, trains=True, reduces=("size",),
       description="lottery ticket: iterative magnitude pruning with rewinding")
def run_lottery_stage(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    result = run_lottery(model, ctx.data, LotteryConfig.from_dict(cfg), log=ctx.log)
    if result.ticket is None:
        raise ConfigError("the lottery stage found no ticket (rounds = 0?)")
    ticket = result.ticket
    info = model_info(model)
    if info is not None and model_info(ticket) is None:
        attach(ticket, copy.deepcopy(info))
    result.write(ctx.dir, plot=False)
    ctx.files["lottery"] = str(ctx.dir / "lottery.json")
    return ticket, {"rounds": result.rounds, "dense_accuracy": result.dense_accuracy}


# --------------------------------------------------------------------------- one-shot (transformers)


def _one_shot(model: nn.Module, cfg: dict[str, Any], ctx: StageContext, fn: Any) -> tuple[nn.Module, dict[str, Any]]:
    values = dict(cfg)
    sparsity = values.pop("sparsity")
    plan = fn(model, sparsity, data=text_or_data_calibration(ctx), **values)
    return model, {"sparsity": plan.overall}


@stage("wanda", config=OneShotConfig, drop=("method", "blocksize", "damp"), patterns=("modules", "skip"),
       check=config_check(OneShotConfig, method="wanda"), reduces=("size",),
       description="Wanda: |weight| x input-norm sparsity, layer by layer, no retraining")
def run_wanda(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    return _one_shot(model, cfg, ctx, wanda_)


@stage("sparsegpt", config=OneShotConfig, drop=("method",), patterns=("modules", "skip"),
       check=config_check(OneShotConfig, method="sparsegpt"), reduces=("size",),
       description="SparseGPT: second-order one-shot sparsity with weight updates")
def run_sparsegpt(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    return _one_shot(model, cfg, ctx, sparsegpt_)


# --------------------------------------------------------------------------- heads / FFN / layers


@dataclass(frozen=True)
class PruneHeadsStageConfig(ConfigDict):
    """The prune_heads stage: three verbs of ``torchslim.prune`` in one step.

    Attributes:
        heads: fraction of attention heads to remove, by data importance, in [0, 1).
        ffn: fraction of FFN neurons to remove, by data importance, in [0, 1).
        layers: indices of whole layers to drop.
        calibration_batches: batches the importances are measured on.
        round_to: kept FFN widths are multiples of this.
    """

    heads: float = 0.0
    ffn: float = 0.0
    layers: tuple[int, ...] = ()
    calibration_batches: int = 8
    round_to: int = 8

    def __post_init__(self) -> None:
        for key in ("heads", "ffn"):
            value = getattr(self, key)
            if not is_number(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"field {key!r} is the fraction to remove, in [0, 1); got {value}")
        if not (self.heads or self.ffn or self.layers):
            raise ConfigError("nothing to prune: set 'heads', 'ffn' (fractions) or 'layers' (indices to drop)")
        for key in ("calibration_batches", "round_to"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise ConfigError(f"field {key!r} must be a positive integer; got {getattr(self, key)!r}")


@stage("prune_heads", config=PruneHeadsStageConfig, reduces=("macs", "size", "latency"),
       description="transformer heads / FFN neurons (data importance) / whole layers")
def run_prune_heads(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    calib = text_or_data_calibration(ctx)
    extras: dict[str, Any] = {}
    if cfg["heads"]:
        removed = prune_heads_by_importance_(model, calib, cfg["heads"], calibration_batches=cfg["calibration_batches"])
        extras["heads_removed"] = {k: len(v) for k, v in removed.items()}
    if cfg["ffn"]:
        removed = prune_ffn_by_importance_(model, calib, cfg["ffn"], calibration_batches=cfg["calibration_batches"],
                                           round_to=cfg["round_to"])
        extras["ffn_removed"] = {k: len(v) for k, v in removed.items()}
    if cfg["layers"]:
        extras["layers_dropped"] = drop_layers_(model, list(cfg["layers"]))
    return model, extras
