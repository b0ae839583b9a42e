"""The one small train / evaluate loop that every method family reuses.

Pruning schedules, distillation and quantization-aware training plug into :func:`fit` through
:class:`Callback` hooks and a custom ``loss_fn``; nothing else about the loop changes.

Example:
    >>> import torch
    >>> from torchslim.data import load_data
    >>> from torchslim.zoo.models import create_zoo_model
    >>> data = load_data("synthetic:1x8:n=40")
    >>> _ = torch.manual_seed(0)
    >>> model = create_zoo_model("lenet300", data.input_shape, data.num_classes)
    >>> result = fit(model, data, TrainConfig(epochs=1, lr=0.01), progress=False)
    >>> result.epochs_run, 0.0 <= result.test_accuracy <= 1.0
    (1, True)
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchslim._config import ConfigDict
from torchslim._utils import evaluating
from torchslim._utils import is_int as _is_int
from torchslim._utils import is_number as _is_number
from torchslim._utils import logits_of as _logits
from torchslim._utils import model_device as _model_device
from torchslim.data import DataBundle, load_data
from torchslim.errors import ConfigError
from torchslim.train import distributed as _dist
from torchslim.train.callbacks import Callback, EarlyStopping, TrainState, _call
from torchslim.train.checkpoint import _load_checkpoint, _save_checkpoint

__all__ = [
    "TrainConfig",
    "TrainState",
    "TrainResult",
    "Callback",
    "EarlyStopping",
    "fit",
    "evaluate",
    "seed_everything",
    "resolve_device",
]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Any]


# --------------------------------------------------------------------------- config




@dataclass(frozen=True)
class TrainConfig(ConfigDict):
    """How :func:`fit` trains: a small frozen value, checked when built, that round-trips to JSON.

    Attributes:
        epochs: Number of epochs (0 trains nothing and only evaluates).
        lr: Initial learning rate (> 0).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum in [0, 1) (unused by Adam/AdamW).
        weight_decay: L2 penalty (>= 0); decoupled for AdamW.
        batch_size: Training (and validation) batch size.
        lr_schedule: ``"constant"``; ``"cosine"`` (to 0 over ``epochs``); or ``"step"`` (x0.1 at
            50% and 75% of ``epochs``). The learning rate changes once per epoch.
        seed: Seed of every generator and of the per-epoch shuffling.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        max_steps_per_epoch: Stop each epoch after this many steps (``None``: the whole split).
        grad_clip: Clip the global gradient norm to this value (``None``: no clipping).

    Example:
        >>> cfg = TrainConfig(epochs=2, lr=0.05)
        >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    epochs: int = 5
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    lr_schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    max_steps_per_epoch: int | None = None
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        for name, (ok, allowed) in _CHECKS.items():
            value = getattr(self, name)
            if not ok(value):
                raise ConfigError(f"TrainConfig.{name} must be {allowed}; got {value!r}")
            if name in ("lr", "momentum", "weight_decay", "grad_clip") and value is not None:
                object.__setattr__(self, name, float(value))  # ints become floats


def _valid_device(device: Any) -> bool:
    if device == "auto":
        return True
    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return False
    return isinstance(device, str)


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(map(repr, OPTIMIZERS))}"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "lr_schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(map(repr, SCHEDULES))}"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "device": (_valid_device, "'auto' or a torch device string such as 'cpu', 'cuda' or 'cuda:0'"),
    "max_steps_per_epoch": (lambda v: v is None or (_is_int(v) and v >= 1), "None or a positive integer"),
    "grad_clip": (lambda v: v is None or (_is_number(v) and v > 0), "None or a positive number"),
}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; refuse CUDA on a machine without it."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(device)!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'"
        )
    return resolved




def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators.

    Args:
        seed: A non-negative integer.
        deterministic: Also switch torch to deterministic algorithms (a global setting that stays
            on; needed for bit-identical results on CUDA, at some speed cost).

    Raises:
        ConfigError: ``seed`` is not a non-negative integer.
    """
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0; got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False



# --------------------------------------------------------------------------- evaluation


def _pair(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ConfigError(f"batches must be (inputs, targets) pairs; got {type(batch).__name__}")
    return batch[0].to(device), batch[1].to(device)


def evaluate(
    model: nn.Module,
    loader_or_dataset: DataLoader | Dataset,
    device: str | torch.device | None = None,
    *,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of a classifier on labeled data.

    Runs under ``torch.no_grad`` in eval mode and restores every module's train/eval mode after,
    even on error. The model is not moved.

    Args:
        model: A classifier returning logits of shape ``(batch, classes)`` (or a tuple whose first
            item is, or an object with ``.logits``).
        loader_or_dataset: A DataLoader of ``(inputs, targets)`` or a Dataset of such samples.
        device: Where to run the batches (``"auto"`` allowed); the model's device by default.
        batch_size: Batch size when a Dataset is given.

    Returns:
        ``{"accuracy": fraction in [0, 1], "loss": mean cross-entropy, "n": samples}``.

    Raises:
        ConfigError: Empty or unlabeled data, or batches that are not ``(inputs, targets)`` pairs.
    """
    if isinstance(loader_or_dataset, DataLoader):
        loader = loader_or_dataset
    elif isinstance(loader_or_dataset, Dataset) or hasattr(loader_or_dataset, "__getitem__"):
        loader = DataLoader(loader_or_dataset, batch_size=batch_size, shuffle=False)
    else:
        raise ConfigError(f"evaluate needs a DataLoader or a Dataset; got {type(loader_or_dataset).__name__}")
    run_on = _model_device(model) if device is None else resolve_device(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run_on)
    correct = torch.zeros((), dtype=torch.int64, device=run_on)
    unlabeled = torch.zeros((), dtype=torch.bool, device=run_on)
    n = 0
    with evaluating(model), torch.no_grad():
        for batch in loader:
            inputs, targets = _pair(batch, run_on)
            logits = _logits(model(inputs))
            unlabeled |= (targets < 0).any()
            loss_sum += F.cross_entropy(logits, targets.clamp(min=0), reduction="sum").double()
            correct += (logits.argmax(dim=1) == targets).sum()
            n += int(targets.shape[0])
    if n == 0:
        raise ConfigError("evaluate got no samples; pass a non-empty data set")
    if bool(unlabeled):
        raise ConfigError(
            "evaluate needs labeled data (targets >= 0); this data set is unlabeled (targets are -1)"
        )
    return {"accuracy": int(correct) / n, "loss": float(loss_sum) / n, "n": n}



# --------------------------------------------------------------------------- fit


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (none with requires_grad=True)")
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    sched = torch.optim.lr_scheduler
    if config.lr_schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    milestones = sorted({m for m in (config.epochs // 2, 3 * config.epochs // 4) if m > 0})
    if config.lr_schedule == "step":
        return sched.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return sched.MultiStepLR(optimizer, milestones=[], gamma=1.0)  # constant


def _cross_entropy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
    outputs = model(inputs)
    return F.cross_entropy(_logits(outputs), targets), outputs


def _epoch_seed(seed: int, epoch: int) -> int:
    """Shuffling seed of one epoch: a function of ``(seed, epoch)`` only, so resuming repeats it."""
    return ((seed + 1) * 1_000_003 + epoch) % 2**63


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _train_epoch(
    state: TrainState,
    loss_fn: LossFn,
    callbacks: list[Callback],
    bar: Progress,
    forward_model: nn.Module | None = None,
    env: _dist.DistEnv | None = None,
) -> dict[str, Any]:
    config, model, device = state.config, state.model, state.device
    forward_model = model if forward_model is None else forward_model
    if env is None:
        loader = state.data.loader(
            "train", config.batch_size, shuffle=True, seed=_epoch_seed(config.seed, state.epoch)
        )
    else:  # this process's rows of the same global batches (see torchslim.train.distributed)
        loader = _dist.shard_loader(state.data.train, config.batch_size, config.seed, state.epoch, env)
    steps = (
        len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
    )
    task = bar.add_task(f"epoch {state.epoch + 1}/{config.epochs}", total=steps, loss=float("nan"))
    metrics: dict[str, Any] = {"epoch": state.epoch + 1, "lr": float(state.optimizer.param_groups[0]["lr"])}
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = counted = done = 0
    started = time.perf_counter()
    model.train()
    for index, batch in enumerate(loader):
        if index >= steps:
            break
        inputs, targets = _pair(batch, device)
        state.epoch_step, state.batch = index, (inputs, targets)
        _call(callbacks, "on_step_begin", state)
        state.optimizer.zero_grad(set_to_none=True)
        result = loss_fn(forward_model, inputs, targets)
        loss, outputs = result if isinstance(result, (tuple, list)) else (result, None)
        loss.backward()
        _call(callbacks, "on_after_backward", state)
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        state.optimizer.step()
        state.step += 1
        done += 1
        state.loss, state.outputs = float(loss.detach()), outputs
        n = int(targets.shape[0])
        loss_sum += loss.detach().double() * n
        seen += n
        logits = _logits(outputs)
        if state.data.labeled and isinstance(logits, torch.Tensor) and logits.dim() == 2 and len(logits) == n:
            correct += (logits.detach().argmax(dim=1) == targets).sum()
            counted += n
        _call(callbacks, "on_step_end", state)
        bar.update(task, advance=1, loss=state.loss)
        if state.stop_training:
            break
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device),
                          torch.tensor(float(counted), dtype=torch.float64, device=device)])
    loss_sum, correct, seen, counted = _dist.all_reduce_sum(totals, env).tolist()  # sums over processes
    correct, seen, counted = int(correct), int(seen), int(counted)
    metrics["steps"] = done
    metrics["train_loss"] = float(loss_sum) / max(seen, 1)
    if counted:
        metrics["train_accuracy"] = int(correct) / counted
    metrics["time_s"] = round(time.perf_counter() - started, 4)
    return metrics


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        history: One dict per finished epoch (``epoch``, ``lr``, ``steps``, ``train_loss``,
            ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``time_s``), resumed epochs included.
        best_val_accuracy: Best validation accuracy over all epochs (``None`` for unlabeled data).
        test_accuracy: Accuracy on the test split after training (``None`` for unlabeled data).
        test_loss: Cross-entropy on the test split (``None`` for unlabeled data).
        epochs_run: Epochs finished in total, resumed ones included.
        stopped_early: Whether a callback stopped training before ``config.epochs``.
        checkpoint: Path of ``last.pt``, or ``None`` without a ``checkpoint_dir``.
    """

    history: list[dict[str, Any]]
    best_val_accuracy: float | None
    test_accuracy: float | None
    epochs_run: int
    checkpoint: str | None = None
    test_loss: float | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return dataclasses.asdict(self)


def fit(
    model: nn.Module,
    data: DataBundle | str,
    config: TrainConfig | None = None,
    *,
    callbacks: Iterable[Callback] = (),
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    distributed: bool | str = "auto",
) -> TrainResult:
    """Train ``model`` in place on ``data.train``, validating on ``data.val`` each epoch.

    Deterministic: everything is seeded from ``config.seed`` and each epoch's shuffling depends
    only on ``(seed, epoch)``, so on CPU, training N epochs straight and training k epochs then
    resuming from the checkpoint gives bit-identical weights.

    Args:
        model: The model; moved to ``config.device`` and left there, in training mode.
        data: A :class:`~torchslim.data.DataBundle` or a data spec string.
        config: A :class:`TrainConfig` (defaults when ``None``).
        callbacks: :class:`Callback` objects, called in the given order.
        loss_fn: ``loss_fn(model, inputs, targets) -> (loss, outputs)``; cross-entropy on
            ``model(inputs)`` by default (required for unlabeled data).
        optimizer: An optimizer over the model's parameters; built from ``config`` by default.
            The learning-rate schedule of ``config`` is applied to it either way.
        checkpoint_dir: Write ``last.pt`` there (atomically) after every epoch.
        resume: Continue from ``checkpoint_dir/last.pt`` if it exists (else start fresh).
        progress: Show a progress bar on stderr (rank 0 only in a distributed run).
        distributed: ``"auto"``: data-parallel (DistributedDataParallel, see
            :mod:`torchslim.train.distributed`) when launched by ``torchrun`` with ``WORLD_SIZE > 1``;
            ``"ddp"``/``True``: require such a launch; ``"off"``/``False``: never. In a distributed
            run ``config.batch_size`` is the global batch (each of ``P`` processes takes
            ``batch_size / P`` rows), so the updates equal those of a one-process run; only rank
            0 writes checkpoints, and every rank resumes from them.

    Returns:
        A :class:`TrainResult`. Validation and test accuracies are skipped for unlabeled data.

    Raises:
        ConfigError: Invalid config, callbacks or data for the chosen loss, or a global batch that
            does not divide by the number of processes.
        CheckpointError: ``resume`` found a checkpoint that is corrupt or does not fit the model.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig; got {type(config).__name__}")
    if isinstance(data, str):
        data = load_data(data, seed=config.seed)
    if not isinstance(data, DataBundle):
        raise ConfigError(f"data must be a DataBundle or a data spec string; got {type(data).__name__}")
    if loss_fn is None and not data.labeled:
        raise ConfigError(
            f"data {data.spec!r} is unlabeled: pass a loss_fn (e.g. a distillation loss) to train on it"
        )
    callbacks = list(callbacks)
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"callbacks must be torchslim.train.Callback instances; got {type(callback).__name__}"
            )
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs a checkpoint_dir to resume from")
    device = resolve_device(config.device)
    env = _dist.setup(distributed, device)
    try:
        result = _fit(model, data, config, callbacks, loss_fn, optimizer, checkpoint_dir, resume, progress, env)
    except BaseException:
        _dist.cleanup(env, wait=False)  # the other processes may never reach a barrier
        raise
    _dist.cleanup(env)
    return result


def _fit(
    model: nn.Module,
    data: DataBundle,
    config: TrainConfig,
    callbacks: list[Callback],
    loss_fn: LossFn | None,
    optimizer: torch.optim.Optimizer | None,
    checkpoint_dir: str | os.PathLike[str] | None,
    resume: bool,
    progress: bool,
    env: _dist.DistEnv | None,
) -> TrainResult:
    device = resolve_device(config.device) if env is None else env.device
    if env is not None:
        _dist.per_process_batch(config.batch_size, env)  # fail before training on a bad split
    seed_everything(config.seed)
    model.to(device)
    optimizer = optimizer if optimizer is not None else _make_optimizer(model, config)
    state = TrainState(model, optimizer, _make_scheduler(optimizer, config), config, data, device)
    path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    best: float | None = None
    if resume and path is not None and path.exists():
        best = _load_checkpoint(path, state, callbacks)
    loss_fn = loss_fn if loss_fn is not None else _cross_entropy
    forward_model = _dist.wrap_model(model, env)
    with _progress(progress and _dist.is_main_process(env)) as bar:
        _call(callbacks, "on_train_begin", state)
        for epoch in range(state.epoch, config.epochs):
            if state.stop_training:
                break
            state.epoch = epoch
            _call(callbacks, "on_epoch_begin", state)
            metrics = _train_epoch(state, loss_fn, callbacks, bar, forward_model, env)
            if data.labeled:
                val = evaluate(model, data.loader("val", config.batch_size, shuffle=False), device)
                metrics["val_loss"], metrics["val_accuracy"] = val["loss"], val["accuracy"]
                best = val["accuracy"] if best is None else max(best, val["accuracy"])
            state.history.append(metrics)
            state.metrics = metrics
            state.scheduler.step()
            _call(callbacks, "on_epoch_end", state)
            if path is not None:
                if _dist.is_main_process(env):
                    _save_checkpoint(path, state, callbacks, best)
                _dist.barrier(env)  # no process reads a checkpoint half written
        _call(callbacks, "on_train_end", state)
    test_accuracy = test_loss = None
    if data.labeled:
        test = evaluate(model, data.loader("test", config.batch_size, shuffle=False), device)
        test_accuracy, test_loss = test["accuracy"], test["loss"]
    return TrainResult(
        history=state.history,
        best_val_accuracy=best,
        test_accuracy=test_accuracy,
        test_loss=test_loss,
        epochs_run=len(state.history),
        stopped_early=state.stop_training and len(state.history) < config.epochs,
        checkpoint=str(path) if path is not None else None,
    )
