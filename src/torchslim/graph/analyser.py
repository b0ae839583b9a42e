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

This module holds the state of one analysis (:class:`Analyser`: a *layout* per traced tensor,
the union-find, the producers) and the algebra the op rules use on it (``unite``, ``derive``,
``split_heads``, ``freeze``). The rules themselves live in ``rules_*.py``, the loop that applies
them to a trace in :mod:`torchslim.graph.rules`, and the grouping of the resulting channels in
:mod:`torchslim.graph.build`.

A layout is one *dim* per tensor dimension; a dim is a row-major product of *factors*; a factor
is an array of atoms, one per index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from torchslim.graph.tracer import OpNode, TensorMeta, Trace
from torchslim.graph.unionfind import FROZEN, UnionFind

__all__ = ["Analyser", "Dim", "Factor", "Layout", "Rule", "dim_atoms", "dim_size", "is_frozen"]

Factor = np.ndarray  # atom ids, one per index
Dim = tuple  # tuple[Factor, ...]: row-major product of factors
Layout = tuple  # tuple[Dim, ...]: one per tensor dimension


def dim_size(dim: Dim) -> int:
    """Number of indices of a dim (the product of its factors' lengths)."""
    n = 1
    for f in dim:
        n *= len(f)
    return n


def dim_atoms(dim: Dim) -> np.ndarray:
    """The atoms of a dim, its factors concatenated."""
    return np.concatenate(dim) if len(dim) > 1 else dim[0]


def is_frozen(d: Dim) -> bool:
    """Whether every atom of the dim is the frozen atom (a dim no op made a channel)."""
    return all(not f.any() for f in d)


class Analyser:
    """The state of one channel analysis of a trace, and the operations the op rules apply to it."""

    def __init__(self, tr: Trace, ignore: tuple[str, ...], mha: dict[str, dict[str, Any]] | None = None) -> None:
        self.tr = tr
        self.mha = mha or {}  # attention modules handled as a whole: name -> num_heads, head_dim
        self.mha_heads: dict[str, np.ndarray] = {}
        self.uf = UnionFind()
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
        # for modules analysed as a whole (rules_modules): which of their tensors are read later
        self.last_use: dict[int, int] = {}  # tensor id -> index of the last op that reads it
        self.output_ids: set[int] = set()  # ids of the model's outputs

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
        if tuple(dim_size(d) for d in lay) != t.shape:
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
        if dim_size(a) != dim_size(b):  # e.g. grouped-query attention: heads broadcast by the kernel
            self.freeze_dim(a)
            self.freeze_dim(b)
            return self.opaque(dim_size(a))
        if len(a) == 1 and is_frozen(b):
            self.freeze_dim(a)
            return b
        if len(b) == 1 and is_frozen(a):
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
        return self.opaque(dim_size(a))

    def derive(self, atoms: np.ndarray, product: Dim) -> None:
        """Index ``i`` of ``atoms`` is the row-major index into ``product``'s factors."""
        grids = np.meshgrid(*product, indexing="ij")
        drivers = np.stack([g.reshape(-1) for g in grids], axis=1)
        for atom, drv in zip(atoms.tolist(), drivers.tolist()):
            if atom == FROZEN:
                continue
            live = tuple(x for x in drv if x != FROZEN)
            if not live:
                self.uf.union(atom, FROZEN)
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
            if (self.uf.roots(atoms) == FROZEN).any():
                self.uf.freeze(heads)
            else:
                for i, atom in enumerate(atoms.tolist()):
                    self.derived[atom] = (int(heads[(i // inner) % n_heads]),)
            return [self.opaque(parts), (heads,), self.opaque(inner)]
        inner = int(np.prod(sizes[1:]))
        heads = self.uf.new(sizes[0])
        for h in heads.tolist():
            self.head_dims[h] = inner
        frozen_atoms = self.uf.roots(atoms) == FROZEN
        if frozen_atoms.any():
            self.uf.freeze(heads)
        else:
            for i, atom in enumerate(atoms.tolist()):
                self.derived[atom] = (int(heads[i // inner]),)
        return [(heads,)] + [self.opaque(s) for s in sizes[1:]]

    def unite_layouts(self, a: Layout, b: Layout) -> None:
        for x, y in zip(a, b):
            if dim_size(x) == dim_size(y):
                self.unite(x, y)

    def opaque_op(self, op: OpNode) -> None:
        """An op whose channels are not followed: its inputs are frozen, its outputs opaque."""
        for t in op.tensor_args():
            self.freeze(t)
        for o in op.outputs:
            self.layouts[o.id] = self.opaque_layout(o.shape)

    # ---- after the run ---------------------------------------------------------------------
    def resolve_drivers(self) -> dict[int, tuple[int, ...]]:
        """Derived class root -> the independent, prunable class roots that remove it."""
        find = self.uf.find
        direct: dict[int, set[int]] = {}
        for atom, drv in self.derived.items():
            r = find(atom)
            if r != FROZEN:
                direct.setdefault(r, set()).update(find(d) for d in drv)
        memo: dict[int, set[int]] = {}

        def final(r: int, stack: tuple[int, ...]) -> set[int]:
            if r == FROZEN:
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


# An op rule: reads the layouts of the op's inputs, unites/freezes/derives atoms, sets its outputs'.
Rule = Callable[[Analyser, OpNode], None]
