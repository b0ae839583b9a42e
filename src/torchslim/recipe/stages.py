"""The built-in stage kinds: schema (what a recipe may say) and runner (what the stage does).

A runner is ``run(model, config, ctx) -> (model, extras)``: it changes ``model`` (in place or by
returning another one) through the same public verbs a user calls (``prune_channels_``,
``quantize_``, ``distill`` ...), and returns JSON extras for the report. Module patterns in the
config have already been expanded to exact names by the runner (see :mod:`._select`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
from torch import nn

from torchslim.errors import ConfigError
from torchslim.recipe.schema import StageKind, _Strict, register_stage, schema_from_dataclass

__all__ = ["StageContext", "runner_for"]


@dataclass
class StageContext:
    """What a stage runner gets besides the model and its config."""

    data: Any  # DataBundle or None
    teacher: Callable[[], nn.Module]  # the original model, loaded on first use
    finetune: dict[str, Any]  # the recipe's default training settings
    seed: int
    dir: Path  # this stage's own directory (files it writes go here)
    progress: bool = True
    log: Callable[[str], None] = print
    files: dict[str, str] = field(default_factory=dict)
    original_inputs: Any = None

    def train_config(self, values: dict[str, Any] | None) -> Any:
        """A TrainConfig from the recipe's ``finetune`` defaults overridden by ``values``."""
        from torchslim.train import TrainConfig

        merged = {"seed": self.seed, **self.finetune, **{k: v for k, v in (values or {}).items() if v is not None}}
        return TrainConfig.from_dict(merged)

    def calibration(self, batches: int = 16) -> Any:
        if self.data is None:
            return None
        return self.data.loader("train", 64, shuffle=False)


_RUNNERS: dict[str, Callable[..., tuple[nn.Module, dict[str, Any]]]] = {}


def runner_for(kind: str) -> Callable[..., tuple[nn.Module, dict[str, Any]]]:
    return _RUNNERS[kind]


def _stage(kind: StageKind, run: Callable[..., tuple[nn.Module, dict[str, Any]]]) -> None:
    register_stage(kind, replace=True)
    _RUNNERS[kind.name] = run


def _train_callbacks(model: nn.Module) -> list[Any]:
    """Callbacks every training stage needs for the model's current state (masks stay zero)."""
    from torchslim.prune.masks import MaskCallback, masked_weights

    return [MaskCallback()] if masked_weights(model) else []


def _fit(model: nn.Module, ctx: StageContext, cfg: Any) -> Any:
    import torchslim as ts

    return ts.fit(model, ctx.data, cfg, callbacks=_train_callbacks(model), checkpoint_dir=ctx.dir / "train.checkpoint",
                  resume=True, progress=ctx.progress)


# --------------------------------------------------------------------------- prune_channels


class _BudgetSchema(_Strict):
    macs: float | None = None
    params: float | None = None
    latency: float | None = None
    tolerance: float = 0.02


class PruneChannelsSchema(_Strict):
    ratio: float | None = None
    target: _BudgetSchema | None = None
    importance: str = "l2"
    global_ranking: bool = False
    ratios: dict[str, float] | None = None
    ignore: list[str] = pydantic.Field(default_factory=list)
    round_to: int = 1
    min_channels: int = 1


def _check_prune(cfg: dict[str, Any]) -> None:
    from torchslim.prune.importance import get_importance

    if (cfg["ratio"] is None) == (cfg["target"] is None) and not cfg["ratios"]:
        raise ConfigError("give exactly one of 'ratio' (fraction of channels to remove) or 'target' (a budget such as {macs: 0.5})")
    if cfg["ratio"] is not None and not 0.0 <= cfg["ratio"] < 1.0:
        raise ConfigError(f"field 'ratio' must be in [0, 1); got {cfg['ratio']}")
    if cfg["target"] is not None:
        from torchslim.prune.channels import Budget

        Budget(**cfg["target"])
    get_importance(cfg["importance"])


def _run_prune(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    import torchslim as ts

    target = ts.Budget(**cfg["target"]) if cfg["target"] else None
    plan = ts.prune_channels_(
        model, ratio=cfg["ratio"] if cfg["ratio"] is not None else (0.0 if target is None else None), target=target,
        importance=cfg["importance"], global_ranking=cfg["global_ranking"], ratios=cfg["ratios"],
        ignore=tuple(cfg["ignore"]), round_to=cfg["round_to"], min_channels=cfg["min_channels"],
        data=ctx.data if cfg["importance"] == "taylor" else None,
    )
    return model, {"removed_channels": plan.removed_channels, "total_channels": plan.total_channels, "ratio": plan.ratio}


_stage(StageKind("prune_channels", PruneChannelsSchema, "structured pruning: remove channels (really smaller)",
                 needs_data=lambda c: c["importance"] == "taylor", check=_check_prune,
                 reduces=("macs", "size", "latency")), _run_prune)


# --------------------------------------------------------------------------- sparsify


class SparsifySchema(_Strict):
    sparsity: float | None = None
    method: str = "magnitude"
    scope: str = "layer"
    pattern: str = "unstructured"
    block: list[int] | None = None
    modules: list[str] | None = None
    overrides: dict[str, float] | None = None
    calibration_batches: int = 8
    seed: int = 0


def _check_sparsify(cfg: dict[str, Any]) -> None:
    s = cfg["sparsity"]
    if s is None and cfg["pattern"] == "unstructured":
        raise ConfigError("field 'sparsity' is required for unstructured sparsity (a fraction in [0, 1])")
    if s is not None and not 0.0 <= s <= 1.0:
        raise ConfigError(f"field 'sparsity' must be in [0, 1]; got {s}")


def _run_sparsify(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    import torchslim as ts

    calib = ctx.calibration() if cfg["method"] in ("wanda", "snip", "movement") else None
    plan = ts.sparsify_(model, cfg["sparsity"], method=cfg["method"], scope=cfg["scope"], pattern=cfg["pattern"],
                        block=cfg["block"], modules=cfg["modules"], overrides=cfg["overrides"], calibration=calib,
                        calibration_batches=cfg["calibration_batches"], seed=cfg["seed"])
    return model, {"sparsity": plan.overall}


_stage(StageKind("sparsify", SparsifySchema, "unstructured / N:M / block sparsity with reversible masks",
                 needs_data=lambda c: c["method"] in ("wanda", "snip", "movement"), check=_check_sparsify,
                 reduces=("size",)), _run_sparsify)


# --------------------------------------------------------------------------- factorize / binarize


def _dataclass_check(cls_path: str) -> Callable[[dict[str, Any]], None]:
    def check(cfg: dict[str, Any]) -> None:
        _config_of(cls_path, cfg)

    return check


def _config_of(cls_path: str, cfg: dict[str, Any]) -> Any:
    import importlib

    module, _, name = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls.from_dict(cfg)


def _run_factorize(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    import torchslim as ts

    plan = ts.factorize_(model, _config_of("torchslim.lowrank.FactorizeConfig", cfg))
    return model, {"plan": plan.to_dict() if hasattr(plan, "to_dict") else str(plan)}


def _run_binarize(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    import torchslim as ts

    plan = ts.binarize_(model, _config_of("torchslim.binarize.BinarizeConfig", cfg))
    return model, {"plan": plan.to_dict() if hasattr(plan, "to_dict") else str(plan)}


def _register_dataclass_stages() -> None:
    from torchslim.binarize import BinarizeConfig
    from torchslim.lowrank import FactorizeConfig

    _stage(StageKind("factorize", schema_from_dataclass(FactorizeConfig), "low-rank factorization (SVD, Tucker-2, CP)",
                     check=_dataclass_check("torchslim.lowrank.FactorizeConfig"), reduces=("macs", "size", "latency")),
           _run_factorize)
    _stage(StageKind("binarize", schema_from_dataclass(BinarizeConfig), "1-bit weights and activations (BNN, XNOR-Net)",
                     check=_dataclass_check("torchslim.binarize.BinarizeConfig"), reduces=("size", "latency")),
           _run_binarize)


_register_dataclass_stages()


# --------------------------------------------------------------------------- quantize


def _quant_schema() -> type[pydantic.BaseModel]:
    from torchslim.quantize import QuantConfig
    from torchslim.train import TrainConfig

    return schema_from_dataclass(QuantConfig, extra={"train": (schema_from_dataclass(TrainConfig) | None, None)})


def _check_quant(cfg: dict[str, Any]) -> None:
    _config_of("torchslim.quantize.QuantConfig", {k: v for k, v in cfg.items() if k != "train"})


def _run_quantize(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.quantize import qat_convert_, qat_prepare_, quantize_

    qcfg = _config_of("torchslim.quantize.QuantConfig", {k: v for k, v in cfg.items() if k != "train"})
    calib = ctx.calibration()
    extras: dict[str, Any] = {}
    if qcfg.mode == "qat":
        plan = qat_prepare_(model, qcfg, calibration=calib if not qcfg.lsq else None)
        result = _fit(model, ctx, ctx.train_config(cfg.get("train")))
        extras["qat"] = {"epochs": result.epochs_run, "test_accuracy": result.test_accuracy}
        qat_convert_(model)
    else:
        plan = quantize_(model, qcfg, calibration=calib)
    extras["plan"] = plan.to_dict()
    return model, extras


_stage(StageKind("quantize", _quant_schema(), "int8 / int4 quantization (dynamic, static, weight-only, QAT)",
                 needs_data=lambda c: c["mode"] in ("static", "qat"), check=_check_quant, trains=True,
                 reduces=("size", "latency")), _run_quantize)


# --------------------------------------------------------------------------- finetune / distill


class _SparseDump(_Strict):
    """Training overrides: only the fields a recipe set are kept (the rest come from ``finetune``)."""

    @pydantic.model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


def _train_schema() -> type[pydantic.BaseModel]:
    from torchslim.train import TrainConfig

    # every field optional: unset ones come from the recipe's ``finetune`` defaults
    hints = schema_from_dataclass(TrainConfig).model_fields
    return pydantic.create_model("FinetuneStage", __base__=_SparseDump,
                                 **{n: (f.annotation | None, None) for n, f in hints.items()})  # type: ignore[call-overload]


def _run_finetune(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    result = _fit(model, ctx, ctx.train_config(cfg))
    return model, {"epochs": result.epochs_run, "best_val_accuracy": result.best_val_accuracy}


_stage(StageKind("finetune", _train_schema(), "train the compressed model on the data's train split",
                 needs_data=lambda c: True, check=lambda c: None, trains=True), _run_finetune)


def _distill_schema() -> type[pydantic.BaseModel]:
    from torchslim.distill import DistillConfig

    base = schema_from_dataclass(DistillConfig, drop=("train",))
    train = _train_schema()
    return pydantic.create_model("DistillStage", __base__=base, train=(train, pydantic.Field(default_factory=train)))


def _run_distill(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    import torchslim as ts
    from torchslim.distill import DistillConfig

    values = {k: v for k, v in cfg.items() if k != "train"}
    dcfg = DistillConfig.from_dict({**values, "train": ctx.train_config(cfg.get("train")).to_dict()})
    teacher = ctx.teacher()
    result = ts.distill(model, teacher, ctx.data, dcfg, callbacks=_train_callbacks(model),
                        checkpoint_dir=ctx.dir / "train.checkpoint", resume=True, progress=ctx.progress)
    return model, {"epochs": result.train.epochs_run, "teacher_accuracy": result.teacher_accuracy}


_stage(StageKind("distill", _distill_schema(), "knowledge distillation from the original model (KD, hints, attention)",
                 needs_data=lambda c: True, trains=True,
                 check=lambda c: _config_of("torchslim.distill.DistillConfig", {k: v for k, v in c.items() if k != "train"})),
       _run_distill)


# --------------------------------------------------------------------------- lottery


def _run_lottery(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    import torchslim as ts
    from torchslim._modelinfo import attach as _attach, model_info

    config = _config_of("torchslim.prune.LotteryConfig", cfg)
    result = ts.run_lottery(model, ctx.data, config, log=ctx.log)
    if result.ticket is None:
        raise ConfigError("the lottery stage found no ticket (rounds = 0?)")
    ticket = result.ticket
    info = model_info(model)
    if info is not None and model_info(ticket) is None:
        _attach(ticket, copy.deepcopy(info))
    result.write(ctx.dir, plot=False)
    ctx.files["lottery"] = str(ctx.dir / "lottery.json")
    return ticket, {"rounds": result.rounds, "dense_accuracy": result.dense_accuracy}


def _register_lottery() -> None:
    from torchslim.prune import LotteryConfig

    _stage(StageKind("lottery", schema_from_dataclass(LotteryConfig), "lottery ticket: iterative magnitude pruning with rewinding",
                     needs_data=lambda c: True, trains=True, check=_dataclass_check("torchslim.prune.LotteryConfig"), reduces=("size",)),
           _run_lottery)


_register_lottery()


# --------------------------------------------------------------------------- cluster / pack (Deep Compression)


def _check_bits(cfg: dict[str, Any]) -> None:
    bits = cfg.get("bits")
    if bits is not None and not 1 <= bits <= 8:
        raise ConfigError(f"field 'bits' must be in 1..8 (2^bits shared weights per layer); got {bits}")


def _run_cluster(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.pack import cluster_

    plan = cluster_(model, **_config_of("torchslim.pack.ClusterConfig", cfg).to_dict())
    return model, {"plan": plan.to_dict()}


def _register_cluster() -> None:
    from torchslim.pack import ClusterConfig

    def check(cfg: dict[str, Any]) -> None:
        _check_bits(cfg)
        _config_of("torchslim.pack.ClusterConfig", cfg)

    _stage(StageKind("cluster", schema_from_dataclass(ClusterConfig), "weight sharing: per-layer k-means codebooks "
                     "(Deep Compression)", check=check, reduces=("size",)), _run_cluster)


_register_cluster()


class PackSchema(_Strict):
    bits: int | None = None
    coder: str = "ans"


def _run_pack(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.pack import pack

    path = ctx.dir / "model.tslim"
    result = pack(model, path, bits=cfg["bits"], coder=cfg["coder"])
    ctx.files["tslim"] = str(path)
    info = result.to_dict()
    return model, {"packed_bytes": path.stat().st_size, **{k: v for k, v in info.items() if k != "path"}}


_stage(StageKind("pack", PackSchema, "entropy-coded single-file packing (.tslim)", check=_check_bits, reduces=("size",)),
       _run_pack)


# --------------------------------------------------------------------------- export


class ExportSchema(_Strict):
    formats: list[str] = pydantic.Field(default_factory=lambda: ["onnx"])
    check: bool = True
    batch_sizes: list[int] = pydantic.Field(default_factory=lambda: [1, 32])
    runs: int = 50


def _check_export(cfg: dict[str, Any]) -> None:
    from torchslim.export import list_formats

    known = list_formats()
    for f in cfg["formats"]:
        if f not in known:
            raise ConfigError(f"field 'formats': unknown format {f!r}; allowed: {', '.join(known)}")
    if not cfg["formats"]:
        raise ConfigError("field 'formats' is empty; allowed: " + ", ".join(known))
    if any(b < 1 for b in cfg["batch_sizes"]) or cfg["runs"] < 1:
        raise ConfigError("fields 'batch_sizes' and 'runs' must be positive integers")


def _run_export(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.recipe._export import export_stage

    return model, export_stage(model, cfg, ctx)


_stage(StageKind("export", ExportSchema, "write ONNX / TorchScript / torch.export files, verified, timed vs the original",
                 check=_check_export), _run_export)


# --------------------------------------------------------------------------- post-training methods for transformers


def _text_or_data_calibration(ctx: StageContext) -> Any:
    """Calibration batches: the run's data when it has any, else the bundled sentences (text models)."""
    if ctx.data is not None:
        return ctx.calibration()
    from torchslim.data.sentences import calibration_batches

    return calibration_batches()


class OneShotSparsitySchema(_Strict):
    sparsity: float = 0.5
    pattern: str = "unstructured"
    calibration_batches: int = 32
    modules: list[str] | None = None
    skip: list[str] = pydantic.Field(default_factory=list)
    sequential: bool = True


class SparseGPTSchema(OneShotSparsitySchema):
    blocksize: int = 128
    damp: float = 0.01


def _check_one_shot(cfg: dict[str, Any]) -> None:
    from torchslim.prune.wanda import OneShotConfig

    OneShotConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def _run_one_shot(method: str) -> Callable[..., tuple[nn.Module, dict[str, Any]]]:
    def run(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
        if method == "wanda":
            from torchslim.prune.wanda import wanda_ as fn
        else:
            from torchslim.prune.sparsegpt import sparsegpt_ as fn
        values = dict(cfg)
        sparsity = values.pop("sparsity")
        plan = fn(model, sparsity, calibration=_text_or_data_calibration(ctx), **values)
        return model, {"sparsity": plan.overall}

    return run


_stage(StageKind("wanda", OneShotSparsitySchema, "Wanda: |weight| x input-norm sparsity, layer by layer, no retraining",
                 check=_check_one_shot, reduces=("size",)), _run_one_shot("wanda"))
_stage(StageKind("sparsegpt", SparseGPTSchema, "SparseGPT: second-order one-shot sparsity with weight updates",
                 check=_check_one_shot, reduces=("size",)), _run_one_shot("sparsegpt"))


class GPTQSchema(_Strict):
    bits: int = 4
    group_size: int = 128
    granularity: str = "group"
    modules: list[str] | None = None
    skip: list[str] = pydantic.Field(default_factory=list)
    calibration_batches: int = 32
    blocksize: int = 128
    damp: float = 0.01
    sequential: bool = True


def _gptq_config(cfg: dict[str, Any]) -> Any:
    from torchslim.quantize import QuantConfig

    return QuantConfig(mode="weight-only", bits=cfg["bits"], granularity=cfg["granularity"], group_size=cfg["group_size"],
                       modules=tuple(cfg["modules"]) if cfg["modules"] else None, skip=tuple(cfg["skip"]),
                       calibration_batches=cfg["calibration_batches"])


def _run_gptq(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.quantize.gptq import gptq_

    plan = gptq_(model, _gptq_config(cfg), calibration=_text_or_data_calibration(ctx), blocksize=cfg["blocksize"],
                 damp=cfg["damp"], sequential=cfg["sequential"])
    return model, {"plan": plan.to_dict()}


_stage(StageKind("gptq", GPTQSchema, "GPTQ: weight-only int4/int8 with second-order error compensation",
                 check=lambda c: _gptq_config(c), reduces=("size",)), _run_gptq)


class PruneHeadsSchema(_Strict):
    heads: float = 0.0
    ffn: float = 0.0
    layers: list[int] = pydantic.Field(default_factory=list)
    calibration_batches: int = 8
    round_to: int = 8


def _check_heads(cfg: dict[str, Any]) -> None:
    for key in ("heads", "ffn"):
        if not 0.0 <= cfg[key] < 1.0:
            raise ConfigError(f"field {key!r} is the fraction to remove, in [0, 1); got {cfg[key]}")
    if not (cfg["heads"] or cfg["ffn"] or cfg["layers"]):
        raise ConfigError("nothing to prune: set 'heads', 'ffn' (fractions) or 'layers' (indices to drop)")


def _run_prune_heads(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.prune.heads import drop_layers_, prune_ffn_by_importance_, prune_heads_by_importance_

    calib = _text_or_data_calibration(ctx)
    extras: dict[str, Any] = {}
    if cfg["heads"]:
        removed = prune_heads_by_importance_(model, calib, cfg["heads"], calibration_batches=cfg["calibration_batches"])
        extras["heads_removed"] = {k: len(v) for k, v in removed.items()}
    if cfg["ffn"]:
        removed = prune_ffn_by_importance_(model, calib, cfg["ffn"], calibration_batches=cfg["calibration_batches"],
                                           round_to=cfg["round_to"])
        extras["ffn_removed"] = {k: len(v) for k, v in removed.items()}
    if cfg["layers"]:
        extras["layers_dropped"] = drop_layers_(model, cfg["layers"])
    return model, extras


_stage(StageKind("prune_heads", PruneHeadsSchema, "transformer heads / FFN neurons (data importance) / whole layers",
                 check=_check_heads, reduces=("macs", "size", "latency")), _run_prune_heads)


class DistillHiddenSchema(_Strict):
    epochs: int = 4
    lr: float = 5e-4
    batch_size: int = 32
    hidden_weight: float = 1.0
    attention_weight: float = 0.0
    output_weight: float = 10.0
    freeze: list[str] = pydantic.Field(default_factory=lambda: ["*word_embeddings*"])
    max_sentences: int | None = None


def _run_distill_hidden(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.data.sentences import train_sentences
    from torchslim.distill.tinybert import distill_hidden_

    sentences = list(train_sentences())
    if cfg["max_sentences"]:
        sentences = sentences[: cfg["max_sentences"]]
    values = {k: v for k, v in cfg.items() if k != "max_sentences"}
    values["freeze"] = tuple(values["freeze"])
    result = distill_hidden_(model, ctx.teacher(), sentences, seed=ctx.seed, **values)
    import dataclasses

    return model, {"result": dataclasses.asdict(result) if dataclasses.is_dataclass(result) else str(result)}


_stage(StageKind("distill_hidden", DistillHiddenSchema, "TinyBERT-style hidden-state distillation on the bundled sentences",
                 check=lambda c: None, trains=True), _run_distill_hidden)
