"""Channel groups from a model: trace it, run the op rules, group the channels.

:func:`analyse` is the whole analysis: a shape-only (meta) trace when the model allows it, the
op loop (:func:`torchslim.graph.rules.run`), then :func:`build_groups`, which gathers the
channels one producer creates into a :class:`~torchslim.graph.channel_groups.ChannelGroup`.
:func:`groups` is the public entry point (``ts.graph.groups``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
from torch import nn

from torchslim._utils import evaluating
from torchslim.graph._swin import sliced_swin
from torchslim.graph.analyser import Analyser
from torchslim.graph.channel_groups import ChannelGroup, ChannelGroups
from torchslim.graph.meta import params_on_meta, to_meta
from torchslim.graph.rules import run
from torchslim.graph.rules_modules import whole_modules
from torchslim.graph.tracer import trace
from torchslim.graph.unionfind import FROZEN, components

__all__ = ["analyse", "build_groups", "groups"]


def build_groups(a: Analyser, drivers: dict[int, tuple[int, ...]]) -> list[ChannelGroup]:
    """Group the channels (union-find roots) that must be pruned together, vectorised: one root
    array for all atoms, then components of "created by the same producer dim" edges."""
    root = a.uf.root_array()
    n = len(root)
    if drivers:
        drv = np.arange(n, dtype=np.int64)
        for x, t in drivers.items():
            drv[x] = t[0] if t else FROZEN
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
        live = rs[d][rs[d] != FROZEN]
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
        for i in np.unique(owner[(flat != FROZEN) & (krank[flat] == unset)]).tolist():
            name, d, r = dims_list[i]
            live = r[(r != FROZEN) & (krank[r] == unset)]  # earlier dims may have claimed some
            if len(live) == 0:
                continue
            claim(live, fallback_rank[(name, d)])
            eu.append(np.full(len(live), live[0]))
            ev.append(live)
    labels = components(n, np.concatenate(eu) if eu else np.zeros(0, np.int64), np.concatenate(ev) if ev else np.zeros(0, np.int64))
    members: dict[int, set[tuple[str, int]]] = defaultdict(set)
    if dims_list:  # which groups each bound dim touches: one unique over (dim, group) pairs
        live = flat != FROZEN
        pairs = np.unique(owner[live] * n + labels[flat[live]])
        for i, g in zip((pairs // n).tolist(), (pairs % n).tolist()):
            members[g].add((dims_list[i][0], dims_list[i][1]))
    chans = np.unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)
    chans = chans[chans != FROZEN]
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
    a = Analyser(tr, tuple(ignore), whole_modules(model))
    run(a)
    drivers = a.resolve_drivers()
    grps = build_groups(a, drivers)
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
        from torchslim._modelinfo import example_inputs as remembered

        example_inputs = remembered(model)
    return analyse(model, example_inputs, ignore=ignore)
