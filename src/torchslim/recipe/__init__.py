"""Recipes: chain every method family in one YAML file, run it with ``ts.compress``, get a report.

Example:
    >>> import torchslim as ts
    >>> "default" in ts.list_recipes()
    True
    >>> r = ts.load_recipe("default")
    >>> [s.kind for s in r.stages]
    ['prune_channels', 'distill', 'quantize', 'export']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchslim.recipe import _cli  # noqa: E402,F401  (registers the recipe CLI verbs)
from torchslim.recipe.runner import CompressResult, compress, measure
from torchslim.recipe.schema import Goals, Recipe, RecipeError, Stage, parse_recipe, stage_kinds

__all__ = ["CompressResult", "Goals", "Recipe", "RecipeError", "Stage", "compress", "list_recipes", "load_recipe",
           "measure", "stage_kinds", "without_missing_targets"]

_BUILTIN = Path(__file__).parent / "builtin"


def list_recipes() -> list[str]:
    """Names of the built-in recipes (``load_recipe(name)`` / ``--recipe NAME``)."""
    return sorted(p.stem for p in _BUILTIN.glob("*.yaml"))


def load_recipe(recipe: Any) -> Recipe:
    """A validated :class:`Recipe` from a built-in name, a YAML file path, a dict or a Recipe.

    Raises:
        RecipeError: unknown name, unreadable file, invalid YAML, or a recipe that does not
            validate (the message names the source, the stage and the field).
    """
    import yaml

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe, "recipe")
    if not isinstance(recipe, (str, Path)):
        raise RecipeError(f"a recipe is a built-in name, a YAML path, a dict or a Recipe; got {type(recipe).__name__}")
    path = Path(recipe)
    if not path.is_file():
        if str(recipe) in list_recipes():
            path = _BUILTIN / f"{recipe}.yaml"
        else:
            raise RecipeError(f"recipe {str(recipe)!r} is neither a file nor a built-in recipe; "
                              f"built-in: {', '.join(list_recipes())}")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a text (UTF-8 YAML) file; a recipe is YAML text "
                          "(see ts.load_recipe('default').to_yaml() for an example)") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc.strerror or ' '.join(str(exc).split())}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {' '.join(str(exc).split())}") from None
    if raw is None:
        raise RecipeError(f"{path} is empty; a recipe is a YAML mapping with a 'stages' list")
    return parse_recipe(raw, str(path) if path.parent != _BUILTIN else f"built-in recipe {path.stem!r}")


def without_missing_targets(recipe: Any) -> tuple[Recipe, list[str]]:
    """``recipe`` less the deploy targets whose runtime is not installed, and those targets.

    ``torchslim demo`` runs the built-in ``default`` (ONNX, ExecuTorch and PyTorch targets) on any
    install: a target it cannot measure is dropped and named, not a failure at the end of the run.
    ``compress`` itself refuses such a recipe before any work (the message says what to install).

    Example:
        >>> recipe, dropped = without_missing_targets("default")
        >>> set(recipe.stages[-1].config["formats"]) | set(dropped) == {"onnx", "pte", "torch"}
        True
    """
    import importlib.util

    from torchslim.recipe._export import runtime_module

    recipe = load_recipe(recipe)
    raw, dropped = recipe.to_dict(), []
    for stage in raw["stages"]:
        (kind, cfg), = stage.items()
        if kind != "export" or not cfg or not cfg.get("formats"):
            continue
        missing = [f for f in cfg["formats"] if runtime_module(f) and importlib.util.find_spec(runtime_module(f)) is None]
        if missing:
            dropped += [f for f in missing if f not in dropped]
            cfg["formats"] = [f for f in cfg["formats"] if f not in missing] or ["torch"]
    return (parse_recipe(raw, recipe.source) if dropped else recipe), dropped


from torchslim._registry import import_modules as _import_modules  # noqa: E402

_import_modules(__name__, __path__)  # every stages_*.py registers its stages: a new stage is one new file
