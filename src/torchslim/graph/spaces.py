"""Channel spaces: which indices of which parameters must be removed together.

Every index of every dimension of every traced tensor is an *atom*. Parameters get fresh atoms
where an op makes them a channel (a conv's output and input channels, a linear's rows and
columns, a norm's features, an embedding's width); model inputs, spatial and token dimensions,
constants and anything an op does not understand get the one *frozen* atom. Ops then relate
atoms: elementwise ops (residual ``add``, ``mul``, norms, activations) unite them (union-find),
``cat`` concatenates atom lists, ``split``/``slice`` take sub-lists, ``view``/``flatten`` keep
per-dimension *factors* (channels x spatial) so a linear after a flatten is bound to the conv
before it, ``permute``/``transpose`` reorder dimensions, matrix products unite the contracted
dimensions. A *channel* is a union-find class of atoms; removing it removes every index whose
atom is in the class, in every parameter and buffer at once. Classes that touch the frozen atom
(model inputs and outputs, head splits, grouped convolutions...) are never removed.

A *group* gathers the channels one producer creates (a conv's output channels, a residual
stream): importance is ranked and ratios are applied per group.
"""

from __future__ import annotations

import fnmatch
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.errors import UnsupportedOpError
from torchslim.graph.tracer import OpNode, TensorMeta, Trace, trace
from torchslim.profile._formulas import _pointwise

__all__ = ["ChannelGroup", "ChannelGroups", "groups", "analyse"]

Factor = np.ndarray  # atom ids, one per index
Dim = tuple  # tuple[Factor, ...]: row-major product of factors
Layout = tuple  # tuple[Dim, ...]: one per tensor dimension

_FROZEN = 0


class _UnionFind:
    """Union-find over integer atoms (0 is the frozen atom). The root of a set is always its
    smallest atom, so the frozen atom wins and otherwise the oldest; whole arrays are united at
    once (numpy), which is what the channel analysis does almost exclusively."""

    def __init__(self) -> None:
        self._p = np.zeros(1024, dtype=np.int64)
        self.n = 1

    @property
    def parent(self) -> np.ndarray:
        return self._p[: self.n]

    def new(self, n: int) -> np.ndarray:
        start, stop = self.n, self.n + n
        if stop > len(self._p):
            grown = np.zeros(max(2 * len(self._p), stop), dtype=np.int64)
            grown[: self.n] = self._p[: self.n]
            self._p = grown
        ids = np.arange(start, stop, dtype=np.int64)
        self._p[start:stop] = ids
        self.n = stop
        return ids

    def find(self, a: int) -> int:
        p = self._p
        root = a
        while p[root] != root:
            root = int(p[root])
        while p[a] != root:  # path compression
            p[a], a = root, int(p[a])
        return int(root)

    def roots(self, a: np.ndarray) -> np.ndarray:
        p = self._p
        r = p[a]
        while True:
            rr = p[r]
            if np.array_equal(rr, r):
                break
            r = rr
        p[a] = r  # path compression
        return r

    def union(self, a: int, b: int) -> None:
        self.union_arrays(np.array([a], dtype=np.int64), np.array([b], dtype=np.int64))

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        if a is b or len(a) == 0:
            return
        ra, rb = self.roots(np.asarray(a, dtype=np.int64)), self.roots(np.asarray(b, dtype=np.int64))
        differ = ra != rb
        if not differ.any():
            return
        ra, rb = ra[differ], rb[differ]
        hi, lo = np.maximum(ra, rb), np.minimum(ra, rb)
        order = np.sort(hi)
        if len(order) < 2 or (order[1:] != order[:-1]).all():
            # each root gets at most one (smaller) parent: linking directly keeps a forest whose
            # roots are their trees' smallest atoms
            self._p[hi] = lo
            return
        nodes = np.unique(np.concatenate([ra, rb]))  # sorted: a component's smallest label is its root
        labels = _components(len(nodes), np.searchsorted(nodes, ra), np.searchsorted(nodes, rb))
        self._p[nodes] = nodes[labels]

    def freeze(self, a: np.ndarray) -> None:
        if len(a):
            self._p[self.roots(np.asarray(a, dtype=np.int64))] = _FROZEN  # roots under the frozen atom

    def root_array(self) -> np.ndarray:
        """The root of every atom at once (pointer jumping on a copy; the forest is unchanged)."""
        p = self._p[: self.n].copy()
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return p
            p = q


def _size(dim: Dim) -> int:
    n = 1
    for f in dim:
        n *= len(f)
    return n


def _atoms(dim: Dim) -> np.ndarray:
    return np.concatenate(dim) if len(dim) > 1 else dim[0]


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
    uf: _UnionFind
    frozen_params: list[str]
    seconds: float
    drivers: dict[int, tuple[int, ...]] = field(default_factory=dict)  # derived root -> driver roots
    meta_ok: bool = False  # the model runs on the meta device (shape-only trials are possible)

    def roots(self, name: str, dim: int) -> np.ndarray:
        """Channel (union-find root) of every index of a bound tensor's dimension, cached."""
        cache = self.__dict__.setdefault("_roots", {})
        key = (name, dim)
        r = cache.get(key)
        if r is None:
            raw = self.uf.roots(self.param_atoms[name][dim])
            if self.drivers:
                drv = self.drivers
                raw = np.fromiter(((drv[x][0] if drv[x] else _FROZEN) if x in drv else x for x in raw.tolist()),
                                  dtype=np.int64, count=len(raw))
            r = cache[key] = raw
        return r

    def _removed_mask(self, name: str, dim: int, rem: np.ndarray, rem_set: set[int]) -> np.ndarray:
        mask = np.isin(self.roots(name, dim), rem)
        if self.drivers:  # a position with several drivers goes when any of them goes
            raw = self.uf.roots(self.param_atoms[name][dim])
            for i, x in enumerate(raw.tolist()):
                drv = self.drivers.get(x)
                if drv and len(drv) > 1 and not mask[i]:
                    mask[i] = any(d in rem_set for d in drv)
        return mask

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
        rem = np.fromiter(removed, dtype=np.int64)
        rem_set = set(removed)
        for name, dims in self.param_atoms.items():
            per_dim: list[torch.Tensor | None] = []
            changed = False
            for d, atoms in enumerate(dims):
                if atoms is None:
                    per_dim.append(None)
                    continue
                mask = ~self._removed_mask(name, d, rem, rem_set)
                if mask.all():
                    per_dim.append(None)
                else:
                    changed = True
                    per_dim.append(torch.from_numpy(np.nonzero(mask)[0]))
            if changed:
                out[name] = per_dim
        return out

    def table(self) -> Any:
        """A rich table: one row per group."""
        from rich.table import Table

        t = Table(title=f"{len(self.groups)} prunable channel groups ({self.seconds:.2f} s)")
        for col in ("#", "channels", "produced by", "bound tensors", "modules"):
            t.add_column(col, justify="right" if col in ("#", "channels", "bound tensors") else "left")
        for g in self.groups:
            prods = ", ".join(f"{n}[{d}]" for n, d in g.producers[:2]) + (" ..." if len(g.producers) > 2 else "")
            mods = ", ".join(g.modules[:4]) + (f" +{len(g.modules) - 4}" if len(g.modules) > 4 else "")
            t.add_row(str(g.id), str(g.size), prods, str(len(g.members)), mods)
        return t

    def __repr__(self) -> str:
        lines = [f"ChannelGroups({len(self.groups)} groups, analysed in {self.seconds:.2f} s)"]
        lines += [f"  {g!r}" for g in self.groups]
        return "\n".join(lines)


class _Analyser:
    def __init__(self, tr: Trace, ignore: tuple[str, ...], mha: dict[str, dict[str, Any]] | None = None) -> None:
        self.tr = tr
        self.mha = mha or {}  # attention modules handled as a whole: name -> num_heads, head_dim
        self.mha_heads: dict[str, np.ndarray] = {}
        self.uf = _UnionFind()
        self.layouts: dict[int, Layout] = {}
        self.ignore = ignore
        self.param_of: dict[int, str] = {}
        for name, meta in tr.params.items():
            self.param_of.setdefault(meta.id, name)
        self.param_atoms: dict[str, list[np.ndarray | None]] = {}
        self.producers: list[tuple[str, int]] = []
        self._zeros: dict[int, np.ndarray] = {}
        # atom -> driver atoms: the atom is removed when any driver is (head splits, flattens)
        self.derived: dict[int, tuple[int, ...]] = {}
        self.head_dims: dict[int, int] = {}  # head atom -> head_dim (size of the frozen inner dim)

    # ---- layouts ---------------------------------------------------------------------------
    def opaque(self, n: int) -> Dim:
        z = self._zeros.get(n)
        if z is None:
            z = self._zeros[n] = np.zeros(n, dtype=np.int64)
        return (z,)

    def opaque_layout(self, shape: tuple[int, ...]) -> Layout:
        return tuple(self.opaque(s) for s in shape)

    def layout(self, t: TensorMeta) -> Layout:
        lay = self.layouts.get(t.id)
        if lay is None:
            if t.id in self.param_of and t.is_floating:
                name = self.param_of[t.id]
                lay = tuple((self.uf.new(s),) for s in t.shape)
                self.param_atoms[name] = [d[0] for d in lay]
            else:
                lay = self.opaque_layout(t.shape)
            self.layouts[t.id] = lay
        return lay

    def set(self, t: TensorMeta, lay: Layout) -> None:
        if t.id in self.param_of:  # an in-place op on a parameter: unite instead of replacing
            self.unite_layouts(self.layout(t), lay)
            return
        if tuple(_size(d) for d in lay) != t.shape:
            lay = self.opaque_layout(t.shape)
        self.layouts[t.id] = lay

    def freeze_dim(self, d: Dim) -> None:
        for f in d:
            self.uf.freeze(f)

    def freeze(self, t: TensorMeta) -> None:
        for d in self.layout(t):
            self.freeze_dim(d)

    def unite(self, a: Dim, b: Dim) -> Dim:
        if a is b:
            return a
        if len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self.uf.union_arrays(x, y)
            return a
        if _size(a) != _size(b):  # e.g. grouped-query attention: heads broadcast by the kernel
            self.freeze_dim(a)
            self.freeze_dim(b)
            return self.opaque(_size(a))
        if len(a) == 1 and _is_frozen(b):
            self.freeze_dim(a)
            return b
        if len(b) == 1 and _is_frozen(a):
            self.freeze_dim(b)
            return a
        if len(a) == 1 or len(b) == 1:
            single, product = (a, b) if len(a) == 1 else (b, a)
            self.derive(single[0], product)
            return product
        # two products factored differently, e.g. (batch, query heads) against (batch, kv heads,
        # repeats) in grouped-query attention: unite the leading factors that line up, then the
        # rest as one single factor derived from the other's product (query head i goes with
        # key/value head i // repeats)
        i = 0
        while i < min(len(a), len(b)) - 1 and len(a[i]) == len(b[i]):
            self.uf.union_arrays(a[i], b[i])
            i += 1
        ta, tb = a[i:], b[i:]
        if len(ta) == 1 or len(tb) == 1:
            single, product = (ta, tb) if len(ta) == 1 else (tb, ta)
            self.derive(single[0], product)
            return (*a[:i], *product)
        self.freeze_dim(a)
        self.freeze_dim(b)
        return self.opaque(_size(a))

    def derive(self, atoms: np.ndarray, product: Dim) -> None:
        """Index ``i`` of ``atoms`` is the row-major index into ``product``'s factors."""
        grids = np.meshgrid(*product, indexing="ij")
        drivers = np.stack([g.reshape(-1) for g in grids], axis=1)
        for atom, drv in zip(atoms.tolist(), drivers.tolist()):
            if atom == _FROZEN:
                continue
            live = tuple(x for x in drv if x != _FROZEN)
            if not live:
                self.uf.union(atom, _FROZEN)
            else:
                self.derived[atom] = live

    def split_heads(self, atoms: np.ndarray, sizes: list[int]) -> list[Dim]:
        """A channel dim reshaped into (heads, head_dim, ...): heads become new prunable atoms,
        the inner dims are frozen (pruning head_dim would change the attention scale)."""
        if len(sizes) == 3 and sizes[0] in (2, 3) and sizes[1] > 1:
            # a fused projection reshaped into (parts, heads, head_dim), parts being q/k/v or k/v
            # (timm: ``qkv.reshape(B, N, 3, num_heads, head_dim)``): head h of every part is one unit
            parts, n_heads, inner = sizes
            heads = self.uf.new(n_heads)
            for h in heads.tolist():
                self.head_dims[h] = inner
            if (self.uf.roots(atoms) == _FROZEN).any():
                self.uf.freeze(heads)
            else:
                for i, atom in enumerate(atoms.tolist()):
                    self.derived[atom] = (int(heads[(i // inner) % n_heads]),)
            return [self.opaque(parts), (heads,), self.opaque(inner)]
        inner = int(np.prod(sizes[1:]))
        heads = self.uf.new(sizes[0])
        for h in heads.tolist():
            self.head_dims[h] = inner
        frozen_atoms = self.uf.roots(atoms) == _FROZEN
        if frozen_atoms.any():
            self.uf.freeze(heads)
        else:
            for i, atom in enumerate(atoms.tolist()):
                self.derived[atom] = (int(heads[i // inner]),)
        return [(heads,)] + [self.opaque(s) for s in sizes[1:]]

    def unite_layouts(self, a: Layout, b: Layout) -> None:
        for x, y in zip(a, b):
            if _size(x) == _size(y):
                self.unite(x, y)

    def channel_dim(self, t: TensorMeta, d: int) -> Dim:
        """A parameter dim that ops treat as a channel: make sure it has atoms, mark producer."""
        return self.layout(t)[d]

    # ---- run -------------------------------------------------------------------------------
    def run(self) -> None:
        for t in self.tr.inputs:
            self.layouts[t.id] = self.opaque_layout(t.shape)
        mha_calls = {c.first_op: c for c in self.tr.module_calls if c.name in self.mha and c.last_op >= c.first_op}
        if mha_calls:
            self.last_use: dict[int, int] = {}
            for op in self.tr.ops:
                for t in op.tensor_args():
                    self.last_use[t.id] = op.index
            self.output_ids = {t.id for t in self.tr.outputs}
        skip = -1
        for op in self.tr.ops:
            if op.index <= skip:
                continue
            if self.ignore and any(fnmatch.fnmatch(op.module, p) or op.module.startswith(p + ".") for p in self.ignore):
                self.opaque_op(op)
                continue
            call = mha_calls.get(op.index)
            if call is not None:
                if self.mha[call.name].get("kind") == "rnn":
                    self.rnn_call(call)
                else:
                    self.attention_call(call)
                skip = call.last_op
                continue
            rule = _RULES.get(op.packet)
            if rule is None:
                if _pointwise(op.func):
                    rule = _elementwise
                elif not any(o.is_floating for o in op.outputs) and op.outputs:
                    rule = _frozen_op
                else:
                    rule = _unknown
            rule(self, op)
        for t in self.tr.outputs:
            self.freeze(t)
        self.module_constraints()
        # parameters never seen by a channel rule stay whole
        for name in list(self.param_atoms):
            self.param_atoms[name] = [a if (a is not None and len(a) > 0) else None for a in self.param_atoms[name]]

    def resolve_drivers(self) -> dict[int, tuple[int, ...]]:
        """Derived class root -> the independent, prunable class roots that remove it."""
        find = self.uf.find
        direct: dict[int, set[int]] = {}
        for atom, drv in self.derived.items():
            r = find(atom)
            if r != _FROZEN:
                direct.setdefault(r, set()).update(find(d) for d in drv)
        memo: dict[int, set[int]] = {}

        def final(r: int, stack: tuple[int, ...]) -> set[int]:
            if r == _FROZEN:
                return set()
            if r not in direct:
                return {r}
            if r in memo:
                return memo[r]
            if r in stack:  # a cycle: nothing independent drives it
                return set()
            out: set[int] = set()
            for d in direct[r]:
                out |= final(d, (*stack, r))
            memo[r] = out
            return out

        return {r: tuple(sorted(final(r, ()))) for r in direct}

    def _call_parts(self, call: Any) -> tuple[str, list[OpNode], set[int], list[TensorMeta]]:
        """A module call handled as a whole: its parameter prefix, its ops, the ids they produce,
        and the float tensors it reads from outside (inputs, states; not its own parameters)."""
        prefix = call.name + "." if call.name else ""
        ops = self.tr.ops[call.first_op : call.last_op + 1]
        inside = {o.id for op in ops for o in op.outputs}
        own = {meta.id for n, meta in self.tr.params.items() if n.startswith(prefix)}
        seen: set[int] = set()
        ext: list[TensorMeta] = []
        for op in ops:
            for t in op.tensor_args():
                if t.id in inside or t.id in own or t.id in seen or not t.is_floating:
                    continue
                seen.add(t.id)
                ext.append(t)
        return prefix, ops, inside, ext

    def attention_call(self, call: Any) -> None:
        """One ``nn.MultiheadAttention`` call as a whole: heads are channels (Q/K/V rows of a head,
        the out-projection columns reading it), the input widths are the projections' columns, the
        output width the out-projection's rows. Its internals (batch x heads merged in one dim) are
        not analysed op by op; surgery keeps the module valid for any widths (``graph._mha``)."""
        info = self.mha[call.name]
        prefix, ops, inside, ext = self._call_parts(call)
        qkv = [t for t in ext if len(t.shape) in (2, 3)][:3]
        if not qkv:
            return self._opaque_call(ops, inside)
        heads = self.mha_heads.get(call.name)
        hd = int(info["head_dim"])
        if heads is None:
            heads = self.mha_heads[call.name] = self.uf.new(int(info["num_heads"]))
            for h in heads.tolist():
                self.head_dims[h] = hd
        per_head = np.repeat(heads, hd)
        q, k, v = qkv[0], qkv[min(1, len(qkv) - 1)], qkv[-1]  # key is value when two are distinct
        params = self.tr.params
        if prefix + "in_proj_weight" in params:
            w = params[prefix + "in_proj_weight"]
            wl = self.layout(w)
            self.uf.union_arrays(wl[0][0], np.tile(per_head, 3))
            for x in {t.id: t for t in (q, k, v)}.values():
                self.unite(self.layout(x)[-1], wl[1])
            self.producers.append((w.param, 0))
        else:
            for part, x in (("q", q), ("k", k), ("v", v)):
                w = params[f"{prefix}{part}_proj_weight"]
                wl = self.layout(w)
                self.uf.union_arrays(wl[0][0], per_head)
                self.unite(self.layout(x)[-1], wl[1])
                self.producers.append((w.param, 0))
        if prefix + "in_proj_bias" in params:
            self.uf.union_arrays(self.layout(params[prefix + "in_proj_bias"])[0][0], np.tile(per_head, 3))
        ow = params[prefix + "out_proj.weight"]
        ol = self.layout(ow)
        self.uf.union_arrays(ol[1][0], per_head)
        if prefix + "out_proj.bias" in params:
            self.unite(self.layout(params[prefix + "out_proj.bias"])[0], ol[0])
        self.producers.append((ow.param, 0))
        width = len(ol[0][0])
        for op in ops:
            for o in op.outputs:
                if self.last_use.get(o.id, -1) <= call.last_op and o.id not in self.output_ids:
                    continue
                if len(o.shape) == len(q.shape) and o.shape[-1] == width:
                    self.layouts[o.id] = (*self.opaque_layout(o.shape[:-1]), ol[0])
                else:
                    self.layouts[o.id] = self.opaque_layout(o.shape)

    def rnn_call(self, call: Any) -> None:
        """One ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` call as a whole. Its hidden channels are one
        space shared by every layer and direction (so ``h_n`` stays one tensor of equal widths):
        channel ``j`` is row ``j`` of every gate block of ``weight_ih`` / ``weight_hh`` / biases,
        column ``j`` of ``weight_hh`` and of the next layer's ``weight_ih`` (once per direction).
        The input features are ``weight_ih_l0``'s columns."""
        info = self.mha[call.name]
        prefix, ops, inside, ext = self._call_parts(call)
        hidden, gates, layers, dirs = int(info["hidden_size"]), int(info["gates"]), int(info["num_layers"]), int(info["dirs"])
        params = self.tr.params
        if not ext or any(f"{prefix}weight_ih_l{k}{sfx}" not in params for k in range(layers)
                          for sfx in ("", "_reverse")[:dirs]):
            return self._opaque_call(ops, inside)
        hid = self.mha_heads.get(call.name)
        if hid is None:
            hid = self.mha_heads[call.name] = self.uf.new(hidden)
        x = ext[0]
        for k in range(layers):
            for sfx in ("", "_reverse")[:dirs]:
                w_ih = params[f"{prefix}weight_ih_l{k}{sfx}"]
                w_hh = params[f"{prefix}weight_hh_l{k}{sfx}"]
                li, lh = self.layout(w_ih), self.layout(w_hh)
                self.uf.union_arrays(li[0][0], np.tile(hid, gates))
                self.uf.union_arrays(lh[0][0], np.tile(hid, gates))
                self.uf.union_arrays(lh[1][0], hid)
                if k == 0:
                    self.unite(self.layout(x)[-1], li[1])
                else:
                    self.uf.union_arrays(li[1][0], np.tile(hid, dirs))
                for b in (f"{prefix}bias_ih_l{k}{sfx}", f"{prefix}bias_hh_l{k}{sfx}"):
                    if b in params:
                        self.uf.union_arrays(self.layout(params[b])[0][0], np.tile(hid, gates))
                self.producers.append((w_ih.param, 0))
        for t in ext[1:]:  # initial states given by the caller: (layers * dirs, batch, hidden)
            if len(t.shape) >= 1 and t.shape[-1] == hidden:
                self.uf.union_arrays(_atoms(self.layout(t)[-1]), hid)
            else:
                self.freeze(t)
        for op in ops:
            for o in op.outputs:
                if self.last_use.get(o.id, -1) <= call.last_op and o.id not in self.output_ids:
                    continue
                if len(o.shape) >= 2 and o.shape[-1] == hidden * dirs:
                    self.layouts[o.id] = (*self.opaque_layout(o.shape[:-1]), (np.tile(hid, dirs),))
                elif len(o.shape) >= 2 and o.shape[-1] == hidden:
                    self.layouts[o.id] = (*self.opaque_layout(o.shape[:-1]), (hid.copy(),))
                else:
                    self.layouts[o.id] = self.opaque_layout(o.shape)

    def _opaque_call(self, ops: list[OpNode], inside: set[int]) -> None:
        for op in ops:
            self.opaque_op(op)

    def module_constraints(self) -> None:
        # Attention modules not handled as a whole (bias_k, add_zero_attn, subclasses): PyTorch
        # checks query width == embed_dim == the projections' widths: keep everything they own whole.
        for mod, typ in self.tr.module_types.items():
            if typ == "MultiheadAttention" and mod not in self.mha:
                for name, atoms in self.param_atoms.items():
                    if name.startswith(mod + ".") if mod else True:
                        for d in atoms:
                            if d is not None:
                                self.uf.freeze(d)

    def opaque_op(self, op: OpNode) -> None:
        for t in op.tensor_args():
            self.freeze(t)
        for o in op.outputs:
            self.layouts[o.id] = self.opaque_layout(o.shape)


def _is_frozen(d: Dim) -> bool:
    return all(not f.any() for f in d)


# ---- rules ---------------------------------------------------------------------------------
def _ins(op: OpNode) -> list[TensorMeta]:
    return op.tensor_args()


def _same(a: _Analyser, op: OpNode) -> None:
    x = next((t for t in op.args if isinstance(t, TensorMeta)), None)
    if x is None:
        return _frozen_op(a, op)
    lay = a.layout(x)
    for o in op.outputs:
        a.set(o, lay if o.shape == x.shape else a.opaque_layout(o.shape))


def _frozen_op(a: _Analyser, op: OpNode) -> None:
    for o in op.outputs:
        a.layouts[o.id] = a.opaque_layout(o.shape)


def _unknown(a: _Analyser, op: OpNode) -> None:
    live = [t for t in _ins(op) if t.is_floating and any(not _is_frozen(d) for d in a.layout(t))]
    if live:
        raise UnsupportedOpError(
            f"no channel rule for {op.name} in module '{op.module or '(top)'}' "
            f"({a.tr.module_types.get(op.module, '?')}); mark that module ignored "
            f"(ignore=[{op.module!r}]) to leave its channels untouched"
        )
    _frozen_op(a, op)


def _elementwise(a: _Analyser, op: OpNode) -> None:
    out = op.outputs[0] if op.outputs else None
    if out is None:
        return
    n = len(out.shape)
    dims: list[Dim | None] = [None] * n
    for t in _ins(op):
        lay = a.layout(t)
        off = n - len(t.shape)
        if off < 0:
            continue
        for i, d in enumerate(lay):
            if t.shape[i] == 1 and out.shape[off + i] != 1:
                a.freeze_dim(d)  # broadcast: one index serves them all, it cannot be removed
                continue
            cur = dims[off + i]
            dims[off + i] = d if cur is None else a.unite(cur, d)
    lay = tuple(d if d is not None else a.opaque(out.shape[i]) for i, d in enumerate(dims))
    for o in op.outputs:
        a.set(o, lay if o.shape == out.shape else a.opaque_layout(o.shape))


def _conv(a: _Analyser, op: OpNode) -> None:
    x, w = op.args[0], op.args[1]
    bias = op.args[2] if len(op.args) > 2 and isinstance(op.args[2], TensorMeta) else None
    transposed = bool(op.args[6]) if len(op.args) > 6 else False
    groups = int(op.args[8]) if len(op.args) > 8 else 1
    xl, wl = a.layout(x), a.layout(w)
    for d in wl[2:]:
        a.freeze_dim(d)
    out_dim = 1 if transposed else 0
    in_dim = 0 if transposed else 1
    cin = x.shape[1]
    if groups == 1:
        a.unite(xl[1], wl[in_dim])
    elif not transposed and w.shape[1] == 1 and w.shape[0] == cin == groups:  # depthwise
        a.unite(xl[1], wl[0])
    elif not transposed and len(xl[1]) == 1 and len(wl[0]) == 1 and len(wl[1]) == 1:
        # grouped: every group must keep the same count, so position r of each group is one
        # channel (pruning it removes that position from all groups; ``groups`` stays)
        k, m = w.shape[1], w.shape[0] // groups
        xa, wo = xl[1][0].reshape(groups, k), wl[0][0].reshape(groups, m)
        for j in range(groups):
            a.uf.union_arrays(xa[j], wl[1][0])
            if j:
                a.uf.union_arrays(wo[j], wo[0])
    else:  # grouped with structured (product) dims: counts per group could not be kept equal
        a.freeze_dim(xl[1])
        a.freeze_dim(wl[0])
        a.freeze_dim(wl[1])
    if bias is not None:
        a.unite(a.layout(bias)[0], wl[out_dim])
    if w.param:
        a.producers.append((w.param, out_dim))
    out = op.outputs[0]
    a.set(out, (xl[0], wl[out_dim], *(a.opaque(s) for s in out.shape[2:])))


def _mm(a: _Analyser, op: OpNode, offset: int = 0) -> None:
    m1, m2 = op.args[offset], op.args[offset + 1]
    l1, l2 = a.layout(m1), a.layout(m2)
    a.unite(l1[1], l2[0])
    _mark_weight_producer(a, m2)
    out = op.outputs[0]
    lay = (l1[0], l2[1])
    if offset:  # addmm: bias broadcast over rows
        bias = op.args[0]
        bl = a.layout(bias)
        if len(bias.shape) == 1 and bias.shape[0] == out.shape[1]:
            lay = (l1[0], a.unite(l2[1], bl[0]))
        elif len(bias.shape) == 2 and bias.shape == out.shape:
            lay = (a.unite(l1[0], bl[0]), a.unite(l2[1], bl[1]))
    a.set(out, lay)


def _mark_weight_producer(a: _Analyser, m2: TensorMeta) -> None:
    # weight.t() is a view of a parameter: record the parameter's output rows as a producer
    op_index = m2.producer
    if op_index is not None:
        src = a.tr.ops[op_index]
        if src.packet in ("t", "transpose", "permute") and src.args and isinstance(src.args[0], TensorMeta):
            base = src.args[0]
            if base.param and len(base.shape) == 2:
                a.producers.append((base.param, 0))
    elif m2.param and len(m2.shape) == 2:
        a.producers.append((m2.param, 1))


def _addmm(a: _Analyser, op: OpNode) -> None:
    _mm(a, op, offset=1)


def _bmm(a: _Analyser, op: OpNode, offset: int = 0) -> None:
    b1, b2 = op.args[offset], op.args[offset + 1]
    l1, l2 = a.layout(b1), a.layout(b2)
    batch = a.unite(l1[0], l2[0])
    a.unite(l1[2], l2[1])
    a.set(op.outputs[0], (batch, l1[1], l2[2]))


def _baddbmm(a: _Analyser, op: OpNode) -> None:
    _bmm(a, op, offset=1)
    a.unite_layouts(a.layout(op.outputs[0]), a.layout(op.args[0]))


def _linear(a: _Analyser, op: OpNode) -> None:
    x, w = op.args[0], op.args[1]
    bias = op.args[2] if len(op.args) > 2 and isinstance(op.args[2], TensorMeta) else None
    xl, wl = a.layout(x), a.layout(w)
    a.unite(xl[-1], wl[1])
    if bias is not None:
        a.unite(a.layout(bias)[0], wl[0])
    if w.param:
        a.producers.append((w.param, 0))
    a.set(op.outputs[0], (*xl[:-1], wl[0]))


def _norm_channels_first(a: _Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = a.layout(x)
    for t in op.args[1:5]:
        if isinstance(t, TensorMeta) and len(t.shape) == 1 and t.shape[0] == x.shape[1]:
            a.unite(xl[1], a.layout(t)[0])
    a.set(op.outputs[0], xl)
    for o in op.outputs[1:]:
        a.set(o, (xl[1],) if o.shape == (x.shape[1],) else a.opaque_layout(o.shape))


def _layer_norm(a: _Analyser, op: OpNode) -> None:
    x, shape = op.args[0], list(op.args[1])
    xl = a.layout(x)
    k = len(shape)
    if not any(isinstance(t, TensorMeta) for t in op.args[2:4]):
        for d in xl[len(xl) - k :]:  # no affine weights: normalized_shape cannot follow a pruning
            a.freeze_dim(d)
    for t in op.args[2:4]:
        if isinstance(t, TensorMeta):
            for i, d in enumerate(a.layout(t)):
                a.unite(xl[len(xl) - k + i], d)
    a.set(op.outputs[0], xl)
    for o in op.outputs[1:]:
        a.set(o, a.opaque_layout(o.shape))


def _group_norm(a: _Analyser, op: OpNode) -> None:
    x = op.args[0]
    groups = int(op.args[6]) if len(op.args) > 6 else 1
    xl = a.layout(x)
    channels = x.shape[1]
    if groups not in (1, channels):
        a.freeze_dim(xl[1])
    for t in op.args[1:3]:
        if isinstance(t, TensorMeta):
            a.unite(xl[1], a.layout(t)[0])
    a.set(op.outputs[0], xl)
    for o in op.outputs[1:]:
        a.set(o, a.opaque_layout(o.shape))


def _embedding(a: _Analyser, op: OpNode) -> None:
    w, ids = op.args[0], op.args[1]
    wl = a.layout(w)
    a.freeze_dim(wl[0])
    if w.param:
        a.producers.append((w.param, 1))
    a.set(op.outputs[0], (*a.layout(ids), wl[1]))


def _permute(a: _Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = a.layout(x)
    n = len(xl)
    if op.packet in ("t", "t_"):
        perm = list(range(n))[::-1]
    elif op.packet in ("transpose", "transpose_"):
        d0, d1 = int(op.args[1]) % max(n, 1), int(op.args[2]) % max(n, 1)
        perm = list(range(n))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        perm = [int(p) % n for p in op.args[1]]
    a.set(op.outputs[0], tuple(xl[p] for p in perm))


def _partition(factors: list[np.ndarray], sizes: list[int]) -> list[Dim] | None:
    out: list[Dim] = []
    i = 0
    for s in sizes:
        group: list[np.ndarray] = []
        n = 1
        while n < s and i < len(factors):
            group.append(factors[i])
            n *= len(factors[i])
            i += 1
        if n != s:
            return None
        out.append(tuple(group) if group else None)
    if i != len(factors):
        return None
    return out


def _view(a: _Analyser, op: OpNode) -> None:
    x, out = op.args[0], op.outputs[0]
    xl = a.layout(x)
    src = [(s, d) for s, d in zip(x.shape, xl) if s != 1]
    dst = [(i, s) for i, s in enumerate(out.shape) if s != 1]
    res: list[Dim | None] = [None] * len(out.shape)
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [src[i]] if i < len(src) else [], [dst[j]] if j < len(dst) else []
        i, j = i + len(gi), j + len(gj)
        pi = gi[0][0] if gi else 1
        pj = gj[0][1] if gj else 1
        while pi != pj:
            if pi < pj and i < len(src):
                gi.append(src[i])
                pi *= src[i][0]
                i += 1
            elif pj < pi and j < len(dst):
                gj.append(dst[j])
                pj *= dst[j][1]
                j += 1
            else:
                break
        factors = [f for _, d in gi for f in d if len(f) != 1]
        parts = _partition(factors, [s for _, s in gj])
        if parts is None and len(factors) == 1 and len(gj) > 1 and not _is_frozen((factors[0],)):
            parts = a.split_heads(factors[0], [s for _, s in gj])
        if parts is None:
            for _, d in gi:
                a.freeze_dim(d)
            parts = [a.opaque(s) for _, s in gj]
        for (k, s), p in zip(gj, parts):
            res[k] = p if p is not None else a.opaque(s)
    a.set(out, tuple(d if d is not None else a.opaque(out.shape[k]) for k, d in enumerate(res)))


def _unsqueeze(a: _Analyser, op: OpNode) -> None:
    _view(a, op)


def _expand(a: _Analyser, op: OpNode) -> None:
    x, out = op.args[0], op.outputs[0]
    xl = a.layout(x)
    off = len(out.shape) - len(x.shape)
    lay = [a.opaque(s) for s in out.shape]
    for i, d in enumerate(xl):
        if x.shape[i] == out.shape[off + i]:
            lay[off + i] = d
        else:  # broadcast: one index serves them all, it cannot be removed
            a.freeze_dim(d)
    a.set(out, tuple(lay))


def _select(a: _Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = list(a.layout(x))
    d = int(op.args[1]) % len(xl)
    a.freeze_dim(xl[d])
    del xl[d]
    a.set(op.outputs[0], tuple(xl))


def _slice_dim(a: _Analyser, d: Dim, start: int, end: int, step: int, n: int, *, whole: bool = False) -> Dim:
    start, end, _ = slice(start, end, step).indices(n)
    if start == 0 and end == n and step == 1:
        return d
    if len(d) == 1 and whole:  # one piece of a split that covers the whole dim
        return (d[0][start:end:step],)
    # A partial slice with bounds fixed in the model's code: removing channels before the bound
    # would silently select different ones, so the sliced dim stays whole.
    a.freeze_dim(d)
    return a.opaque(len(range(start, end, step)))


def _slice(a: _Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = list(a.layout(x))
    dim = int(op.args[1]) % len(xl) if len(op.args) > 1 else 0
    start = op.args[2] if len(op.args) > 2 and op.args[2] is not None else 0
    end = op.args[3] if len(op.args) > 3 and op.args[3] is not None else x.shape[dim]
    step = int(op.args[4]) if len(op.args) > 4 else 1
    xl[dim] = _slice_dim(a, xl[dim], int(start), int(min(end, x.shape[dim])), step, x.shape[dim])
    a.set(op.outputs[0], tuple(xl))


def _split(a: _Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = a.layout(x)
    dim = int(op.args[2]) % len(xl) if len(op.args) > 2 else 0
    start = 0
    for o in op.outputs:
        n = o.shape[dim]
        lay = list(xl)
        lay[dim] = _slice_dim(a, xl[dim], start, start + n, 1, x.shape[dim], whole=True)
        a.set(o, tuple(lay))
        start += n


def _unbind(a: _Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = list(a.layout(x))
    dim = int(op.args[1]) % len(xl) if len(op.args) > 1 else 0
    a.freeze_dim(xl[dim])
    del xl[dim]
    for o in op.outputs:
        a.set(o, tuple(xl))


def _cat(a: _Analyser, op: OpNode) -> None:
    tensors = [t for t in op.args[0] if isinstance(t, TensorMeta) and t.numel > 0]
    out = op.outputs[0]
    dim = int(op.args[1]) % len(out.shape) if len(op.args) > 1 else 0
    lays = [a.layout(t) for t in tensors]
    res: list[Dim] = []
    for k in range(len(out.shape)):
        if k == dim:
            parts = [lay[k] for lay in lays]
            if all(len(p) == 1 for p in parts):
                res.append((np.concatenate([p[0] for p in parts]),))
            else:
                for p in parts:
                    a.freeze_dim(p)
                res.append(a.opaque(out.shape[k]))
        else:
            d = lays[0][k]
            for lay in lays[1:]:
                d = a.unite(d, lay[k])
            res.append(d)
    a.set(out, tuple(res))


def _stack(a: _Analyser, op: OpNode) -> None:
    tensors = [t for t in op.args[0] if isinstance(t, TensorMeta)]
    out = op.outputs[0]
    dim = int(op.args[1]) % len(out.shape) if len(op.args) > 1 else 0
    lays = [a.layout(t) for t in tensors]
    base = list(lays[0])
    for lay in lays[1:]:
        base = [a.unite(x, y) for x, y in zip(base, lay)]
    base.insert(dim, a.opaque(out.shape[dim]))
    a.set(out, tuple(base))


def _reduce(a: _Analyser, op: OpNode) -> None:
    x, out = op.args[0], op.outputs[0]
    xl = a.layout(x)
    # the reduced dims: argument 1 (sum, mean, amax, var...), argument 2 for linalg_vector_norm
    # (x, ord, dim, keepdim), or a keyword
    pos = 2 if op.packet == "linalg_vector_norm" else 1
    dims = op.args[pos] if len(op.args) > pos else op.kwargs.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    if not dims or not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        for d in xl:
            a.freeze_dim(d)
        return _frozen_op(a, op)
    red = {int(d) % len(xl) for d in dims}
    for d in red:
        a.freeze_dim(xl[d])
    keep = [d for i, d in enumerate(xl) if i not in red]
    if len(keep) == len(out.shape):
        lay = tuple(keep)
    else:
        lay = tuple(a.opaque(1) if i in red else d for i, d in enumerate(xl))
    for o in op.outputs:
        a.set(o, lay)


def _pool(a: _Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = a.layout(x)
    for o in op.outputs:
        lead = len(o.shape) - (len(x.shape) - 2) if len(x.shape) >= 3 else len(o.shape)
        a.set(o, tuple(xl[i] if i < 2 and i < lead else a.opaque(s) for i, s in enumerate(o.shape)))


def _sdpa(a: _Analyser, op: OpNode) -> None:
    q, k, v = op.args[0], op.args[1], op.args[2]
    ql, kl, vl = a.layout(q), a.layout(k), a.layout(v)
    lead = []
    for x, y, z, qs, ks in zip(ql[:-2], kl[:-2], vl[:-2], q.shape[:-2], k.shape[:-2]):
        kv = a.unite(y, z)
        if qs != ks and ks and qs % ks == 0 and len(x) == 1 and len(kv) == 1:
            # grouped-query attention: query head i uses key/value head i // (qs // ks), so
            # removing a key/value head removes its whole group of query heads
            a.derive(x[0], (kv[0], a.opaque(qs // ks)[0]))
            lead.append(x)
        else:
            lead.append(a.unite(x, kv))
    a.unite(ql[-1], kl[-1])
    a.unite(kl[-2], vl[-2])
    a.set(op.outputs[0], (*lead, ql[-2], vl[-1]))
    for o in op.outputs[1:]:
        a.set(o, a.opaque_layout(o.shape))


def _pad(a: _Analyser, op: OpNode) -> None:
    x, pads = op.args[0], list(op.args[1])
    xl = list(a.layout(x))
    for i in range(len(pads) // 2):
        d = len(xl) - 1 - i
        if pads[2 * i] or pads[2 * i + 1]:
            a.freeze_dim(xl[d])
            xl[d] = None
    out = op.outputs[0]
    a.set(out, tuple(d if d is not None else a.opaque(out.shape[i]) for i, d in enumerate(xl)))


def _index_select(a: _Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = list(a.layout(x))
    dim = int(op.args[1]) % len(xl)
    a.freeze_dim(xl[dim])
    out = op.outputs[0]
    xl[dim] = a.opaque(out.shape[dim])
    a.set(out, tuple(xl))


def _freeze_all(a: _Analyser, op: OpNode) -> None:
    a.opaque_op(op)


def _index(a: _Analyser, op: OpNode) -> None:
    """``x[..., idx, ...]`` with one index tensor (e.g. Swin's relative-position table
    ``table[index]``): the indexed dim's positions are picked by data, so it is frozen; the other
    dims keep their channels. Several index tensors: everything frozen."""
    x, indices = op.args[0], op.args[1] if len(op.args) > 1 else None
    if not isinstance(x, TensorMeta) or not isinstance(indices, (list, tuple)):
        return _freeze_all(a, op)
    given = [i for i, t in enumerate(indices) if t is not None]
    out = op.outputs[0]
    if len(given) != 1 or not isinstance(indices[given[0]], TensorMeta):
        return _freeze_all(a, op)
    k, idx = given[0], indices[given[0]]
    xl = list(a.layout(x))
    a.freeze_dim(xl[k])
    lay = (*xl[:k], *(a.opaque(n) for n in idx.shape), *xl[k + 1 :])
    a.set(out, lay if len(lay) == len(out.shape) else a.opaque_layout(out.shape))


def _along_dim_same(a: _Analyser, op: OpNode) -> None:
    # softmax/cumsum/roll/flip along one dim: that dim's indices interact, so it is frozen
    x = op.args[0]
    xl = a.layout(x)
    dim = op.args[1] if len(op.args) > 1 else -1
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    if op.packet in ("roll",):
        dims = op.args[2] if len(op.args) > 2 else list(range(len(xl)))
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
    for d in dims:
        if isinstance(d, int) and xl:
            a.freeze_dim(xl[d % len(xl)])
    for o in op.outputs:
        a.set(o, xl if o.shape == x.shape else a.opaque_layout(o.shape))


_RULES: dict[str, Any] = {
    "convolution": _conv,
    "_convolution": _conv,
    "mm": _mm,
    "addmm": _addmm,
    "_addmm_activation": _addmm,
    "bmm": _bmm,
    "baddbmm": _baddbmm,
    "linear": _linear,
    "native_batch_norm": _norm_channels_first,
    "_native_batch_norm_legit": _norm_channels_first,
    "_native_batch_norm_legit_no_training": _norm_channels_first,
    "native_layer_norm": _layer_norm,
    "native_group_norm": _group_norm,
    "embedding": _embedding,
    "t": _permute,
    "t_": _permute,
    "transpose": _permute,
    "transpose_": _permute,
    "permute": _permute,
    "view": _view,
    "_unsafe_view": _view,
    "reshape": _view,
    "_reshape_alias": _view,
    "unsqueeze": _unsqueeze,
    "unsqueeze_": _unsqueeze,
    "squeeze": _unsqueeze,
    "squeeze_": _unsqueeze,
    "expand": _expand,
    "select": _select,
    "slice": _slice,
    "split": _split,
    "split_with_sizes": _split,
    "unbind": _unbind,
    "cat": _cat,
    "stack": _stack,
    "mean": _reduce,
    "sum": _reduce,
    "amax": _reduce,
    "amin": _reduce,
    "var": _reduce,
    "linalg_vector_norm": _reduce,
    "max_pool1d": _pool,
    "max_pool2d": _pool,
    "max_pool3d": _pool,
    "max_pool2d_with_indices": _pool,
    "max_pool3d_with_indices": _pool,
    "avg_pool1d": _pool,
    "avg_pool2d": _pool,
    "avg_pool3d": _pool,
    "_adaptive_avg_pool2d": _pool,
    "_adaptive_avg_pool3d": _pool,
    "adaptive_avg_pool1d": _pool,
    "adaptive_max_pool2d": _pool,
    "upsample_nearest2d": _pool,
    "upsample_bilinear2d": _pool,
    "_upsample_nearest_exact2d": _pool,
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa,
    "_scaled_dot_product_flash_attention": _sdpa,
    "_scaled_dot_product_efficient_attention": _sdpa,
    "_scaled_dot_product_cudnn_attention": _sdpa,
    "constant_pad_nd": _pad,
    "index_select": _index_select,
    "_softmax": _along_dim_same,
    "_log_softmax": _along_dim_same,
    "_safe_softmax": _along_dim_same,
    "cumsum": _along_dim_same,
    "roll": _along_dim_same,
    "flip": _along_dim_same,
    "clone": _same,
    "_to_copy": _same,
    "contiguous": _same,
    "alias": _same,
    "detach": _same,
    "lift_fresh": _same,
    "native_dropout": _same,
    "dropout": _same,
    "fill_": _same,
    "zero_": _same,
    "copy_": _elementwise,
    "where": _elementwise,
    "masked_fill": _elementwise,
    "masked_fill_": _elementwise,
    "lstm": _freeze_all,
    "gru": _freeze_all,
    "rnn_tanh": _freeze_all,
    "rnn_relu": _freeze_all,
    "mkldnn_rnn_layer": _freeze_all,
    "_cudnn_rnn": _freeze_all,
    "index": _index,
    "gather": _freeze_all,
    "as_strided": _freeze_all,
    "as_strided_": _freeze_all,
    "channel_shuffle": _freeze_all,
    "native_channel_shuffle": _freeze_all,
    "pixel_shuffle": _freeze_all,
    "pixel_unshuffle": _freeze_all,
    "im2col": _freeze_all,
    "col2im": _freeze_all,
    "unfold": _freeze_all,
    "topk": _freeze_all,
    "sort": _freeze_all,
    "_native_multi_head_attention": _freeze_all,
    "_transformer_encoder_layer_fwd": _freeze_all,
    "scalar_tensor": _frozen_op,
    "empty": _frozen_op,
    "zeros": _frozen_op,
    "ones": _frozen_op,
    "full": _frozen_op,
    "arange": _frozen_op,
    "new_zeros": _frozen_op,
    "new_ones": _frozen_op,
    "new_empty": _frozen_op,
    "new_full": _frozen_op,
    "empty_like": _frozen_op,
    "zeros_like": _frozen_op,
    "ones_like": _frozen_op,
    "randn": _frozen_op,
    "rand": _frozen_op,
}


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of the graph on ``range(n)`` with edges ``u[i] -- v[i]``: a label per
    node (the smallest node of its component), by min-label propagation with pointer jumping."""
    labels = np.arange(n, dtype=np.int64)
    if len(u) == 0:
        return labels
    while True:
        m = np.minimum(labels[u], labels[v])
        before = labels.copy()
        np.minimum.at(labels, u, m)
        np.minimum.at(labels, v, m)
        while True:  # pointer jumping: every node straight to its current label's label
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels, before):
            return labels


def _build_groups(a: _Analyser, drivers: dict[int, tuple[int, ...]]) -> list[ChannelGroup]:
    """Group the channels (union-find roots) that must be pruned together, vectorised: one root
    array for all atoms, then components of "created by the same producer dim" edges."""
    root = a.uf.root_array()
    n = len(root)
    if drivers:
        drv = np.arange(n, dtype=np.int64)
        for x, t in drivers.items():
            drv[x] = t[0] if t else _FROZEN
        root = drv[root]
    roots_of: dict[str, list[np.ndarray | None]] = {
        name: [None if d is None else root[d] for d in dims] for name, dims in a.param_atoms.items()
    }
    # sort keys of every channel: (rank, index) -- the producer that creates it first and its
    # position there; channels no producer creates come after, ordered by (param name, dim)
    unset = 1 << 40
    krank = np.full(n, unset, dtype=np.int64)
    kidx = np.zeros(n, dtype=np.int64)
    eu: list[np.ndarray] = []
    ev: list[np.ndarray] = []

    def claim(live: np.ndarray, rank: int) -> None:
        first, pos = np.unique(live, return_index=True)
        new = krank[first] == unset
        krank[first[new]] = rank
        kidx[first[new]] = pos[new]

    producers = list(dict.fromkeys(a.producers))
    prod_set = set(producers)
    for rank, (name, d) in enumerate(producers):
        rs = roots_of.get(name, [None] * (d + 1))
        if d >= len(rs) or rs[d] is None:
            continue
        live = rs[d][rs[d] != _FROZEN]
        if len(live) == 0:
            continue
        claim(live, rank)
        eu.append(np.full(len(live), live[0]))
        ev.append(live)
    fallback = sorted({(name, d) for name, rs in roots_of.items() for d, r in enumerate(rs) if r is not None})
    fallback_rank = {key: len(producers) + 1 + i for i, key in enumerate(fallback)}
    dims_list = [(name, d, r) for name, rs in roots_of.items() for d, r in enumerate(rs) if r is not None and len(r)]
    seen = [r for _, _, r in dims_list]
    if dims_list:  # channels no producer creates: group by co-occurrence, dim by dim in order
        owner = np.repeat(np.arange(len(dims_list), dtype=np.int64), [len(r) for r in seen])
        flat = np.concatenate(seen)
        for i in np.unique(owner[(flat != _FROZEN) & (krank[flat] == unset)]).tolist():
            name, d, r = dims_list[i]
            live = r[(r != _FROZEN) & (krank[r] == unset)]  # earlier dims may have claimed some
            if len(live) == 0:
                continue
            claim(live, fallback_rank[(name, d)])
            eu.append(np.full(len(live), live[0]))
            ev.append(live)
    labels = _components(n, np.concatenate(eu) if eu else np.zeros(0, np.int64), np.concatenate(ev) if ev else np.zeros(0, np.int64))
    members: dict[int, set[tuple[str, int]]] = defaultdict(set)
    if dims_list:  # which groups each bound dim touches: one unique over (dim, group) pairs
        live = flat != _FROZEN
        pairs = np.unique(owner[live] * n + labels[flat[live]])
        for i, g in zip((pairs // n).tolist(), (pairs % n).tolist()):
            members[g].add((dims_list[i][0], dims_list[i][1]))
    chans = np.unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)
    chans = chans[chans != _FROZEN]
    out = []
    if len(chans):
        key_rank = np.where(krank[chans] == unset, 1 << 41, krank[chans])
        key_idx = np.where(krank[chans] == unset, chans, kidx[chans])
        by = np.lexsort((chans, key_idx, key_rank, labels[chans]))  # by group, then channel order
        chans, glab = chans[by], labels[chans[by]]
        cuts = np.flatnonzero(np.diff(glab)) + 1
        for cs in np.split(chans, cuts):
            g = int(labels[cs[0]])
            mem = sorted(members[g])
            prods = [m for m in mem if m in prod_set]
            mods = sorted({nm.rsplit(".", 1)[0] if "." in nm else "" for nm, _ in mem})
            out.append(ChannelGroup(0, cs.tolist(), mem, prods, mods))

    def first_key(grp: ChannelGroup) -> tuple[int, int]:  # groups no producer creates tie on rank
        c = grp.channels[0]
        return (min(int(krank[c]), len(producers) + 1), c)

    out.sort(key=first_key)
    for i, grp in enumerate(out):
        grp.id = i
    return out


def _attention_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``nn.MultiheadAttention`` modules whose heads and widths can be pruned (no bias_k, no zero attn)."""
    from torchslim.graph._mha import SlicedMultiheadAttention

    out: dict[str, dict[str, Any]] = {}
    gates = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
    for name, m in model.named_modules():
        if type(m) in (nn.MultiheadAttention, SlicedMultiheadAttention) and m.bias_k is None and not m.add_zero_attn:
            out[name] = {"num_heads": m.num_heads, "head_dim": m.head_dim}
        elif type(m) in (nn.LSTM, nn.GRU, nn.RNN) and getattr(m, "proj_size", 0) == 0:
            out[name] = {"kind": "rnn", "hidden_size": m.hidden_size, "gates": gates[m.mode], "num_layers": m.num_layers,
                         "dirs": 2 if m.bidirectional else 1}
    return out


@contextmanager
def params_on_meta(model: nn.Module) -> Iterator[None]:
    """Inside the block, every parameter and buffer of ``model`` is a ``meta`` tensor of the same
    shape (tied tensors stay tied); the originals are put back on exit, whatever happens. Cheaper
    than :func:`meta_copy` (no deep copy), for a trace that runs the model once."""
    memo: dict[int, torch.Tensor] = {}
    saved: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        for mod in model.modules():
            for table in (mod._parameters, mod._buffers):
                for k, t in list(table.items()):
                    if t is None:
                        continue
                    m = memo.get(id(t))
                    if m is None:
                        mt = t.detach().to("meta")
                        m = memo[id(t)] = nn.Parameter(mt, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else mt
                    saved.append((table, k, t))
                    table[k] = m
        yield
    finally:
        for table, k, t in reversed(saved):
            table[k] = t


def meta_copy(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose parameters and buffers live on the ``meta`` device (no data copied).

    Returns None when the model cannot be copied (e.g. it holds un-copyable state).
    """
    import copy

    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        if id(t) in memo:
            continue
        m = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001
        return None


def to_meta(example_inputs: Any) -> Any:
    """The same inputs as meta tensors (shapes and dtypes kept)."""
    from torchslim.graph.inputs import as_inputs

    return as_inputs(example_inputs).to("meta")


def analyse(model: nn.Module, example_inputs: Any, *, ignore: tuple[str, ...] | list[str] = ()) -> ChannelGroups:
    """Trace ``model`` (eval mode, autograd on, so no fused kernels hide structure) and find its groups.

    Args:
        model: any module that runs eagerly; not modified (its mode is restored).
        example_inputs: a tensor, tuple or dict of inputs.
        ignore: module names or globs whose ops are not analysed; their channels stay whole.

    Raises:
        UnsupportedOpError: an op with no channel rule touches prunable channels; the message
            names the op and the module.
    """
    from torchslim._utils import evaluating
    from torchslim.graph._swin import sliced_swin

    start = time.perf_counter()
    tr = None
    used_meta = False
    try:  # shapes only: no arithmetic, no memory for activations, no copy of the model
        with params_on_meta(model), evaluating(model), sliced_swin(model):
            tr = trace(model, to_meta(example_inputs), grad=True)
        used_meta = True
    except Exception:  # noqa: BLE001 - data-dependent models need the real forward
        tr = None
    if tr is None:
        # Swin window attention is traced with the forward surgery gives it (graph._swin)
        with evaluating(model), sliced_swin(model):
            tr = trace(model, example_inputs, grad=True)
    a = _Analyser(tr, tuple(ignore), _attention_modules(model))
    a.run()
    drivers = a.resolve_drivers()
    grps = _build_groups(a, drivers)
    head_dims = {a.uf.find(h): d for h, d in a.head_dims.items()}
    for g in grps:
        g.head_dim = head_dims.get(g.channels[0]) if g.channels else None
    frozen = [n for n, dims in a.param_atoms.items() if all(d is None or not a.uf.roots(d).any() for d in dims)]
    return ChannelGroups(grps, tr, a.param_atoms, a.uf, frozen, time.perf_counter() - start, drivers,
                         meta_ok=used_meta)


def groups(model: nn.Module, example_inputs: Any = None, *, ignore: tuple[str, ...] | list[str] = ()) -> ChannelGroups:
    """The coupled channel groups of ``model``: ``print(ts.graph.groups(m, x))`` lists them.

    Example:
        >>> import torch, torchslim as ts
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> g = ts.graph.groups(m, torch.randn(1, 4))
        >>> [(grp.size, grp.producers) for grp in g]
        [(8, [('0.weight', 0)])]
    """
    if example_inputs is None:
        from torchslim.zoo.spec import example_inputs as remembered

        example_inputs = remembered(model)
    return analyse(model, example_inputs, ignore=ignore)
