"""Training checkpoints: model, optimizer, scheduler, history, callbacks and RNG state.

A checkpoint holds the model's *training* state. Layers whose ``state_dict`` is a compressed
storage form that drops what only training needs (binary layers save packed signs, not their
latent float weights) check :func:`training_state_active` and save their full state while a
checkpoint is written, so that resuming is bit-identical.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import random
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchslim.errors import CheckpointError
from torchslim.train.callbacks import Callback, TrainState

_CHECKPOINT_FORMAT = "torchslim.train.checkpoint/1"
_TRAINING_STATE: contextvars.ContextVar[bool] = contextvars.ContextVar("torchslim_training_state", default=False)


def training_state_active() -> bool:
    """Whether a training checkpoint is being written (``state_dict`` should keep training state)."""
    return _TRAINING_STATE.get()


@contextlib.contextmanager
def training_state() -> Iterator[None]:
    """Within this block, ``state_dict()`` of compressing layers returns their full training state."""
    token = _TRAINING_STATE.set(True)
    try:
        yield
    finally:
        _TRAINING_STATE.reset(token)


def model_training_state(model: torch.nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` with every layer's full training state (see the module doc)."""
    with training_state():
        return model.state_dict()


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, state: TrainState, callbacks: list[Callback], best: float | None) -> None:
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "epochs_completed": len(state.history),
        "step": state.step,
        "model": model_training_state(state.model),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "history": state.history,
        "best_val_accuracy": best,
        "stop_training": state.stop_training,
        "config": state.config.to_dict(),
        "callbacks": [cb.state_dict() for cb in callbacks],
        "rng": _rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _crc32_on():  # every record's CRC-32 lets _load_checkpoint find a flipped bit
            torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _crc32_on() -> contextlib.AbstractContextManager[Any]:
    """``torch.save`` with a CRC-32 per record (torch's default, forced in case a user turned it off)."""
    try:
        from torch.utils.serialization import config

        config.save.compute_crc32  # noqa: B018 - the setting exists in this torch
    except (ImportError, AttributeError):  # older torch: CRCs are always written
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": True})


def _short(exc: BaseException, limit: int = 200, *, first_sentence: bool = True) -> str:
    """``exc`` on one line, its first sentence only by default (torch's messages run over several
    lines and go on with advice that does not apply here)."""
    text = " ".join(str(exc).split())
    if first_sentence:
        text = text.split(". ")[0].rstrip(".")
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _verify_archive(path: Path, fix: str) -> None:
    """Check the zip archive ``torch.save`` wrote: its structure and every record's CRC-32.

    ``torch.load`` reads records without checking their CRC, so a flipped bit in a tensor would
    load silently; this reads the file once more and refuses it instead.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if not records:
                raise zipfile.BadZipFile("the archive is empty")
            if any(r.file_size for r in records) and all(r.CRC == 0 for r in records):
                return  # written with torch's CRC-32s turned off: nothing to check against
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"training checkpoint {path} is damaged or not a torch checkpoint "
                              f"({_short(exc)}); {fix}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read training checkpoint {path}: {exc.strerror or _short(exc)}; {fix}") from exc
    if bad is not None:
        raise CheckpointError(f"training checkpoint {path} is damaged: the CRC-32 of its record "
                              f"{bad.split('/', 1)[-1]!r} does not match (a corrupted or changed file); {fix}")


def _load_checkpoint(path: Path, state: TrainState, callbacks: list[Callback]) -> float | None:
    """Restore ``state`` (model, optimizer, scheduler, history, RNG) in place; return the best metric.

    The file is checked first (zip structure and the CRC-32 of every record), then read with
    ``torch.load(weights_only=True)``: no code in a checkpoint ever runs.

    Raises:
        CheckpointError: the file is damaged, not a torchslim training checkpoint, or does not
            fit this model, optimizer or config (one line naming the file and the fix).
    """
    fix = f"delete {path} or pass resume=False to start fresh"
    _verify_archive(path, fix)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} is not a torchslim training checkpoint: it holds objects other than "
                              f"tensors and plain data, which are not loaded (for safety); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad checkpoint
        raise CheckpointError(
            f"training checkpoint {path} is damaged or not a torch checkpoint ({type(exc).__name__}: {_short(exc)}); {fix}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a torchslim training checkpoint (format {_CHECKPOINT_FORMAT}); {fix}"
        )
    saved = payload.get("config") or {}
    for name in ("optimizer", "lr_schedule"):
        if saved.get(name, getattr(state.config, name)) != getattr(state.config, name):
            raise CheckpointError(
                f"training checkpoint {path} was written with {name}={saved[name]!r}, but this run uses "
                f"{name}={getattr(state.config, name)!r}; use the same value to resume, or {fix}"
            )
    try:
        state.model.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
        saved_callbacks = payload["callbacks"]
        if len(saved_callbacks) == len(callbacks):
            for callback, saved in zip(callbacks, saved_callbacks):
                callback.load_state_dict(saved)
        state.history = list(payload["history"])
        state.metrics = dict(state.history[-1]) if state.history else {}
        state.step = int(payload["step"])
        state.epoch = int(payload["epochs_completed"])
        state.stop_training = bool(payload["stop_training"])
        _set_rng_state(payload["rng"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"training checkpoint {path} does not fit this model/optimizer ({type(exc).__name__}: "
            f"{_short(exc, 300, first_sentence=False)}); {fix}"
        ) from exc
    return payload.get("best_val_accuracy")

