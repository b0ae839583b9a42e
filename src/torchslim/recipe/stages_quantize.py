"""Recipe stages that re-represent the weights: quantize, gptq, binarize, cluster, factorize
(schemas generated from :class:`~torchslim.quantize.QuantConfig` and friends)."""

from __future__ import annotations

from typing import Any

from torch import nn

from torchslim._finalize import finalize_
from torchslim.binarize import BinarizeConfig, binarize_
from torchslim.errors import ConfigError
from torchslim.lowrank import FactorizeConfig, factorize_
from torchslim.pack import ClusterConfig, cluster_
from torchslim.quantize import QuantConfig, gptq_, qat_prepare_, quantize_
from torchslim.recipe.schema import schema_from_dataclass
from torchslim.recipe.stages import (
    StageContext,
    fit_model,
    signature_defaults,
    stage,
    text_or_data_calibration,
)
from torchslim.train import TrainConfig

__all__: list[str] = []


def _plan_extras(plan: Any) -> dict[str, Any]:
    return {"plan": plan.to_dict() if hasattr(plan, "to_dict") else str(plan)}


@stage("quantize", config=QuantConfig, extra={"train": (schema_from_dataclass(TrainConfig) | None, None)},
       patterns=("modules", "skip", "layer_bits"), needs_data=lambda c: c["mode"] in ("static", "qat"), trains=True,
       reduces=("size", "latency"), description="int8 / int4 quantization (dynamic, static, weight-only, QAT)")
def run_quantize(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    qcfg = QuantConfig.from_dict({k: v for k, v in cfg.items() if k != "train"})
    data = ctx.calibration()
    extras: dict[str, Any] = {}
    if qcfg.mode == "qat":
        plan = qat_prepare_(model, qcfg, data=data if not qcfg.lsq else None)
        result = fit_model(model, ctx, ctx.train_config(cfg.get("train")))
        extras["qat"] = {"epochs": result.epochs_run, "test_accuracy": result.test_accuracy}
        finalize_(model, kinds=("qat",))
    else:
        plan = quantize_(model, qcfg, data=data)
    extras["plan"] = plan.to_dict()
    return model, extras


_GPTQ_FIELDS = ("bits", "group_size", "granularity", "modules", "skip", "calibration_batches")


def _gptq_config(cfg: dict[str, Any]) -> QuantConfig:
    return QuantConfig.from_dict({"mode": "weight-only", **{k: cfg[k] for k in _GPTQ_FIELDS}})


# GPTQ's recipe defaults are its own (4-bit groups, more calibration); types come from QuantConfig
@stage("gptq", config=QuantConfig, fields=_GPTQ_FIELDS, defaults={"bits": 4, "granularity": "group", "calibration_batches": 32},
       extra=signature_defaults(gptq_, "blocksize", "damp", "sequential"), check=_gptq_config,
       patterns=("modules", "skip"), reduces=("size",),
       description="GPTQ: weight-only int4/int8 with second-order error compensation")
def run_gptq(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    plan = gptq_(model, _gptq_config(cfg), data=text_or_data_calibration(ctx), blocksize=cfg["blocksize"],
                 damp=cfg["damp"], sequential=cfg["sequential"])
    return model, {"plan": plan.to_dict()}


@stage("binarize", config=BinarizeConfig, patterns=("modules", "skip"), reduces=("size", "latency"),
       description="1-bit weights and activations (BNN, XNOR-Net)")
def run_binarize(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    return model, _plan_extras(binarize_(model, BinarizeConfig.from_dict(cfg)))


def check_bits(cfg: dict[str, Any]) -> None:
    """``bits`` in 1..8 (cluster and pack stages)."""
    bits = cfg.get("bits")
    if bits is not None and not 1 <= bits <= 8:
        raise ConfigError(f"field 'bits' must be in 1..8 (2^bits shared weights per layer); got {bits}")


def _check_cluster(cfg: dict[str, Any]) -> None:
    check_bits(cfg)
    ClusterConfig.from_dict(cfg)


@stage("cluster", config=ClusterConfig, check=_check_cluster, patterns=("modules", "skip"), reduces=("size",),
       description="weight sharing: per-layer k-means codebooks (Deep Compression)")
def run_cluster(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    plan = cluster_(model, ClusterConfig.from_dict(cfg))
    return model, {"plan": plan.to_dict()}


DEPLOY = "deploy"  # the factorize stage's default runtime: where the recipe ships (StageContext.deploy_runtime)


def _factorize_config(cfg: dict[str, Any], deploy: str | None = None) -> tuple[FactorizeConfig, str]:
    """The stage's FactorizeConfig and where its runtime came from (``"stage"``, ``"deploy"`` or
    ``"none"``). ``runtime: deploy`` (the default) is the recipe's deploy runtime, timed at one
    thread like the export stage and the guard; ``runtime: null`` / ``none`` opts out, and so does
    ``only_if_smaller: false`` (it factorizes every selected layer whatever that costs) unless a
    runtime is named; a latency ``target`` is measured where its budget says."""
    from torchslim.profile.budget import RUNTIMES

    values = dict(cfg)
    runtime = values.get("runtime", DEPLOY)
    source = "stage"
    if isinstance(runtime, str) and runtime.lower() == "none":
        runtime = None
    if runtime is not None and runtime != DEPLOY and runtime not in RUNTIMES:
        raise ConfigError(f"field 'runtime' must be {DEPLOY!r} (the recipe's deploy runtime, the default), one of "
                          f"{', '.join(RUNTIMES)}, or null / 'none' (no timing); got {runtime!r}")
    if runtime == DEPLOY:
        target = values.get("target")
        latency = getattr(target, "latency", None) if not isinstance(target, dict) else target.get("latency")
        runtime = deploy if values.get("only_if_smaller", True) and latency is None else None
        source = "deploy"
    if runtime is None:
        source = "none"
    values["runtime"] = runtime
    if runtime is not None and values.get("threads") is None:
        values["threads"] = 1
    return FactorizeConfig.from_dict(values), source


def _check_factorize(cfg: dict[str, Any]) -> None:
    _factorize_config(cfg, "eager")


@stage("factorize", config=FactorizeConfig, patterns=("modules", "skip"), defaults={"runtime": DEPLOY},
       check=_check_factorize,
       reduces=("macs", "size", "latency"), description="low-rank factorization (SVD, Tucker-2, CP); layers not "
       "faster factorized in the recipe's deploy runtime are left whole")
def run_factorize(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    """``factorize_`` with the stage's rank rule; by default (``runtime: deploy``) every layer it
    factorizes is timed as it is and factorized in the recipe's deploy runtime (the first export
    format's: onnx -> onnxruntime, pte -> xnnpack, torch or no export -> eager) at one thread, on
    the example inputs' batch, and left whole unless at least 5% faster factorized. ``runtime:
    onnxruntime`` (any runtime) names it; ``runtime: null`` (or ``none``) turns the timing off."""
    fcfg, source = _factorize_config(cfg, ctx.deploy_runtime)
    note = None
    if source == "deploy" and fcfg.runtime is not None:
        from torchslim._modelinfo import example_inputs
        from torchslim.errors import SpecError

        try:
            example_inputs(model)
        except SpecError:  # nothing to time on: the rank rule alone, said in the report
            note = f"not timed in {fcfg.runtime}: the model has no example inputs"
            fcfg = FactorizeConfig.from_dict({**fcfg.to_dict(), "runtime": None, "threads": None})
    extras = _plan_extras(factorize_(model, fcfg))
    extras["runtime"] = {"runtime": fcfg.runtime, "threads": fcfg.threads, "from": source if note is None else "none",
                         **({"note": note} if note else {})}
    return model, extras
