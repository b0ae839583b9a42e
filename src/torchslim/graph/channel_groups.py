"""The result of the channel analysis: :class:`ChannelGroups`, a list of :class:`ChannelGroup`.

A *channel* is a union-find class of atoms (:mod:`torchslim.graph.unionfind`); a *group* gathers
the channels one producer creates (a conv's output channels, a residual stream). Importance is
ranked and ratios are applied per group; :meth:`ChannelGroups.keep_indices` turns a set of
removed channels into the indices every bound parameter and buffer keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from torchslim.graph.tracer import Trace
from torchslim.graph.unionfind import FROZEN, UnionFind

__all__ = ["ChannelGroup", "ChannelGroups"]


@dataclass
class ChannelGroup:
    """Channels that are ranked and pruned together (one producer's output space)."""

    id: int
    channels: list[int]  # union-find roots, in the order of the producer's indices
    members: list[tuple[str, int]]  # (parameter/buffer name, dimension) bound to these channels
    producers: list[tuple[str, int]]  # the members that create the space
    modules: list[str] = field(default_factory=list)
    head_dim: int | None = None  # set when the channels are attention heads of this width

    @property
    def size(self) -> int:
        return len(self.channels)

    def __repr__(self) -> str:
        prods = ", ".join(f"{n}[{d}]" for n, d in self.producers[:3]) or "-"
        more = f" +{len(self.producers) - 3}" if len(self.producers) > 3 else ""
        return f"ChannelGroup(#{self.id}, {self.size} channels, produced by {prods}{more}, {len(self.members)} bound tensors)"


@dataclass
class ChannelGroups:
    """Result of the channel-space analysis: prunable groups and how to apply a removal."""

    groups: list[ChannelGroup]
    trace: Trace
    param_atoms: dict[str, list[np.ndarray | None]]  # name -> per-dim atom ids (None: not a channel dim)
    uf: UnionFind
    frozen_params: list[str]
    seconds: float
    drivers: dict[int, tuple[int, ...]] = field(default_factory=dict)  # derived root -> driver roots
    meta_ok: bool = False  # the model runs on the meta device (shape-only trials are possible)
    meta_fallback: str | None = None  # why the trace ran the real forward instead (None: it did not)

    def roots(self, name: str, dim: int) -> np.ndarray:
        """Channel (union-find root) of every index of a bound tensor's dimension, cached."""
        cache = self.__dict__.setdefault("_roots", {})
        key = (name, dim)
        r = cache.get(key)
        if r is None:
            raw = self.uf.roots(self.param_atoms[name][dim])
            if self.drivers:
                drv = self.drivers
                raw = np.fromiter(((drv[x][0] if drv[x] else FROZEN) if x in drv else x for x in raw.tolist()),
                                  dtype=np.int64, count=len(raw))
            r = cache[key] = raw
        return r

    def _multi_drivers(self, name: str, dim: int) -> list[tuple[int, tuple[int, ...]]]:
        """Positions of a bound dim driven by several channels (it goes when any of them goes), cached."""
        cache = self.__dict__.setdefault("_multi", {})
        key = (name, dim)
        got = cache.get(key)
        if got is None:
            got = []
            if self.drivers:
                raw = self.uf.roots(self.param_atoms[name][dim])
                for i, x in enumerate(raw.tolist()):
                    drv = self.drivers.get(x)
                    if drv and len(drv) > 1:
                        got.append((i, drv))
            cache[key] = got
        return got

    def _flags(self, removed: set[int]) -> np.ndarray:
        """A lookup table: ``flags[channel]`` is whether the channel is removed."""
        flags = np.zeros(max(self.uf.n, max(removed, default=0) + 1), dtype=bool)
        if removed:
            flags[np.fromiter(removed, dtype=np.int64, count=len(removed))] = True
        return flags

    def _removed_mask(self, name: str, dim: int, flags: np.ndarray, rem_set: set[int]) -> np.ndarray:
        mask = flags[self.roots(name, dim)]
        for i, drv in self._multi_drivers(name, dim):  # a position with several drivers goes when any goes
            if not mask[i]:
                mask[i] = any(d in rem_set for d in drv)
        return mask

    def segments(self, group: ChannelGroup) -> list[np.ndarray]:
        """The group's channels (indices into ``group.channels``) split by the tensors they are
        bound to: one segment for a conv's outputs or a residual stream; several where the group
        spans the parts of a split or cat (a channel shuffle's two halves, RAFT's hidden state and
        context cut from one conv's output). Cached."""
        cache = self.__dict__.setdefault("_segments", {})
        got = cache.get(group.id)
        if got is None:
            sig = np.zeros((len(group.members), group.size), dtype=bool)
            for k, (name, dim) in enumerate(group.members):
                if name in self.param_atoms and dim < len(self.param_atoms[name]) and self.param_atoms[name][dim] is not None:
                    _, idx = self.positions(group, name, dim)
                    sig[k, idx] = True
            _, inverse = np.unique(sig.T, axis=0, return_inverse=True)
            inverse = np.asarray(inverse).reshape(-1)
            got = cache[group.id] = [np.flatnonzero(inverse == u) for u in np.unique(inverse)]
        return got

    def removed_masks(self, removed: set[int]) -> dict[str, list[np.ndarray | None]]:
        """For every bound tensor, per dimension, which positions go when ``removed`` channels go
        (None for a dimension that is not a channel dimension)."""
        flags = self._flags(removed)
        return {name: [None if atoms is None else self._removed_mask(name, d, flags, removed) for d, atoms in enumerate(dims)]
                for name, dims in self.param_atoms.items()}

    def positions(self, group: ChannelGroup, name: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions along ``dim`` bound to the group, index of their channel within the group)."""
        roots = self.roots(name, dim)
        chans = np.asarray(group.channels, dtype=np.int64)
        order = np.argsort(chans)
        sorted_c = chans[order]
        loc = np.searchsorted(sorted_c, roots)
        loc = np.clip(loc, 0, len(sorted_c) - 1)
        hit = sorted_c[loc] == roots
        pos = np.nonzero(hit)[0]
        return pos, order[loc[hit]]

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def __getitem__(self, i: int) -> ChannelGroup:
        return self.groups[i]

    def keep_indices(self, removed: set[int]) -> dict[str, list[torch.Tensor | None]]:
        """For each bound tensor, per dimension, the indices kept after removing ``removed`` channels."""
        out: dict[str, list[torch.Tensor | None]] = {}
        if not removed:
            return out
        rem_set = set(removed)
        flags = self._flags(rem_set)
        for name, dims in self.param_atoms.items():
            per_dim: list[torch.Tensor | None] = []
            changed = False
            for d, atoms in enumerate(dims):
                if atoms is None:
                    per_dim.append(None)
                    continue
                mask = ~self._removed_mask(name, d, flags, rem_set)
                if mask.all():
                    per_dim.append(None)
                else:
                    changed = True
                    per_dim.append(torch.from_numpy(np.nonzero(mask)[0]))
            if changed:
                out[name] = per_dim
        return out

    def table(self) -> Any:
        """A table, one row per group: prints as plain text, renders as a rich table on a console."""
        from rich.table import Table

        from torchslim._text import printable

        t = Table(title=f"{len(self.groups)} prunable channel groups ({self.seconds:.2f} s)")
        for col in ("#", "channels", "produced by", "bound tensors", "modules"):
            t.add_column(col, justify="right" if col in ("#", "channels", "bound tensors") else "left")
        for g in self.groups:
            prods = ", ".join(f"{n}[{d}]" for n, d in g.producers[:2]) + (" ..." if len(g.producers) > 2 else "")
            mods = ", ".join(g.modules[:4]) + (f" +{len(g.modules) - 4}" if len(g.modules) > 4 else "")
            t.add_row(str(g.id), str(g.size), prods, str(len(g.members)), mods)
        return printable(t)

    def __repr__(self) -> str:
        lines = [f"ChannelGroups({len(self.groups)} groups, analysed in {self.seconds:.2f} s)"]
        lines += [f"  {g!r}" for g in self.groups]
        return "\n".join(lines)
