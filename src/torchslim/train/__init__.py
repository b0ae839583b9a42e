"""Training: the one loop every family reuses, its callbacks, checkpoints and data parallelism.

* :mod:`~torchslim.train.loop` — :func:`fit`, :func:`evaluate`, :class:`TrainConfig`, :class:`TrainResult`;
* :mod:`~torchslim.train.callbacks` — :class:`Callback`, :class:`TrainState`, :class:`EarlyStopping`;
* :mod:`~torchslim.train.checkpoint` — what a training checkpoint holds (resume is bit-identical);
* :mod:`~torchslim.train.distributed` — data parallelism under ``torchrun``.
"""

from torchslim.train import distributed
from torchslim.train.callbacks import Callback, EarlyStopping, TrainState
from torchslim.train.loop import (
    TrainConfig,
    TrainResult,
    evaluate,
    fit,
    resolve_device,
    seed_everything,
)

__all__ = [
    "Callback",
    "EarlyStopping",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "distributed",
    "evaluate",
    "fit",
    "resolve_device",
    "seed_everything",
]
