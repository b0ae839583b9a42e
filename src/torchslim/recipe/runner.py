"""``ts.compress``: run a recipe stage by stage, checkpointing each, measuring each, resumable.

The output directory holds::

    resolved_recipe.yaml     the recipe with every default filled in
    state.json               what has finished (rewritten atomically after every stage)
    stages/00-original/      the original model (ts.save) - the teacher and the baseline
    stages/01-<kind>/        each stage's model (ts.save) and the files it wrote (ONNX, .tslim)
    model/                   the final model (ts.save), masks and codebooks baked in
    report.json / report.md / report.html

Every stage starts from the previous stage's checkpoint as ``ts.load`` rebuilds it, in a fresh run
and in a resumed one alike, so a run stopped anywhere and resumed with ``resume=True`` ends with
the same model and the same report figures as one that was never stopped (training inside a stage
also resumes from its own checkpoint, bit for bit). The latency figures are re-measured, so only
they vary with the machine's load.

Last, the guard (:mod:`torchslim.recipe._guard`) times the final model against the original in
every runtime the recipe deploys to: a result slower than the original there is a failed goal
``not_slower`` naming the stage that made it slower (unless ``allow_slower``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._fs import drop_set_aside, set_aside
from torchslim._utils import atomic_path
from torchslim.errors import CheckpointError, ConfigError
from torchslim.recipe.schema import Recipe, RecipeError, stage_kinds

__all__ = ["CompressResult", "compress", "measure"]

STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass
class CompressResult:
    """What :func:`compress` returns: the final model, the report dict, the output directory."""

    model: nn.Module
    report: dict[str, Any]
    out: Path
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.report

    @property
    def goals_met(self) -> bool:
        """Whether every goal of the recipe was met (True when it set none)."""
        return all(g["met"] for g in self.report.get("goals", []))


# --------------------------------------------------------------------------- measuring


def _deploy_size(model: nn.Module, checkpoint: Path | None, measured: int | None) -> int | None:
    """Bytes of the model's weights as deployed. A masked model is measured with its masks baked in
    (sparse storage) on a fresh load of ``checkpoint`` (finalizing a copy would strip the shared
    parametrized class); any other model is ``measured`` as it is."""
    from torchslim.profile.api import serialized_bytes
    from torchslim.prune import finalize_
    from torchslim.prune.masks import masked_weights
    from torchslim.saving import load

    if checkpoint is None or not masked_weights(model):
        return measured
    fresh = load(checkpoint)
    finalize_(fresh)
    return serialized_bytes(fresh)


def _type_name(module: nn.Module) -> str:
    """The layer's own class name: a parametrized layer (a sparsity mask) is named by its original
    class (``Linear``), not by the ``ParametrizedLinear`` class torch makes for it."""
    from torch.nn.utils import parametrize

    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized") and cls.__bases__:
        cls = cls.__bases__[0]
    return cls.__name__


def _layer_rows(model: nn.Module) -> list[dict[str, Any]]:
    """Width, sparsity and weight bits of every layer with a weight matrix / kernel."""
    from torchslim._modelinfo import model_info

    info = model_info(model)
    qbits: dict[str, int] = {}
    for plan in info.plans if info else []:
        if plan.get("kind") == "quantize":
            cfg = plan.get("config", {})
            for layer in plan.get("layers", []):
                qbits[layer] = (cfg.get("layer_bits") or {}).get(layer, cfg.get("bits", 8))
        elif plan.get("kind") == "cluster":
            for layer in plan.get("layers", []):
                qbits[layer if isinstance(layer, str) else layer.get("name", "")] = plan.get("bits", 0)
    rows = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) and hasattr(m, "dequantized_weight"):  # int weights + scales
            with torch.no_grad():
                w = m.dequantized_weight()
        if not name or not isinstance(w, torch.Tensor) or w.dim() < 2:
            continue
        prec = getattr(m, "torchslim_precision", None)
        bits = prec[0] if prec else qbits.get(name, 32 if w.is_floating_point() else 8)
        rows.append({
            "name": name, "type": _type_name(m), "out": int(w.shape[0]), "in": int(w.shape[1]),
            "params": int(w.numel()), "sparsity": float((w == 0).sum()) / max(w.numel(), 1), "bits": int(bits),
        })
    return rows


def measure(model: nn.Module, data: Any, checkpoint: Path | None = None, *, latency: bool = True,
            perplexity_tokens: int | None = None) -> dict[str, Any]:
    """Accuracy (test split), params, MACs, bytes on disk and median latency of ``model``; for a
    decoder LLM with text data, perplexity on the held-out text (``perplexity_tokens`` tokens)."""
    from torchslim.profile import profile
    from torchslim.train import evaluate

    model.eval()
    # one thread, like the ONNX Runtime timings: stable on a shared machine
    prof = profile(model, latency=latency, min_time_s=0.3, threads=1)
    acc = None
    if data is not None and data.labeled:
        acc = evaluate(model, data.loader("test", batch_size=256))["accuracy"]
    size = _deploy_size(model, checkpoint, prof.size_bytes)
    from torchslim.recipe._export_llm import PERPLEXITY_TOKENS, is_decoder_lm, llm_measure

    ppl = llm_measure(model, data, perplexity_tokens or PERPLEXITY_TOKENS) if is_decoder_lm(model) else None
    return {
        "accuracy": acc,
        **({"perplexity": ppl} if ppl is not None else {}),
        "params": prof.params,
        "nonzero_params": prof.nonzero_params,
        "macs": prof.macs,
        "size_bytes": size,
        "latency_ms": prof.latency_ms.median if prof.latency_ms else None,
        "macs_by_precision": prof.macs_by_precision,
        "profile": prof.to_dict() | {"layers": []},
        "layers": _layer_rows(model),
    }


def _ratios(row: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("params", "nonzero_params", "macs", "size_bytes", "latency_ms"):
        a, b = row.get(key), base.get(key)
        out[key] = (a / b) if a is not None and b else None
    return out


# --------------------------------------------------------------------------- state


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str))


_NUMBER = (int, float)
# what every measured row (the original's, each stage's) holds, and what a stage record adds
_ROW_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "params": (_NUMBER, "a number"), "macs": (_NUMBER, "a number"), "size_bytes": (_NUMBER, "a number"),
    "accuracy": ((*_NUMBER, type(None)), "a number or null"), "profile": ((dict,), "an object"),
    "layers": ((list,), "a list"),
}
_STAGE_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "label": ((str,), "a string"), "index": ((int,), "a whole number"), "kind": ((str,), "a string"),
    "seconds": (_NUMBER, "a number"),
}


def _read_state(path: Path) -> dict[str, Any]:
    """A resumed run's ``state.json``, checked field by field: damage is one CheckpointError naming it."""
    fix = "pass --force (force=True) to start the run over, or another --out"

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"cannot resume: {path} is damaged: {what}; {fix}")

    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise CheckpointError(f"cannot resume: cannot read {path}: {exc.strerror or exc}; {fix}") from exc
    except UnicodeDecodeError:
        raise damaged("it is not a text (UTF-8 JSON) file") from None
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise damaged(f"it is not valid JSON ({' '.join(str(exc).split())}); truncated?") from None
    if not isinstance(state, dict):
        raise damaged(f"its top level is a {type(state).__name__}, expected a JSON object")
    version = state.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise damaged(f"'version' is {version!r}, expected a whole number")
    if version > STATE_VERSION:
        raise CheckpointError(f"cannot resume: {path} was written by a newer torchslim (state version {version} > "
                              f"{STATE_VERSION}); {fix}")

    def check(row: Any, where: str, fields: dict[str, tuple[tuple[type, ...], str]]) -> None:
        if not isinstance(row, dict):
            raise damaged(f"{where} is a {type(row).__name__}, expected a JSON object")
        for key, (kinds, allowed) in fields.items():
            value = row.get(key)
            if key not in row or isinstance(value, bool) or not isinstance(value, kinds):
                raise damaged(f"{where}.{key} is {'missing' if key not in row else repr(value)[:60]}, expected {allowed}")

    if state.get("original") is not None:
        check(state["original"], "'original'", _ROW_FIELDS)
    stages = state.get("stages")
    if not isinstance(stages, list):
        raise damaged(f"'stages' is {stages!r:.60}, expected a list")
    for i, record in enumerate(stages):
        check(record, f"'stages[{i}]'", {**_STAGE_FIELDS, **_ROW_FIELDS})
    if stages and state.get("original") is None:
        raise damaged("it lists finished stages but no measurement of the original model")
    return state


def _prepare_out(out: Path, recipe: Recipe, spec: str, data_spec: str | None, resume: bool, force: bool) -> dict[str, Any]:
    state_path = out / STATE_FILE
    fresh = {"version": STATE_VERSION, "recipe": recipe.to_dict(), "model": spec, "data": data_spec,
             "original": None, "stages": []}
    if out.exists() and any(out.iterdir()):
        if force:  # set the old run aside (deleted when this one finishes): a kill loses neither
            set_aside(out)
        elif not resume:
            raise ConfigError(f"output directory {out} already exists; pass --resume (resume=True) to continue "
                              "that run or --force (force=True) to replace it")
        elif not state_path.is_file():
            raise ConfigError(f"cannot resume: {out} exists but has no {STATE_FILE} (not a compress run); "
                              "use another --out or --force")
        else:
            state = _read_state(state_path)
            if state.get("recipe") != recipe.to_dict():
                raise ConfigError(f"cannot resume {out}: it was started with another recipe "
                                  f"(see {out / 'resolved_recipe.yaml'}); use the same recipe or --force")
            if state.get("model") != spec or state.get("data") != data_spec:
                raise ConfigError(f"cannot resume {out}: it was started on model {state.get('model')!r} with data "
                                  f"{state.get('data')!r}, not {spec!r} / {data_spec!r}")
            return state
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "resolved_recipe.yaml") as tmp:
        tmp.write_text(recipe.to_yaml())
    _write_json(state_path, fresh)
    return fresh


# --------------------------------------------------------------------------- the run


def _resolve_inputs(model: Any, recipe: Any, data: Any) -> tuple[nn.Module, Recipe, Any, str, str | None]:
    from torchslim._modelinfo import model_info
    from torchslim.data import load_data
    from torchslim.recipe import load_recipe
    from torchslim.zoo import create_model

    recipe = load_recipe(recipe)
    data_spec = data if isinstance(data, str) else getattr(data, "spec", None)
    if isinstance(data, str):
        data = load_data(data, seed=recipe.seed)
    need = recipe.needs_data()
    if need and data is None:
        raise RecipeError(f"{recipe.source}: stages {', '.join(need)} need data: pass data=... (--data SPEC)")
    if isinstance(model, str):
        model = create_model(model, data=data)
    info = model_info(model)
    if info is None:
        raise ConfigError(f"compress needs a model built by ts.create_model (or loaded with ts.load) so every stage can "
                          f"be checkpointed without pickling; got a bare {type(model).__name__}")
    return model, recipe, data, info.spec, data_spec


_LLM_STAGES = ("quantize_llm", "prune_llm", "heal")


def _preflight(model: nn.Module, recipe: Recipe) -> None:
    """Module patterns of every stage must select something in the model, and the runtimes of its
    deploy targets must be installed: checked before any work."""
    from torchslim.errors import MissingDependencyError
    from torchslim.recipe._export import check_targets
    from torchslim.recipe._export_llm import LLM_TARGETS, is_decoder_lm
    from torchslim.recipe._select import resolve_config

    llm = is_decoder_lm(model)
    for stage in recipe.stages:
        if stage.kind in _LLM_STAGES and not llm:
            raise RecipeError(f"{recipe.source}: stage {stage.index} ({stage.kind}) is for decoder LLMs (transformers "
                              f"...ForCausalLM, e.g. pretrained:smollm2-135m); {type(model).__name__} is not one")
        if stage.kind == "export":
            formats = list(stage.config.get("formats") or ())
            try:
                check_targets(formats)
            except MissingDependencyError as exc:
                raise RecipeError(f"{recipe.source}: stage {stage.index} (export): {exc}") from None
            odd = [f for f in formats if f not in LLM_TARGETS] if llm else [f for f in formats if f in ("gguf", "hf")]
            if odd:
                what = (f"is not a deploy target of a decoder LLM (allowed: {', '.join(LLM_TARGETS)})" if llm else
                        f"is for decoder LLMs (transformers ...ForCausalLM); {type(model).__name__} is not one")
                raise RecipeError(f"{recipe.source}: stage {stage.index} (export): field 'formats': {odd[0]!r} {what}")
        try:
            resolve_config(model, stage.kind, stage.config)
        except ConfigError as exc:
            raise RecipeError(f"{recipe.source}: stage {stage.index} ({stage.kind}): {exc}") from None


def deploy_runtime_of(recipe: Recipe) -> str | None:
    """Where ``recipe``'s result runs: the runtime of its first export format (``eager`` without an
    export stage; None for a format no ``runtime_latency`` runtime runs, e.g. ``torchscript``, ``gguf``)."""
    from torchslim.profile.budget import RUNTIMES
    from torchslim.recipe._guard import deploy_runtime

    formats = next((list(s.config.get("formats") or ()) for s in recipe.stages if s.kind == "export"), ["torch"])
    runtime = deploy_runtime(formats[0]) if formats else "eager"
    return runtime if runtime in RUNTIMES else None


def _finalize_shipped(model: nn.Module) -> dict[str, Any]:
    """Bake pruning masks and weight-sharing codebooks into the final model that ships (``model/``):
    the same outputs, without a mask multiply or a codebook lookup on every call (the guard found
    them making lottery and deep-compression LeNet-5 1.5x / 2.4x slower than the original in eager
    PyTorch). The stage checkpoints keep them, for training on from there."""
    from torchslim._finalize import finalize_, finalizers

    kinds = [k for k in ("clusters", "masks") if k in finalizers()]
    return finalize_(model, kinds) if kinds else {}


def compress(
    model: nn.Module | str,
    recipe: Any,
    data: Any = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    latency: bool = True,
    log: Callable[[str], None] | None = None,
    status: Callable[[str], Any] | None = None,
    allow_slower: bool | None = None,
) -> CompressResult:
    """Run ``recipe`` on ``model`` and return the final model with its report.

    Args:
        model: an ``nn.Module`` built by ``ts.create_model`` / ``ts.load``, or a model spec. It is
            not changed: every stage works on checkpoints in ``out``.
        recipe: a built-in recipe name (``ts.list_recipes()``), a YAML file, a dict, or a ``Recipe``.
        data: a ``DataBundle`` or a data spec; needed by stages that train or calibrate.
        out: output directory (default: a new temporary directory).
        resume: continue the run in ``out`` from its last finished stage.
        force: replace an existing ``out``.
        progress: progress bars while training.
        latency: measure torch latency after every stage (ONNX Runtime latency is measured by
            the ``export`` stage regardless).
        log: where stage lines go (default: nowhere).
        status: ``status(text)`` returns a context manager showing a live line while a step
            without its own progress bar runs (e.g. ``rich.console.Console.status``).
        allow_slower: a final model slower than the original in a runtime it deploys to is no
            failed goal (default: the recipe's ``allow_slower``); see :mod:`torchslim.recipe._guard`.

    Raises:
        RecipeError: the recipe is invalid, or needs data that was not given (before any work).
        ConfigError: ``out`` exists without ``resume`` / ``force``; a resumed run's recipe differs.
        CheckpointError: a resumed run's ``state.json`` (or a stage's saved model) is damaged.
    """
    from torchslim.recipe._select import resolve_config
    from torchslim.recipe.report import build_report, write_reports
    from torchslim.recipe.stages import StageContext, runner_for
    from torchslim.saving import load, save

    say = log or (lambda msg: None)

    def live(text: str) -> Any:
        return status(text) if status is not None and progress else contextlib.nullcontext()

    model, recipe, data, spec, data_spec = _resolve_inputs(model, recipe, data)
    _preflight(model, recipe)
    ptokens = next((s.config.get("perplexity_tokens") for s in recipe.stages if s.kind == "export"), None)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="torchslim-compress-"))
    state = _prepare_out(out, recipe, spec, data_spec, resume, force)
    stages_dir = out / "stages"
    original_dir = stages_dir / "00-original" / "model"
    if state["original"] is None:
        say(f"measuring the original model {spec}")
        save(model, original_dir)
        with live("measuring the original: accuracy, MACs, bytes, latency"):
            state["original"] = measure(load(original_dir), data, original_dir, latency=latency, perplexity_tokens=ptokens)
        _write_json(out / STATE_FILE, state)
    teacher_cache: list[nn.Module] = []

    def teacher() -> nn.Module:
        if not teacher_cache:
            teacher_cache.append(load(original_dir).eval())
        return teacher_cache[0]

    done = {s["label"]: s for s in state["stages"]}
    previous = original_dir
    kinds = stage_kinds()
    n = len(recipe.stages)
    deploy = deploy_runtime_of(recipe)
    for stage in recipe.stages:
        sdir = stages_dir / stage.label
        if stage.label in done:
            previous = sdir / "model"
            say(f"[{stage.index}/{n}] {stage.kind}: finished earlier (resumed)")
            continue
        say(f"[{stage.index}/{n}] {stage.kind}: {kinds[stage.kind].help}")
        torch.manual_seed(recipe.seed + stage.index)
        current = load(previous)
        cfg = resolve_config(current, stage.kind, stage.config)
        ctx = StageContext(data=data, teacher=teacher, finetune=recipe.finetune, seed=recipe.seed, dir=sdir,
                           progress=progress, log=say, deploy_runtime=deploy)
        sdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:  # stages that train show their own progress bars; the others a live line
            with contextlib.nullcontext() if kinds[stage.kind].trains else live(f"{stage.label} running"):
                current, extras = runner_for(stage.kind)(current, cfg, ctx)
        except ConfigError as exc:
            raise RecipeError(f"{recipe.source}: stage {stage.index} ({stage.kind}): {exc}") from exc
        seconds = time.perf_counter() - t0
        current.to("cpu").eval()
        save(current, sdir / "model")
        with live(f"{stage.label} measuring: accuracy, MACs, bytes, latency"):
            row = measure(load(sdir / "model"), data, sdir / "model", latency=latency, perplexity_tokens=ptokens)
        record = {"label": stage.label, "index": stage.index, "kind": stage.kind, "config": stage.config,
                  "seconds": seconds, "files": dict(ctx.files), "extras": extras, **row}
        state["stages"].append(record)
        _write_json(out / STATE_FILE, state)
        acc = "" if row["accuracy"] is None else f"accuracy {100 * row['accuracy']:.2f}%, "
        if row.get("perplexity") is not None:
            acc += f"perplexity {row['perplexity']:.2f}, "
        base = state["original"]
        say(f"    {acc}params {row['params'] / base['params']:.2f}x, MACs {row['macs'] / max(base['macs'], 1):.2f}x, "
            f"size {row['size_bytes'] / base['size_bytes']:.2f}x ({seconds:.1f} s)")
        previous = sdir / "model"
    final = load(previous)
    _finalize_shipped(final)
    save(final, out / "model")
    from torchslim.recipe._guard import guard

    with live("checking the result is not slower than the original where it runs"):
        state["guard"] = guard(state, out, allow_slower=recipe.allow_slower if allow_slower is None else allow_slower,
                               latency=latency, log=say)
    _write_json(out / STATE_FILE, state)
    report = build_report(state, recipe)
    files = write_reports(report, out)
    report["files"].update(files)
    _write_json(out / "report.json", report)
    drop_set_aside(out)
    return CompressResult(model=final, report=report, out=out, files=report["files"])

