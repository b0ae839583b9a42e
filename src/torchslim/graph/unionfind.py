"""Union-find over integer atoms, vectorised with numpy.

The channel analysis (:mod:`torchslim.graph.analyser`) gives every index of every channel
dimension an integer *atom* and unites atoms that must be removed together. Atom 0 is the
*frozen* atom: whatever is united with it is never removed. Whole arrays of atoms are united at
once, which is almost all the analysis ever does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FROZEN", "UnionFind", "components"]

FROZEN = 0  # the atom of everything that must stay whole


class UnionFind:
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
        labels = components(len(nodes), np.searchsorted(nodes, ra), np.searchsorted(nodes, rb))
        self._p[nodes] = nodes[labels]

    def freeze(self, a: np.ndarray) -> None:
        if len(a):
            self._p[self.roots(np.asarray(a, dtype=np.int64))] = FROZEN  # roots under the frozen atom

    def root_array(self) -> np.ndarray:
        """The root of every atom at once (pointer jumping on a copy; the forest is unchanged)."""
        p = self._p[: self.n].copy()
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return p
            p = q


def components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
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
