"""``ts.save`` / ``ts.load``: a model directory is ``plan.json`` + ``model.safetensors``.

No pickles: ``plan.json`` says how to build the original architecture (the model spec) and
lists the compression plans applied to it, in order; ``load`` rebuilds the architecture,
replays every plan (so pruned shapes, factorised layers etc. come back; both with
:func:`torchslim._modelinfo.rebuild`), then loads the weights strictly.
``example_inputs.safetensors`` keeps the model's example inputs.

A saved directory is itself a model spec: this module registers it as the ``"saved"`` model
source, so ``ts.create_model(DIR)`` loads it without the zoo knowing about saving.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._modelinfo import (
    ModelSource,
    attach,
    model_info,
    rebuild,
    rebuildable,
    register_plan_kind,
    replay_plan,
)
from torchslim._registry import register
from torchslim._utils import atomic_path
from torchslim.errors import CheckpointError, ConfigError, SpecError
from torchslim.graph.inputs import Inputs

__all__ = ["FORMAT", "VERSION", "save", "load", "write_weights", "register_plan_kind", "replay_plan"]

FORMAT = "torchslim-model"
VERSION = 1
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
INPUTS_FILE = "example_inputs.safetensors"

def write_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the model's parameters and buffers as safetensors (tied tensors stored once)."""
    from safetensors.torch import save_model

    save_model(model, str(path))


def save(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``directory`` (created or replaced atomically) and return its path.

    The directory is itself a model spec: ``ts.create_model(str(directory))`` or
    ``torchslim profile DIR`` loads it.

    Raises:
        ConfigError: the model has no spec (build it with ``ts.create_model``), so it could not
            be rebuilt without pickling it.
    """
    info = model_info(model)
    if info is None or not rebuildable(info.kind):
        raise ConfigError(
            f"cannot save {type(model).__name__}: it has no model spec to rebuild it from; "
            "create it with ts.create_model(spec) (a file.py:factory spec works for any model)"
        )
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "model": info.to_dict(),
        "example_inputs": {"args": len(info.example.args), "kwargs": sorted(info.example.kwargs)},
    }
    tensors = {f"arg{i}": t for i, t in enumerate(info.example.args) if isinstance(t, torch.Tensor)}
    tensors.update({f"kw.{k}": v for k, v in info.example.kwargs.items() if isinstance(v, torch.Tensor)})
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        write_weights(model, tmp / WEIGHTS_FILE)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / INPUTS_FILE))
        (tmp / PLAN_FILE).write_text(json.dumps(meta, indent=2))
    return Path(directory)


def load(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save`: architecture, plans, weights, example inputs.

    Raises:
        CheckpointError: files missing, of another format, from a newer version, or weights
            that do not match the rebuilt architecture.
    """
    from safetensors.torch import load_file, load_model

    d = Path(directory)
    plan_path = d / PLAN_FILE
    if not plan_path.is_file() or not (d / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{d} is not a torchslim model directory: it needs {PLAN_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(plan_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{plan_path} is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{plan_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{d} was written by a newer torchslim (format version {meta['version']} > {VERSION})")
    try:
        model = rebuild(meta["model"])
    except SpecError as exc:
        raise CheckpointError(f"cannot rebuild the model saved in {d}: {exc}") from exc
    try:
        missing, unexpected = load_model(model, str(d / WEIGHTS_FILE), strict=True, device=str(map_location))
    except (RuntimeError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights in {d / WEIGHTS_FILE} do not fit the rebuilt model: {exc}") from exc
    example = Inputs()
    if (d / INPUTS_FILE).is_file():
        ts = load_file(str(d / INPUTS_FILE))
        n = meta.get("example_inputs", {}).get("args", 0)
        kws = meta.get("example_inputs", {}).get("kwargs", [])
        example = Inputs(tuple(ts[f"arg{i}"] for i in range(n)), {k: ts[f"kw.{k}"] for k in kws})
    model.eval()
    return attach(model, replace(model_info(model), example=example))


def _create_saved(text: str, *, input_shape: Any = None, num_classes: int | None = None) -> nn.Module:
    return load(text)


register("model", "saved", ModelSource(_create_saved, claims=lambda text: Path(text).is_dir(), priority=-10),
         family="saving", description="a directory written by ts.save")
