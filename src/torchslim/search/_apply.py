"""A searched configuration as recipe stages, applied to a model, and written as a recipe file.

Trials and the final model run the same stages through :func:`apply_stages_`, so the recipe a
search writes describes exactly what its trials evaluated (only the fine-tuning is longer).
Stage order: ``prune_channels`` (per-module ``ratios``), one ``factorize`` per distinct
(method, rank fraction) with the exact layer names (ranks are fractions of the pruned layers'
full ranks), ``finetune``, then ``quantize`` (post-training, on the fine-tuned weights;
weight-only layers have no float weights left to train). The layers a factorized layer becomes
(``reduce``, ``core``, ``restore``) are quantized at the stage's default bit width.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from torchslim._select import matches
from torchslim.errors import ConfigError

__all__ = ["make_stages", "apply_stages_", "recipe_dict", "write_recipe"]


def make_stages(
    ratios: Mapping[str, float],
    layer_bits: Mapping[str, int],
    space: Any,
    *,
    importance: str,
    ignore: Sequence[str],
    finetune: Mapping[str, Any] | None,
    quant_layers: Sequence[str] | None = None,
    calibration_batches: int = 16,
    factorized: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The ordered stages of one configuration (each a one-key mapping, as in a recipe).

    Args:
        ratios: per-group pruning ratios (``prune_channels`` ``ratios``).
        layer_bits: per-layer weight bits (original layer names; a factorized layer's become the
            stage default, see the module docstring).
        space: the :class:`~torchslim.search.space.SearchSpace` (quantization mode, rank methods).
        importance, ignore: of the ``prune_channels`` stage.
        finetune: ``finetune`` stage options, or None for none.
        quant_layers: globs of the quantized layers.
        calibration_batches: of a static ``quantize`` stage.
        factorized: ``{layer: fraction of full rank}`` of the layers ``factorize_`` replaces
            (the cost model's :meth:`~torchslim.search.cost.CostModel.factorized`).
    """
    stages: list[dict[str, Any]] = []
    prune = {k: float(v) for k, v in ratios.items() if v > 0}
    if prune:
        stage: dict[str, Any] = {"ratio": 0.0, "ratios": prune, "importance": importance}
        if ignore:
            stage["skip"] = list(ignore)
        stages.append({"prune_channels": stage})
    parts = set(factorized or {})  # layers that become an nn.Sequential of smaller ones
    by_stage: dict[tuple[str, float], list[str]] = {}
    for layer, fraction in (factorized or {}).items():
        by_stage.setdefault((space.rank_method(layer), float(fraction)), []).append(layer)
    for (method, fraction), layers in sorted(by_stage.items()):
        # runtime: null: the searched ranks as measured (a recipe factorize stage otherwise leaves whole
        # the layers not faster factorized in its deploy runtime, and compress would not rebuild the trial)
        stages.append({"factorize": {"method": method, "rank": fraction, "modules": sorted(layers), "runtime": None}})
    if finetune:
        stages.append({"finetune": dict(finetune)})
    if space.quant_mode is not None:
        q: dict[str, Any] = {"mode": space.quant_mode}
        if space.fixed_bits is not None:
            q["bits"] = int(space.fixed_bits)
        else:
            bits = {k: int(v) for k, v in layer_bits.items()}
            # The layers a factorized layer becomes take the stage's default bits: a recipe's names are
            # checked against the original model, where they do not exist yet. The default is the
            # width most factorized layers drew (else the widest), so most draws survive as drawn.
            tied = Counter(b for k, b in bits.items() if k in parts)
            q["bits"] = max(tied, key=lambda b: (tied[b], b)) if tied else max(bits.values(), default=8)
            q["layer_bits"] = {k: b for k, b in bits.items() if k not in parts and b != q["bits"]}
            if not q["layer_bits"]:
                del q["layer_bits"]
        if quant_layers:
            mods = list(quant_layers)
            for layer in sorted(parts):  # its name no longer names a Conv/Linear: select the layers it became
                if any(matches(layer, g) for g in quant_layers):
                    mods.append(f"re:{re.escape(layer)}(\\..+)?")
            q["modules"] = mods
        if space.quant_mode == "static":
            q["calibration_batches"] = int(calibration_batches)
        stages.append({"quantize": q})
    return stages


def apply_stages_(model: nn.Module, stages: Sequence[Mapping[str, Any]], data: Any, *, example_inputs: Any = None,
                  progress: bool = False) -> dict[str, Any]:
    """Run ``stages`` on ``model`` in place; returns what each stage reported.

    Raises:
        ConfigError: a stage kind this runner does not know.
    """
    from torchslim.lowrank import FactorizeConfig, factorize_
    from torchslim.prune import prune_channels_
    from torchslim.quantize import QuantConfig, quantize_
    from torchslim.train import TrainConfig, fit

    info: dict[str, Any] = {}
    for entry in stages:
        ((kind, opts),) = entry.items()
        if kind == "prune_channels":
            skip = tuple(opts.get("skip", opts.get("ignore", ())))  # a stage written before skip= says ignore
            plan = prune_channels_(model, example_inputs=example_inputs, ratio=float(opts.get("ratio", 0.0)),
                                   ratios=dict(opts.get("ratios") or {}), importance=opts.get("importance", "l2"), skip=skip)
            info["prune_channels"] = {"removed_channels": plan.removed_channels, "total_channels": plan.total_channels,
                                      "groups": plan.groups}
        elif kind == "factorize":
            cfg = FactorizeConfig(**{k: (tuple(v) if k == "modules" else v) for k, v in opts.items()})
            plan = factorize_(model, cfg, example_inputs=example_inputs)
            done = info.setdefault("factorize", {"layers": [], "skipped": []})
            done["layers"] += [x.name for x in plan.layers]
            done["skipped"] += [x.name for x in plan.skipped]
        elif kind == "finetune":
            result = fit(model, data, TrainConfig.from_dict(opts), progress=progress)
            model.to("cpu")
            info["finetune"] = {"epochs": result.epochs_run, "best_val_accuracy": result.best_val_accuracy}
        elif kind == "quantize":
            opts = _resolved(model, kind, opts)
            cfg = QuantConfig(**{k: (tuple(v) if k == "modules" else v) for k, v in opts.items()})
            calib = data.loader("train", batch_size=64) if cfg.mode == "static" else None
            plan = quantize_(model, cfg, calibration=calib)
            info["quantize"] = {"layers": list(getattr(plan, "layers", []))}
        else:
            raise ConfigError(f"search stages are prune_channels, factorize, finetune and quantize; got {kind!r}")
    return info


def _resolved(model: nn.Module, kind: str, opts: Mapping[str, Any]) -> dict[str, Any]:
    """``opts`` of a ``quantize`` stage with ``layer_bits`` keyed by exact layer names.

    ``modules`` / ``skip`` stay patterns (names, globs, ``re:``): ``quantize_`` selects with the
    one module selector (:mod:`torchslim._select`) itself; ``layer_bits`` names layers exactly,
    so a pattern key is expanded here with the same matching (earlier keys win on overlaps) over
    the model's layers (modules without children). A pattern that selects nothing is refused.
    """
    from torchslim._select import check_patterns, first_match

    cfg = dict(opts)
    bits = cfg.get("layer_bits")
    if kind == "quantize" and bits:
        leaves = [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]
        check_patterns(list(bits), [n for n, _ in model.named_modules()], "layer_bits")
        cfg["layer_bits"] = {n: bits[p] for n in leaves if (p := first_match(n, bits)) is not None}
    return cfg


def recipe_dict(
    stages: Sequence[Mapping[str, Any]],
    *,
    name: str,
    description: str,
    seed: int,
    budget: Mapping[str, float],
) -> dict[str, Any]:
    """A recipe (the ``torchslim compress`` format, version 1) holding ``stages``."""
    recipe: dict[str, Any] = {"version": 1, "name": name, "description": description, "seed": int(seed),
                              "stages": [dict(s) for s in stages]}
    goals = {f"target_{k}": float(v) for k, v in budget.items() if k in ("macs", "size", "latency")}
    if goals:
        recipe["goals"] = goals
    return recipe


def write_recipe(path: str | Path, recipe: Mapping[str, Any]) -> Path:
    """Write ``recipe`` as YAML (atomically); validate it with ``torchslim.recipe`` when that is installed."""
    import yaml

    from torchslim._utils import atomic_path

    _validate(recipe)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(_plain(recipe), sort_keys=False, default_flow_style=False))
    return path


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _validate(recipe: Mapping[str, Any]) -> None:
    try:
        from torchslim.recipe import load_recipe  # type: ignore[attr-defined]
    except ImportError:
        return
    load_recipe(_plain(recipe))
