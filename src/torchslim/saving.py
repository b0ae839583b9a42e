"""``ts.save`` / ``ts.load``: a model directory is ``plan.json`` + ``model.safetensors``.

No pickles: ``plan.json`` says how to build the original architecture (the model spec) and
lists the compression plans applied to it, in order; ``load`` rebuilds the architecture,
replays every plan (so pruned shapes, factorised layers etc. come back; both with
:func:`torchslim._modelinfo.rebuild`), then loads the weights strictly.
``example_inputs.safetensors`` keeps the model's example inputs.

Safetensors has no checksum, so ``plan.json`` records the byte size and SHA-256 of each file
``save`` writes (``"files"``); ``load`` checks them before parsing anything, and every damaged,
truncated or foreign file is one :class:`~torchslim.errors.CheckpointError` naming the file.

A saved directory is itself a model spec: this module registers it as the ``"saved"`` model
source, so ``ts.create_model(DIR)`` loads it without the zoo knowing about saving.
"""

from __future__ import annotations

import hashlib
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
from torchslim.errors import CheckpointError, ConfigError, MissingDependencyError, TorchslimError
from torchslim.graph.inputs import Inputs

__all__ = ["FORMAT", "VERSION", "save", "load", "write_weights", "register_plan_kind", "replay_plan"]

FORMAT = "torchslim-model"
VERSION = 1
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
INPUTS_FILE = "example_inputs.safetensors"
FILES_KEY = "files"  # plan.json: {file name: {"bytes": size, "sha256": hex digest}}
_CHUNK = 1 << 20

def write_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the model's parameters and buffers as safetensors (tied tensors stored once)."""
    from safetensors.torch import save_model

    save_model(model, str(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _detail(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as one short line (messages of torch and safetensors span lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def save(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``directory`` (created or replaced atomically) and return its path.

    The directory is itself a model spec: ``ts.create_model(str(directory))`` or
    ``torchslim profile DIR`` loads it. ``plan.json`` records the byte size and SHA-256 of
    every file written beside it, and :func:`load` checks them, so a damaged file is refused.

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

    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "model": info.to_dict(),
        "example_inputs": {"args": len(info.example.args), "kwargs": sorted(info.example.kwargs)},
    }
    tensors: dict[str, torch.Tensor] = {}
    meta["example_inputs"]["tree"] = {
        "args": [_encode(v, f"arg{i}", tensors) for i, v in enumerate(info.example.args)],
        "kwargs": {k: _encode(v, f"kw.{k}", tensors) for k, v in sorted(info.example.kwargs.items())},
    }
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        write_weights(model, tmp / WEIGHTS_FILE)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / INPUTS_FILE))
        meta[FILES_KEY] = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                           for name in (WEIGHTS_FILE, INPUTS_FILE)}
        (tmp / PLAN_FILE).write_text(json.dumps(meta, indent=2))
    return Path(directory)


# ---- example inputs: any tree of tensors, lists, tuples, dicts and JSON scalars ------------------
def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``value`` as a JSON node; its tensors go to ``tensors`` under keys derived from ``key``
    (a detector's list of images is ``arg0.0``, ``arg0.1``, ...)."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__ if type(value) in (list, tuple) else "tuple":
                [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise ConfigError(
        f"cannot save the example input {key!r} of type {type(value).__name__}: example inputs may hold tensors, "
        "lists, tuples, dicts with string keys, numbers, strings and None; set others with ts.set_example_inputs"
    )


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    """The value ``node`` stands for; a malformed node damages ``plan.json`` beside ``where``
    (the inputs file), a missing tensor the inputs file itself."""
    if not isinstance(node, dict) or len(node) != 1:
        raise _damaged(where.parent / PLAN_FILE, f"an example-input entry is {node!r}, expected one of tensor/list/tuple/dict/value")
    (kind, body), = node.items()
    if kind == "tensor":
        if body not in tensors:
            raise CheckpointError(f"{where} does not hold the example input {body!r} {PLAN_FILE} lists")
        return tensors[body]
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [_decode(v, tensors, where) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict" and isinstance(body, dict):
        return {k: _decode(v, tensors, where) for k, v in body.items()}
    if kind == "value" and (body is None or isinstance(body, (bool, int, float, str))):
        return body
    raise _damaged(where.parent / PLAN_FILE, f"an example-input entry is {node!r}, expected one of tensor/list/tuple/dict/value")


def _decode_inputs(example: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path) -> Inputs:
    inputs_path = directory / INPUTS_FILE
    tree = example.get("tree")
    if tree is None:  # written before example inputs could be nested: top-level tensors only
        n, kws = example.get("args", 0), example.get("kwargs", [])
        missing = [k for k in [f"arg{i}" for i in range(n)] + [f"kw.{k}" for k in kws] if k not in tensors]
        if missing:
            raise CheckpointError(f"{inputs_path} does not hold the example inputs {PLAN_FILE} lists "
                                  f"(no {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        return Inputs(tuple(tensors[f"arg{i}"] for i in range(n)), {k: tensors[f"kw.{k}"] for k in kws})
    if not isinstance(tree, dict) or not isinstance(tree.get("args"), list) or not isinstance(tree.get("kwargs"), dict):
        raise _damaged(directory / PLAN_FILE, "'example_inputs.tree' is not {\"args\": [...], \"kwargs\": {...}}")
    if len(tree["args"]) != example.get("args", 0) or sorted(tree["kwargs"]) != sorted(example.get("kwargs", [])):
        raise _damaged(directory / PLAN_FILE, f"'example_inputs.tree' holds {len(tree['args'])} positional and "
                                              f"{sorted(tree['kwargs'])} keyword inputs, but 'example_inputs' lists "
                                              f"{example.get('args', 0)} and {sorted(example.get('kwargs', []))}")
    return Inputs(tuple(_decode(v, tensors, inputs_path) for v in tree["args"]),
                  {k: _decode(v, tensors, inputs_path) for k, v in tree["kwargs"].items()})


# ---- reading: every damage is one CheckpointError naming the file --------------------------------
def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is damaged: {what}")


def _read_plan(plan_path: Path) -> dict[str, Any]:
    """``plan.json`` parsed and checked field by field (types included)."""
    try:
        text = plan_path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise CheckpointError(f"cannot read {plan_path}: {exc.strerror or _detail(exc)}") from exc
    except UnicodeDecodeError:
        raise _damaged(plan_path, "it is not a text (UTF-8 JSON) file; save the model again") from None
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise _damaged(plan_path, f"it is not valid JSON ({_detail(exc)}); truncated? save the model again") from None
    if not isinstance(meta, dict):
        raise _damaged(plan_path, f"its top level is a JSON {_json_type(meta)}, expected an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{plan_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise _damaged(plan_path, f"'version' is {version!r}, expected a whole number")
    if version > VERSION:
        raise CheckpointError(f"{plan_path.parent} was written by a newer torchslim (format version {version} > "
                              f"{VERSION}); upgrade torchslim to load it")
    record = meta.get("model")
    if record is None:
        raise _damaged(plan_path, "it has no 'model' entry (the model spec and the plans applied to it)")
    if not isinstance(record, dict):
        raise _damaged(plan_path, f"'model' is a JSON {_json_type(record)}, expected an object "
                                  "(the model spec and the plans applied to it)")
    for key, kinds, allowed in (("kind", (str,), "a string"), ("spec", (str,), "a string"),
                                ("build", (dict, type(None)), "an object"), ("plans", (list, type(None)), "a list")):
        if key == "kind" or key in record:
            if not isinstance(record.get(key), kinds):
                raise _damaged(plan_path, f"'model.{key}' is a JSON {_json_type(record.get(key))}, expected {allowed}")
    for i, plan in enumerate(record.get("plans") or []):
        if not isinstance(plan, dict):
            raise _damaged(plan_path, f"'model.plans[{i}]' is a JSON {_json_type(plan)}, expected an object")
    example = meta.get("example_inputs", {})
    if not isinstance(example, dict):
        raise _damaged(plan_path, f"'example_inputs' is a JSON {_json_type(example)}, expected an object")
    args, kwargs = example.get("args", 0), example.get("kwargs", [])
    if isinstance(args, bool) or not isinstance(args, int) or args < 0:
        raise _damaged(plan_path, f"'example_inputs.args' is {args!r}, expected a count (a whole number >= 0)")
    if not isinstance(kwargs, list) or not all(isinstance(k, str) for k in kwargs):
        raise _damaged(plan_path, f"'example_inputs.kwargs' is {kwargs!r}, expected a list of names")
    files = meta.get(FILES_KEY, {})
    if not isinstance(files, dict):
        raise _damaged(plan_path, f"'{FILES_KEY}' is a JSON {_json_type(files)}, expected an object")
    for name in (WEIGHTS_FILE, INPUTS_FILE):
        entry = files.get(name)
        if entry is None:
            continue
        size, digest = (entry.get("bytes"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if (isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(digest, str)
                or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
            raise _damaged(plan_path, f"its record of {name} is {entry!r}, expected "
                                      '{"bytes": SIZE, "sha256": 64 hex digits}')
    return meta


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _verify_files(d: Path, meta: dict[str, Any]) -> None:
    """Check every file ``plan.json`` records (byte size, then SHA-256) before anything parses it.

    Directories written before torchslim recorded them have no record and are not checked.
    """
    for name, entry in meta.get(FILES_KEY, {}).items():
        if name not in (WEIGHTS_FILE, INPUTS_FILE):
            continue  # a file a later torchslim records; this one does not read it
        path, want = d / name, int(entry["bytes"])
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {PLAN_FILE} records it ({want} bytes); "
                                  "restore it or save the model again")
        size = path.stat().st_size
        if size != want:
            what = f"truncated: {size} bytes" if size < want else f"it has {size} bytes"
            raise _damaged(path, f"{what}, expected {want} (the size recorded in {PLAN_FILE} when it was saved); "
                                 "restore it or save the model again")
        try:
            digest = _sha256(path)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or _detail(exc)}") from exc
        if digest != entry["sha256"]:
            raise _damaged(path, f"its sha256 does not match the one recorded in {PLAN_FILE} when it was saved "
                                 f"({digest[:12]}... instead of {entry['sha256'][:12]}...): a changed or corrupted "
                                 "file; restore it or save the model again")


def load(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save`: architecture, plans, weights, example inputs.

    The files are checked against the sizes and SHA-256 digests ``plan.json`` records before
    they are parsed (directories saved without that record are loaded unchecked).

    Raises:
        CheckpointError: files missing, damaged (truncated, changed, not of their format),
            of another format, from a newer version, or weights that do not match the rebuilt
            architecture; the message names the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    d = Path(directory)
    plan_path = d / PLAN_FILE
    weights = d / WEIGHTS_FILE
    if not plan_path.is_file() or not weights.is_file():
        from torchslim._fs import interrupted_replace

        survivor = interrupted_replace(d)  # a --force replace killed between its two renames
        if survivor is not None:
            raise CheckpointError(survivor)
        raise CheckpointError(f"{d} is not a torchslim model directory: it needs {PLAN_FILE} and {WEIGHTS_FILE}")
    meta = _read_plan(plan_path)
    _verify_files(d, meta)
    try:
        model = rebuild(meta["model"])
    except MissingDependencyError:
        raise  # the fix is to install it, not the directory
    except TorchslimError as exc:  # the record names a spec, a shape, a plan that cannot be built
        raise CheckpointError(f"cannot rebuild the model saved in {d} (from {PLAN_FILE}): {_detail(exc, 500)}") from exc
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"cannot rebuild the model recorded in {plan_path}: its plans do not replay "
                              f"({type(exc).__name__}: {_detail(exc)}); is it damaged?") from exc
    try:
        load_model(model, str(weights), strict=True, device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise _damaged(weights, f"it is not a readable safetensors file ({_detail(exc)}); "
                                "restore it or save the model again") from exc
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"weights in {weights} do not fit the rebuilt model: {_detail(exc)}") from exc
    example = Inputs()
    inputs_path = d / INPUTS_FILE
    if inputs_path.is_file():
        try:
            ts = load_file(str(inputs_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _damaged(inputs_path, f"it is not a readable safetensors file ({_detail(exc)}); "
                                        "restore it or save the model again") from exc
        example = _decode_inputs(meta.get("example_inputs", {}), ts, d)
    model.eval()
    return attach(model, replace(model_info(model), example=example))


def _create_saved(text: str, *, input_shape: Any = None, num_classes: int | None = None) -> nn.Module:
    return load(text)


register("model", "saved", ModelSource(_create_saved, claims=lambda text: Path(text).is_dir(), priority=-10),
         family="saving", description="a directory written by ts.save")
