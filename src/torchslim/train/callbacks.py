"""Callbacks and the state they see: the hooks :func:`torchslim.train.fit` calls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchslim._utils import is_int as _is_int
from torchslim._utils import is_number as _is_number
from torchslim.errors import ConfigError

if TYPE_CHECKING:
    from torchslim.data import DataBundle
    from torchslim.train.loop import TrainConfig

__all__ = ["TrainState", "Callback", "EarlyStopping"]


@dataclass
class TrainState:
    """What callbacks see and may change while :func:`fit` runs.

    Attributes:
        model: The model being trained.
        optimizer: Its optimizer.
        scheduler: The learning-rate scheduler (stepped once per epoch).
        config: The :class:`TrainConfig`.
        data: The :class:`~torchslim.data.DataBundle`.
        device: The device the model and batches are on.
        epoch: Index of the current epoch, from 0.
        step: Optimizer steps taken so far, over all epochs.
        epoch_step: Index of the current step within the epoch.
        batch: The current ``(inputs, targets)``, on ``device``.
        loss: Loss of the last step, as a float.
        outputs: Model outputs of the last step (as ``loss_fn`` returned them).
        metrics: Metrics of the last finished epoch (the newest ``history`` entry).
        history: One dict of metrics per finished epoch.
        stop_training: Set it to ``True`` to stop after the current step.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    data: DataBundle
    device: torch.device
    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    batch: Any = None
    loss: float | None = None
    outputs: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_training: bool = False


class Callback:
    """Hooks into :func:`fit`; override the ones you need (all do nothing by default).

    Per epoch the order is ``on_epoch_begin``, then per step ``on_step_begin`` ->
    forward/backward -> ``on_after_backward`` (gradients exist; mask them here) ->
    optimizer step -> ``on_step_end`` (re-apply masks here), then validation and
    ``on_epoch_end``. ``on_train_begin`` and ``on_train_end`` frame the run (also on resume).

    A callback with state overrides :meth:`state_dict` / :meth:`load_state_dict`, so its state
    is saved in checkpoints and restored on resume.
    """

    def on_train_begin(self, state: TrainState) -> None:
        """Called once before the first epoch."""

    def on_epoch_begin(self, state: TrainState) -> None:
        """Called at the start of every epoch."""

    def on_step_begin(self, state: TrainState) -> None:
        """Called before every forward pass (``state.batch`` is set)."""

    def on_after_backward(self, state: TrainState) -> None:
        """Called after ``backward`` and before the optimizer step."""

    def on_step_end(self, state: TrainState) -> None:
        """Called after every optimizer step."""

    def on_epoch_end(self, state: TrainState) -> None:
        """Called after every epoch's validation (``state.metrics`` is set)."""

    def on_train_end(self, state: TrainState) -> None:
        """Called once after the last epoch, before the test evaluation."""

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints (plain Python values and tensors)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class EarlyStopping(Callback):
    """Stop training when a metric has not improved for ``patience`` epochs.

    Args:
        monitor: A key of the per-epoch metrics (``"val_accuracy"``, ``"val_loss"``,
            ``"train_loss"``...).
        patience: Epochs without improvement to tolerate before stopping.
        mode: ``"max"`` if larger is better, ``"min"`` if smaller is better.
        min_delta: Smallest change that counts as an improvement.

    Attributes:
        best_: Best value seen so far.
        wait_: Epochs since the last improvement.
        stopped_epoch_: Index of the epoch after which training stopped, or ``None``.
    """

    def __init__(
        self, monitor: str = "val_accuracy", patience: int = 3, mode: str = "max", min_delta: float = 0.0
    ):
        if mode not in ("max", "min"):
            raise ConfigError(f"EarlyStopping mode must be 'max' or 'min'; got {mode!r}")
        if not _is_int(patience) or patience < 0:
            raise ConfigError(f"EarlyStopping patience must be an integer >= 0; got {patience!r}")
        if not _is_number(min_delta) or min_delta < 0:
            raise ConfigError(f"EarlyStopping min_delta must be a number >= 0; got {min_delta!r}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, float(min_delta)
        self.best_: float | None = None
        self.wait_ = 0
        self.stopped_epoch_: int | None = None

    def on_epoch_end(self, state: TrainState) -> None:
        if self.monitor not in state.metrics:
            raise ConfigError(
                f"EarlyStopping monitors {self.monitor!r}, which this run does not produce; "
                f"available: {', '.join(sorted(state.metrics))}"
            )
        value = float(state.metrics[self.monitor])
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best_ is None or sign * (value - self.best_) > self.min_delta:
            self.best_, self.wait_ = value, 0
            return
        self.wait_ += 1
        if self.wait_ >= self.patience:
            state.stop_training = True
            self.stopped_epoch_ = state.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best_, "wait": self.wait_, "stopped_epoch": self.stopped_epoch_}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_, self.wait_, self.stopped_epoch_ = state["best"], state["wait"], state["stopped_epoch"]


def _call(callbacks: Iterable[Callback], hook: str, state: TrainState) -> None:
    for callback in callbacks:
        getattr(callback, hook)(state)

