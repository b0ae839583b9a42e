"""Data-parallel training under ``torchrun``: what :func:`torchslim.train.fit` uses when launched so.

Nothing home-made: ``torch.distributed`` with the backend that fits the device (gloo on CPU, nccl
on CUDA), :class:`~torch.nn.parallel.DistributedDataParallel`, and a
:class:`~torch.utils.data.DistributedSampler` (:class:`ShardSampler`) seeded so that, with ``P`` processes and a global
batch ``B``, process ``r`` sees rows ``r, r + P, ...`` of the very batch a one-process run takes
in the same step. Gradients are averaged over processes, so the update equals the one-process
update on ``B`` samples (exactly, up to float rounding, when the train split divides into
global batches and the model has no BatchNorm or dropout, whose statistics and masks are per
process).

Launch a script that calls ``ts.fit`` / ``ts.distill`` with::

    torchrun --nproc_per_node 2 train.py                  # one machine, 2 processes
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 train.py  # many

Example:
    >>> env = from_env({"WORLD_SIZE": "1"})
    >>> env is None  # not launched by torchrun with more than one process
    True
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from torchslim.errors import ConfigError

__all__ = [
    "DistEnv",
    "from_env",
    "setup",
    "cleanup",
    "wrap_model",
    "unwrap_model",
    "shard_loader",
    "ShardSampler",
    "sampler_seed",
    "is_main_process",
    "barrier",
    "all_reduce_sum",
]

MODES = ("auto", "ddp", "off")


@dataclass
class DistEnv:
    """One process's place in a distributed run.

    Attributes:
        rank: Global rank (0 writes checkpoints and prints).
        world_size: Number of processes.
        local_rank: Rank on this machine (picks the GPU).
        backend: ``"gloo"`` or ``"nccl"``.
        device: This process's device.
        owns_group: Whether this run created the process group (destroyed when the process exits).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str = "gloo"
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key, str(default))
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {key} must be an integer (torchrun sets it); got {value!r}") from None


def from_env(env: Mapping[str, str] | None = None) -> DistEnv | None:
    """Rank, world size and local rank from torchrun's variables; ``None`` for one process."""
    env = os.environ if env is None else env
    world = _int_env(env, "WORLD_SIZE", 1)
    if world <= 1 and not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), _int_env(env, "LOCAL_RANK", 0), dist.get_backend())
    return DistEnv(_int_env(env, "RANK", 0), world, _int_env(env, "LOCAL_RANK", 0))


def setup(mode: Any, device: torch.device) -> DistEnv | None:
    """Join (or create) the process group when ``mode`` asks for it; ``None`` for a one-process run.

    Args:
        mode: ``"auto"`` (distributed when launched with ``WORLD_SIZE > 1``), ``"ddp"`` or ``True``
            (must be launched so), ``"off"`` or ``False`` (never).
        device: The device the run asked for; on CUDA each process takes ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: An unknown mode, or ``"ddp"`` without torchrun's environment.
    """
    if mode is True:
        mode = "ddp"
    elif mode is False:
        mode = "off"
    if mode not in MODES:
        raise ConfigError(f"distributed must be one of {', '.join(map(repr, MODES))}, True or False; got {mode!r}")
    if mode == "off":
        return None
    env = from_env()
    if env is None:
        if mode == "ddp":
            raise ConfigError(
                "distributed='ddp' needs a multi-process launch: start the script with "
                "`torchrun --nproc_per_node N script.py` (WORLD_SIZE is 1 or unset here)"
            )
        return None
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    env.device = device
    if not dist.is_initialized():
        env.backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=env.backend)
        env.owns_group = True
        # One group for the life of the process: later fit() calls reuse it (re-creating the
        # default group on torchrun's shared store is not reliable), destroyed at exit.
        atexit.register(_destroy)
    return env


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def cleanup(env: DistEnv | None, *, wait: bool = True) -> None:
    """Wait for every process at the end of a run (skipped with ``wait=False``, after an error)."""
    if env is not None and wait and dist.is_initialized():
        dist.barrier()


def wrap_model(model: nn.Module, env: DistEnv | None) -> nn.Module:
    """``DistributedDataParallel(model)`` in a distributed run (rank 0's weights are broadcast)."""
    if env is None:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sampler_seed(seed: int) -> int:
    """Base seed of the DistributedSampler: ``base + epoch`` is the one-process epoch seed.

    :func:`torchslim.train.fit` shuffles epoch ``e`` with a generator seeded
    ``(seed + 1) * 1_000_003 + e``; DistributedSampler seeds its generator with
    ``sampler.seed + epoch``, so both draw the same permutation.
    """
    return ((seed + 1) * 1_000_003) % 2**63


def per_process_batch(batch_size: int, env: DistEnv) -> int:
    """Global batch / world size (the global batch stays what a one-process run uses).

    Raises:
        ConfigError: The global batch does not divide by the number of processes.
    """
    if batch_size % env.world_size:
        raise ConfigError(
            f"TrainConfig.batch_size is the global batch and must divide by the {env.world_size} processes; "
            f"got {batch_size} (use a multiple of {env.world_size})"
        )
    return batch_size // env.world_size


class ShardSampler(DistributedSampler):
    """A seeded :class:`~torch.utils.data.DistributedSampler` over the one-process order.

    Epoch ``e`` orders the data exactly as a shuffled one-process ``DataLoader`` whose generator is
    seeded ``seed + e`` does (``DataLoader`` draws its worker base seed from that generator before
    the permutation, so a bare ``randperm`` would differ); then, like its parent, it pads the order
    to a multiple of the world size and gives rank ``r`` the items ``r, r + P, r + 2P, ...``. Call
    :meth:`set_epoch` before every epoch.
    """

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = next(iter(DataLoader(range(n), batch_size=n, shuffle=True, generator=g))).tolist()
        if self.drop_last:
            order = order[: self.total_size]
        else:
            order += (order * (1 + self.total_size // max(n, 1)))[: self.total_size - n]
        return iter(order[self.rank : self.total_size : self.num_replicas])


def shard_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, env: DistEnv) -> DataLoader:
    """This process's share of one epoch: a seeded :class:`ShardSampler`, ``set_epoch(epoch)``.

    Args:
        dataset: The train split.
        batch_size: The global batch size.
        seed: The run's seed (see :func:`sampler_seed`).
        epoch: Epoch index.
        env: The distributed environment.
    """
    sampler = ShardSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=sampler_seed(seed), drop_last=False
    )
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=per_process_batch(batch_size, env), sampler=sampler, num_workers=0)


def is_main_process(env: DistEnv | None) -> bool:
    """True in a one-process run and on rank 0."""
    return env is None or env.is_main


def barrier(env: DistEnv | None) -> None:
    """Wait for every process (no-op for one process)."""
    if env is not None and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv | None) -> torch.Tensor:
    """Sum ``tensor`` over processes in place (no-op for one process)."""
    if env is not None and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
