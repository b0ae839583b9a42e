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

import dataclasses
import difflib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from torchslim.errors import ConfigError

__all__ = ["Goals", "Recipe", "Stage", "StageKind", "register_stage", "stage_kinds", "RecipeError", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


class RecipeError(ConfigError):
    """A recipe that cannot run: names the source, the stage and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- stage kinds


@dataclass(frozen=True)
class StageKind:
    """One kind of stage: its schema, whether it needs data, and what builds its config."""

    name: str
    schema: type[BaseModel]
    help: str
    needs_data: Callable[[dict[str, Any]], bool] = lambda cfg: False
    # checks that need the whole stage config (values, not types); raise ConfigError
    check: Callable[[dict[str, Any]], None] | None = None
    trains: bool = False  # fills missing training settings from the recipe's ``finetune``
    reduces: tuple[str, ...] = ()  # what it can shrink: "macs", "size", "latency"


_KINDS: dict[str, StageKind] = {}


def register_stage(kind: StageKind, *, replace: bool = False) -> StageKind:
    """Add a stage kind (its runner is registered in :mod:`torchslim.recipe.stages`)."""
    if kind.name in _KINDS and not replace:
        raise ConfigError(f"stage kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def stage_kinds() -> dict[str, StageKind]:
    """All known stage kinds by name."""
    from torchslim.recipe import stages  # noqa: F401  (registers the built-in kinds)

    return dict(_KINDS)


_MODELS: dict[type, type[BaseModel]] = {}


def schema_from_dataclass(cls: type, *, drop: tuple[str, ...] = (), extra: dict[str, Any] | None = None) -> type[BaseModel]:
    """A strict pydantic model with the fields (types, defaults) of a config dataclass.

    Nested config dataclasses become nested strict models, so a misspelt key deep inside
    (``distill.train.epohcs``) is caught too. ``extra`` adds fields: ``name -> (type, default)``.
    """
    key = cls if not drop and not extra else None
    if key is not None and key in _MODELS:
        return _MODELS[key]
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in drop:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            tp = schema_from_dataclass(tp)  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = pydantic.Field(default_factory=f.default_factory)
        else:
            default = ...
        if dataclasses.is_dataclass(hints[f.name]) and f.default_factory is not dataclasses.MISSING:
            default = pydantic.Field(default_factory=tp)
        fields[f.name] = (tp, default)
    fields.update(extra or {})
    model = pydantic.create_model(f"{cls.__name__}Stage", __base__=_Strict, **fields)
    if key is not None:
        _MODELS[key] = model
    return model


# --------------------------------------------------------------------------- recipe


class Goals(_Strict):
    """What the run checks and reports as met / missed (fractions of the original model)."""

    max_accuracy_drop: float | None = None  # absolute: 0.01 = one point of accuracy
    target_macs: float | None = None  # final MACs <= this fraction of the original's
    target_size: float | None = None  # bytes on disk <= this fraction
    target_latency: float | None = None  # median latency <= this fraction

    @pydantic.field_validator("target_macs", "target_size", "target_latency")
    @classmethod
    def _fraction(cls, v: float | None, info: pydantic.ValidationInfo) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"must be a fraction of the original in (0, 1]; got {v} (a goal of 0 or below can never be met)")
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


def _suggest(word: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(word, allowed, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
            f"{where}: unknown field {name!r}{_suggest(loc[-1], allowed)}; allowed: {', '.join(allowed) or 'none'}"
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
            raise RecipeError(f"{source}: stage {i}: unknown stage {kind!r}{_suggest(str(kind), list(kinds))}; "
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
        seed=top.seed, finetune=finetune, source=source,
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

