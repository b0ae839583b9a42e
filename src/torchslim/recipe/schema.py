"""The recipe format: an ordered list of stages plus goals, validated before any work starts.

A recipe is YAML (or the same dict in Python)::

    version: 1
    name: default
    finetune: {epochs: 2, lr: 0.01}        # default training settings for stages that train
    stages:
      - prune_channels: {ratio: 0.5, importance: l2}
      - distill: {loss: kd, train: {epochs: 3}}
      - quantize: {mode: static}
      - export: {formats: [onnx]}
    goals: {max_accuracy_drop: 0.01, target_size: 0.25}
    allow_slower: false                    # true: a result slower than the original where it runs is no failed goal

Each stage is a mapping with exactly one key, the stage kind; its value holds that family's
config (the same fields as the Python config: ``QuantConfig``, ``FactorizeConfig``, ...). Every
kind's schema is a pydantic model with unknown keys forbidden, so a misspelt key is an error
naming the source, the stage and the field, with the closest allowed name as a suggestion.

Example:
    >>> from torchslim.recipe import load_recipe
    >>> from torchslim.errors import ConfigError
    >>> r = load_recipe({"stages": [{"quantize": {"mode": "dynamic"}}]})
    >>> [s.kind for s in r.stages]
    ['quantize']
    >>> try:
    ...     load_recipe({"stages": [{"quantize": {"bitz": 8}}]})
    ... except ConfigError as exc:
    ...     print(str(exc).split(";")[0])
    recipe: stage 1 (quantize): unknown field 'bitz' (did you mean 'bits'?)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from torchslim._config import config_defaults, did_you_mean, jsonable
from torchslim._registry import entries, register
from torchslim.errors import ConfigError

__all__ = ["Goals", "Recipe", "Stage", "StageKind", "register_stage", "stage_kinds", "schema_from_config",
           "RecipeError", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


class RecipeError(ConfigError):
    """A recipe that cannot run: names the source, the stage and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- stage kinds


@dataclass(frozen=True)
class StageKind:
    """One kind of stage: its schema, its runner, whether it needs data, and what it can shrink.

    Stage kinds live in the registry (kind ``"recipe_stage"``); :func:`stage_kinds` reads them.
    Built-in ones are declared with :func:`torchslim.recipe.stages.stage`, one decorated runner each.
    """

    name: str
    schema: type[BaseModel]
    help: str
    needs_data: Callable[[dict[str, Any]], bool] = lambda cfg: False
    # checks that need the whole stage config (values, not types); raise ConfigError
    check: Callable[[dict[str, Any]], None] | None = None
    trains: bool = False  # fills missing training settings from the recipe's ``finetune``
    reduces: tuple[str, ...] = ()  # what it can shrink: "macs", "size", "latency"
    # ``run(model, config, ctx) -> (model, extras)`` (see :mod:`torchslim.recipe.stages`)
    run: Callable[..., Any] | None = None
    config: type | None = None  # the family config the schema is generated from (None: the verb has none)
    patterns: tuple[str, ...] = ()  # fields holding module patterns, expanded to exact names before the run
    own_defaults: tuple[str, ...] = ()  # fields whose recipe default deliberately differs from ``config``'s


_order = iter(range(1 << 30))


def register_stage(kind: StageKind, *, replace: bool = False) -> StageKind:
    """Add a stage kind to the registry (kind ``"recipe_stage"``; usually through ``stages.stage``).

    Raises:
        ConfigError: a stage of that name is already registered and ``replace`` is not set.
    """
    register("recipe_stage", kind.name, kind, family="recipe", description=kind.help, replace=replace,
             runner=kind.run, schema=kind.schema, order=next(_order))
    return kind


def stage_kinds() -> dict[str, StageKind]:
    """All known stage kinds by name, in the order they were registered."""
    found = sorted(entries("recipe_stage"), key=lambda e: e.meta.get("order", 0))
    return {e.name: e.obj for e in found}


def _schema_type(tp: Any) -> Any:
    """``tp`` with every dataclass (also inside ``X | None``) replaced by its strict schema."""
    if dataclasses.is_dataclass(tp):
        return schema_from_dataclass(tp)  # type: ignore[arg-type]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = tuple(_schema_type(a) for a in typing.get_args(tp))
        return typing.Union[args]  # noqa: UP007  (built from a tuple)
    return tp


@functools.cache
def schema_from_dataclass(cls: type) -> type[BaseModel]:
    """The strict pydantic model of a config dataclass (:func:`schema_from_config`), built once.

    Nested config dataclasses become nested strict models, so a misspelt key deep inside
    (``distill.train.epohcs``) is caught too.
    """
    return schema_from_config(cls)


def _default(value: Any) -> Any:
    if isinstance(value, (dict, list, set)) or dataclasses.is_dataclass(value):
        return pydantic.Field(default_factory=lambda: copy.deepcopy(value))
    return value


def schema_from_config(
    cls: type,
    *,
    fields: tuple[str, ...] | None = None,
    drop: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    renamed: dict[str, str] | None = None,
    optional: bool = False,
    base: type[BaseModel] | None = None,
    name: str | None = None,
) -> type[BaseModel]:
    """The strict schema of a recipe stage, generated from its family config class.

    Field names, types and defaults come from ``cls`` (the one place defaults live).

    Args:
        cls: a config dataclass (usually a :class:`~torchslim._config.ConfigDict`).
        fields: take only these fields (default: every field).
        drop: leave these fields out.
        defaults: stage-specific defaults for some fields (types still from ``cls``).
        extra: recipe-only fields on top: ``name -> (type, default)``.
        renamed: old recipe field name -> config field name; the old name still validates, with a
            ``DeprecationWarning`` (the config's own ``_renamed`` fields are added).
        optional: every field ``None`` by default (unset: filled from elsewhere, e.g. ``finetune``).
        base: the pydantic base class (default: strict, frozen, unknown keys forbidden).
        name: the schema's class name.
    """
    hints = typing.get_type_hints(cls)
    names = cls.field_names() if hasattr(cls, "field_names") else [f.name for f in dataclasses.fields(cls)]
    values = {**config_defaults(cls), **(defaults or {})}
    spec: dict[str, Any] = {}
    for f in names:
        if f in drop or (fields is not None and f not in fields):
            continue
        tp = _schema_type(hints[f])
        if optional:
            spec[f] = (tp | None, None)
        elif f in values:
            value = values[f]
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                spec[f] = (tp, pydantic.Field(default_factory=lambda v=value, t=tp: t.model_validate(jsonable(v))))
            else:
                spec[f] = (tp, _default(value))
        else:
            spec[f] = (tp, ...)
    spec.update(extra or {})
    old = {**getattr(cls, "_renamed", {}), **(renamed or {})}
    old = {k: v for k, v in old.items() if v in spec}
    validators = {"_renamed_fields": pydantic.model_validator(mode="before")(_renamer(old))} if old else None
    model = pydantic.create_model(name or f"{cls.__name__}Stage", __base__=base or _Strict,
                                  __validators__=validators, **spec)  # type: ignore[call-overload]
    model.__doc__ = f"Recipe stage fields generated from :class:`{cls.__module__}.{cls.__qualname__}`."
    return model


def _renamer(old: dict[str, str]) -> Callable[[Any, Any], Any]:
    def move(cls: Any, data: Any) -> Any:
        if not isinstance(data, Mapping) or not any(k in data for k in old):
            return data
        data = dict(data)
        for was, now in old.items():
            if was not in data:
                continue
            if now in data:
                raise ValueError(f"{was!r} is the old name of {now!r}; give only {now!r}")
            warnings.warn(f"recipe field {was!r} is deprecated, use {now!r} (same meaning); {was!r} goes in the next release",
                          DeprecationWarning, stacklevel=2)
            data[now] = data.pop(was)
        return data

    return classmethod(move)  # type: ignore[return-value]


# --------------------------------------------------------------------------- recipe


class Goals(_Strict):
    """What the run checks and reports as met / missed (fractions of the original model)."""

    max_accuracy_drop: float | None = None  # absolute: 0.01 = one point of accuracy
    target_macs: float | None = None  # final MACs <= this fraction of the original's
    target_size: float | None = None  # bytes on disk <= this fraction
    target_latency: float | None = None  # median latency <= this fraction
    max_perplexity_increase: float | None = None  # decoder LLMs, relative: 0.06 = at most 6% above the original

    @pydantic.field_validator("target_macs", "target_size", "target_latency")
    @classmethod
    def _fraction(cls, v: float | None, info: pydantic.ValidationInfo) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"must be a fraction of the original in (0, 1]; got {v} (a goal of 0 or below can never be met)")
        return v

    @pydantic.field_validator("max_perplexity_increase")
    @classmethod
    def _ppl(cls, v: float | None) -> float | None:
        if v is not None and not v >= 0.0:
            raise ValueError(f"is a relative perplexity increase >= 0 (0.06 = 6% above the original); got {v}")
        return v

    @pydantic.field_validator("max_accuracy_drop")
    @classmethod
    def _drop(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"is an absolute accuracy drop in [0, 1] (0.01 = one point); got {v}")
        return v


@dataclass(frozen=True)
class Stage:
    """One validated stage: its kind, its full config (defaults filled in) and its position."""

    kind: str
    config: dict[str, Any]
    index: int  # 1-based position in the recipe

    @property
    def label(self) -> str:
        return f"{self.index:02d}-{self.kind}"

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: self.config}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (see the module docstring for the format)."""

    stages: tuple[Stage, ...]
    goals: Goals = field(default_factory=Goals)
    name: str = "recipe"
    description: str = ""
    seed: int = 0
    finetune: dict[str, Any] = field(default_factory=dict)
    source: str = "recipe"
    allow_slower: bool = False  # a result slower than the original where it runs is no failed goal

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (every default filled in); ``load_recipe`` reads it back equal."""
        return {
            "version": SCHEMA_VERSION,
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "finetune": dict(self.finetune),
            "stages": [s.to_dict() for s in self.stages],
            "goals": self.goals.model_dump(exclude_none=True),
            **({"allow_slower": True} if self.allow_slower else {}),
        }

    def to_yaml(self) -> str:
        """The resolved recipe as YAML text."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def needs_data(self) -> list[str]:
        """Labels of the stages that cannot run without data."""
        kinds = stage_kinds()
        return [s.label for s in self.stages if kinds[s.kind].needs_data(s.config)]


class _Top(_Strict):
    version: int = SCHEMA_VERSION
    name: str | None = None
    description: str = ""
    seed: int = 0
    finetune: dict[str, Any] = pydantic.Field(default_factory=dict)
    stages: list[Any]
    goals: Goals = pydantic.Field(default_factory=Goals)
    allow_slower: bool = False


def _explain(exc: pydantic.ValidationError, model: type[BaseModel], where: str, skip: int = 0) -> RecipeError:
    """The first pydantic error as one line: where, which field, what is allowed (``skip`` drops
    leading location parts already named in ``where``)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]][skip:]
    name = ".".join(loc) or "(value)"
    if err["type"] == "extra_forbidden":
        sub: Any = model
        for part in loc[:-1]:  # walk to the nested model that rejected the key
            f = sub.model_fields.get(part) if isinstance(sub, type) and issubclass(sub, BaseModel) else None
            sub = f.annotation if f is not None else None
        allowed = list(sub.model_fields) if isinstance(sub, type) and issubclass(sub, BaseModel) else []
        return RecipeError(
            f"{where}: unknown field {name!r}{did_you_mean(loc[-1], allowed)}; allowed: {', '.join(allowed) or 'none'}"
        )
    if err["type"] == "missing":
        return RecipeError(f"{where}: field {name!r} is required")
    msg = err["msg"].removeprefix("Value error, ")
    return RecipeError(f"{where}: field {name!r}: {msg}; got {err.get('input')!r}")


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively: the resolved config must be YAML / JSON data."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_recipe(raw: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe dict (from YAML or Python); every error names ``source``, stage and field."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{source}: a recipe is a mapping with a 'stages' list; got {type(raw).__name__}")
    try:
        top = _Top.model_validate(dict(raw))
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        if err["loc"] and err["loc"][0] == "goals" and len(err["loc"]) > 1:
            raise _explain(exc, Goals, f"{source}: goals", skip=1) from None
        raise _explain(exc, _Top, source) from None
    if top.version > SCHEMA_VERSION:
        raise RecipeError(f"{source}: recipe version {top.version} is newer than this torchslim reads ({SCHEMA_VERSION})")
    kinds = stage_kinds()
    if not top.stages:
        raise RecipeError(f"{source}: 'stages' is empty; a recipe needs at least one of: {', '.join(kinds)}")
    finetune = _validate_finetune(top.finetune, source)
    stages = []
    for i, entry in enumerate(top.stages, start=1):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, Mapping) or len(entry) != 1:
            raise RecipeError(
                f"{source}: stage {i}: each stage is a mapping with exactly one key, the stage kind "
                f"(one of {', '.join(kinds)}); got {entry!r}"
            )
        (kind, cfg), = entry.items()
        where = f"{source}: stage {i} ({kind})"
        if kind not in kinds:
            raise RecipeError(f"{source}: stage {i}: unknown stage {kind!r}{did_you_mean(str(kind), list(kinds))}; "
                              f"allowed: {', '.join(kinds)}")
        sk = kinds[kind]
        cfg = dict(cfg or {})
        if not isinstance(cfg, dict):
            raise RecipeError(f"{where}: the stage config must be a mapping; got {cfg!r}")
        try:
            resolved = _plain(sk.schema.model_validate(cfg).model_dump())
        except pydantic.ValidationError as exc:
            raise _explain(exc, sk.schema, where) from None
        try:
            if sk.check is not None:
                sk.check(resolved)
        except ConfigError as exc:
            raise RecipeError(f"{where}: {' '.join(str(exc).split())}") from None
        stages.append(Stage(kind=kind, config=resolved, index=i))
    recipe = Recipe(
        stages=tuple(stages), goals=top.goals, name=top.name or Path(source).stem, description=top.description,
        seed=top.seed, finetune=finetune, source=source, allow_slower=top.allow_slower,
    )
    _check_goals(recipe)
    return recipe


def _validate_finetune(values: dict[str, Any], source: str) -> dict[str, Any]:
    from torchslim.train import TrainConfig

    schema = schema_from_dataclass(TrainConfig)
    try:
        schema.model_validate(values)
    except pydantic.ValidationError as exc:
        raise _explain(exc, schema, f"{source}: finetune") from None
    return dict(values)


def _check_goals(recipe: Recipe) -> None:
    """Goals no stage of this recipe can move are impossible: refuse them before any work."""
    kinds = stage_kinds()
    can = {what for s in recipe.stages for what in kinds[s.kind].reduces}
    for goal, what in (("target_macs", "macs"), ("target_size", "size"), ("target_latency", "latency")):
        value = getattr(recipe.goals, goal)
        if value is not None and value < 1.0 and what not in can:
            able = sorted(k for k, sk in kinds.items() if what in sk.reduces)
            raise RecipeError(
                f"{recipe.source}: goals: field {goal!r}: impossible goal {value}: no stage of this recipe reduces "
                f"{what} (stages that do: {', '.join(able)})"
            )

