"""Recipe stages: how one is declared, and what its runner gets.

A stage is one decorated runner ``run(model, config, ctx) -> (model, extras)``: it changes
``model`` (in place or by returning another one) through the same public verbs a user calls
(``prune_channels_``, ``quantize_``, ``distill`` ...) and returns JSON extras for the report.
The decorator generates the stage's schema from the family config (the one place defaults
live) and registers the stage in the registry (kind ``"recipe_stage"``), so adding a stage is
one decorated function in one file::

    @stage("cluster", config=ClusterConfig, patterns=("modules", "skip"), reduces=("size",),
           description="weight sharing: per-layer k-means codebooks (Deep Compression)")
    def run_cluster(model, cfg, ctx):
        plan = cluster_(model, ClusterConfig.from_dict(cfg))
        return model, {"plan": plan.to_dict()}

Module patterns in the config (the fields named in ``patterns``) have already been expanded to
exact names by the runner (see :mod:`._select`). The built-in stages live in ``stages_prune``,
``stages_quantize``, ``stages_train`` and ``stages_ship``, imported at the end of this module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
from torch import nn

from torchslim.errors import ConfigError
from torchslim.recipe.schema import StageKind, register_stage, schema_from_config

__all__ = ["StageContext", "runner_for", "stage", "config_check", "signature_defaults"]

Runner = Callable[..., tuple[nn.Module, dict[str, Any]]]


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
    # the runtime the recipe ships to: its first export format's (onnx -> onnxruntime, pte -> xnnpack,
    # torch -> eager), eager without an export stage, None where no runtime_latency runtime runs it
    deploy_runtime: str | None = "eager"

    def train_config(self, values: dict[str, Any] | None) -> Any:
        """A TrainConfig from the recipe's ``finetune`` defaults overridden by ``values``."""
        from torchslim.train import TrainConfig

        merged = {"seed": self.seed, **self.finetune, **{k: v for k, v in (values or {}).items() if v is not None}}
        return TrainConfig.from_dict(merged)

    def calibration(self, batches: int = 16) -> Any:
        """The data's train batches (64 a batch, not shuffled), or None without data."""
        if self.data is None:
            return None
        return self.data.loader("train", 64, shuffle=False)


def stage(
    name: str,
    *,
    description: str,
    config: type | None = None,
    schema: type[pydantic.BaseModel] | None = None,
    fields: tuple[str, ...] | None = None,
    drop: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    renamed: dict[str, str] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
    needs_data: Callable[[dict[str, Any]], bool] = lambda cfg: False,
    trains: bool = False,
    reduces: tuple[str, ...] = (),
    patterns: tuple[str, ...] = (),
) -> Callable[[Runner], Runner]:
    """Decorator: register the runner as recipe stage ``name``.

    The schema is generated from ``config`` (see :func:`~torchslim.recipe.schema.schema_from_config`
    for ``fields``, ``drop``, ``defaults``, ``extra`` and ``renamed``) unless ``schema`` is given (a
    stage whose verb has no config). Without ``check``, a stage with a config checks its values by
    building the config (``config.from_dict`` of the schema's config fields).

    Raises:
        ConfigError: another stage of that name is already registered.
    """
    if (config is None) == (schema is None):
        raise ConfigError(f"stage {name!r}: give exactly one of config= (generate the schema) or schema=")

    def deco(run: Runner) -> Runner:
        sch = schema or schema_from_config(config, fields=fields, drop=drop, defaults=defaults,  # type: ignore[arg-type]
                                           extra=extra, renamed=renamed, name=f"{_camel(name)}Stage")
        checker = check if check is not None or config is None else config_check(config, without=tuple(extra or ()))
        kind = StageKind(name, sch, description, needs_data=needs_data, check=checker, trains=trains, reduces=reduces,
                         run=run, config=config, patterns=patterns, own_defaults=_own(config, defaults, extra))
        old = _DECLARED.get(name)
        same = old is not None and (old.__module__, old.__qualname__) == (run.__module__, run.__qualname__)
        register_stage(kind, replace=same)  # the same runner again (a module reloaded) replaces itself
        _DECLARED[name] = run
        return run

    return deco


_DECLARED: dict[str, Runner] = {}


def _own(config: type | None, defaults: dict[str, Any] | None, extra: dict[str, Any] | None) -> tuple[str, ...]:
    """Fields whose recipe default is the stage's own: declared ``defaults`` and ``extra`` fields
    that replace a config field (e.g. distill's ``train``, filled from the recipe's ``finetune``)."""
    names = set(getattr(config, "field_names", lambda: [])())
    return tuple(defaults or ()) + tuple(k for k in (extra or {}) if k in names)


def _camel(name: str) -> str:
    return "".join(part.title() for part in name.split("_"))


def runner_for(kind: str) -> Runner:
    """The runner of stage ``kind`` (from the registry)."""
    from torchslim.recipe.schema import stage_kinds

    run = stage_kinds()[kind].run
    if run is None:  # a StageKind registered by hand without a runner
        raise ConfigError(f"recipe stage {kind!r} has no runner")
    return run


def config_check(cls: type, *, without: tuple[str, ...] = (), **fixed: Any) -> Callable[[dict[str, Any]], None]:
    """A stage check that builds ``cls`` from the stage config (less the recipe-only ``without`` fields)."""

    def check(cfg: dict[str, Any]) -> None:
        cls.from_dict({**{k: v for k, v in cfg.items() if k not in without}, **fixed})  # type: ignore[attr-defined]

    return check


def signature_defaults(fn: Callable[..., Any], *names: str) -> dict[str, Any]:
    """``name -> (annotation, default)`` of some keyword parameters of ``fn`` (a verb without a
    config keeps its defaults in its signature; the stage schema reads them from there)."""
    import typing

    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn)
    return {n: (hints[n], params[n].default) for n in names}


def train_callbacks(model: nn.Module) -> list[Any]:
    """Callbacks every training stage needs for the model's current state (masks stay zero)."""
    from torchslim.prune import MaskCallback, masked_weights

    return [MaskCallback()] if masked_weights(model) else []


def fit_model(model: nn.Module, ctx: StageContext, cfg: Any) -> Any:
    """``fit`` the model on the run's data, resumable in the stage's directory."""
    from torchslim.train import fit

    return fit(model, ctx.data, cfg, callbacks=train_callbacks(model), checkpoint_dir=ctx.dir / "train.checkpoint",
               resume=True, progress=ctx.progress)


def text_or_data_calibration(ctx: StageContext) -> Any:
    """Calibration batches: the run's data when it has any, else the bundled sentences (text models)."""
    if ctx.data is not None:
        return ctx.calibration()
    from torchslim.data.sentences import calibration_batches

    return calibration_batches()

