"""The pieces :func:`torchslim.distill.distill` trains with: the frozen teacher and the student wrapper."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchslim._utils import evaluating, logits_of, model_device
from torchslim.distill.losses import DistillLoss
from torchslim.distill.taps import FeatureTaps

__all__ = ["frozen", "TeacherRunner", "Distiller", "logits_of"]


@contextmanager
def frozen(teacher: nn.Module) -> Iterator[nn.Module]:
    """Teacher in eval mode with ``requires_grad=False`` for the block; modes, flags and device restored."""
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    device = model_device(teacher)
    teacher.requires_grad_(False)
    try:
        with evaluating(teacher):
            yield teacher
    finally:
        teacher.to(device)
        for param, flag in flags:
            param.requires_grad_(flag)


def _row_keys(inputs: torch.Tensor) -> list[bytes]:
    rows = inputs.detach().to("cpu").contiguous().flatten(1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


class TeacherRunner:
    """Runs the frozen teacher on a batch: its logits and tapped features, live or from a cache.

    The cache (``cache=True``) holds the teacher's outputs for every training sample, keyed by
    the sample's bytes: the teacher is a fixed function of its input, so a hit is exact; a batch
    with any unseen row (data augmentation) runs the teacher live and counts a miss.
    """

    def __init__(self, teacher: nn.Module, taps: FeatureTaps, cache: bool = False) -> None:
        self.teacher, self.taps, self.use_cache = teacher, taps, cache
        self.index_: dict[bytes, int] | None = None
        self.cached_: list[torch.Tensor] = []
        self.misses_ = 0

    @torch.no_grad()
    def live(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if model_device(self.teacher) != inputs.device:
            self.teacher.to(inputs.device)
        self.taps.clear()
        logits = logits_of(self.teacher(inputs)).detach()
        return logits, [f.detach() for f in self.taps.collect()]

    def build_cache(self, dataset: Dataset, device: torch.device, batch_size: int = 256) -> None:
        """Run the teacher once over ``dataset`` and keep its outputs on the CPU."""
        index: dict[bytes, int] = {}
        parts: list[list[torch.Tensor]] = []
        row = 0
        for inputs, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            logits, feats = self.live(inputs.to(device))
            for key in _row_keys(inputs):
                index.setdefault(key, row)  # equal inputs have equal teacher outputs
                row += 1
            parts.append([t.cpu() for t in (logits, *feats)])
        self.cached_ = [torch.cat(column) for column in zip(*parts)]
        self.index_ = index

    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.use_cache and self.index_ is not None:
            rows = [self.index_.get(key) for key in _row_keys(inputs)]
            if all(row is not None for row in rows):
                picked = torch.tensor(rows, dtype=torch.long)
                out = [t.index_select(0, picked).to(inputs.device) for t in self.cached_]
                return out[0], out[1:]
            self.misses_ += 1
        return self.live(inputs)


class Distiller(nn.Module):
    """The student plus the loss's learned adapters: what :func:`torchslim.train.fit` trains.

    ``forward(inputs)`` is the student's forward (evaluation); ``forward(inputs, targets)``
    returns ``(distillation loss, student outputs)``, so under DistributedDataParallel the whole
    loss, adapters included, is computed inside the wrapped forward. The teacher is not a
    submodule: it is neither optimised nor saved in checkpoints.
    """

    def __init__(
        self,
        student: nn.Module,
        loss: DistillLoss,
        student_taps: FeatureTaps,
        teacher: TeacherRunner,
        n_hidden: int,
    ) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        self.__dict__["_taps"] = student_taps
        self.__dict__["_teacher"] = teacher
        self.__dict__["_n_hidden"] = n_hidden

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        if targets is None:
            return self.student(inputs)
        self._taps.clear()
        outputs = self.student(inputs)
        student_feats = self._taps.collect()
        teacher_logits, teacher_feats = self._teacher(inputs)
        n = self._n_hidden
        pairs = list(zip(student_feats[:n], teacher_feats[:n]))
        attention = list(zip(student_feats[n:], teacher_feats[n:]))
        loss = self.loss(logits_of(outputs), teacher_logits, targets, pairs, attention)
        return loss, outputs


def distill_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
    """The ``loss_fn`` handed to :func:`torchslim.train.fit`: the Distiller computes everything."""
    return model(inputs, targets)
