"""Channel groups from a model: trace it, run the op rules, group the channels.

:func:`analyse` is the whole analysis: a shape-only (meta) trace when the model allows it, the
op loop (:func:`torchslim.graph.rules.run`), then :func:`build_groups`, which gathers the
channels one producer creates into a :class:`~torchslim.graph.channel_groups.ChannelGroup`.
:func:`groups` is the public entry point (``ts.graph.groups``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from typing import Any

import numpy as np
from torch import nn

from torchslim._select import as_patterns, check_patterns, renamed_argument
from torchslim._utils import evaluating
from torchslim.errors import InputShapeError, ModelRunError, TorchslimError
from torchslim.graph._detection import regions
from torchslim.graph._swin import sliced_swin
from torchslim.graph.analyser import Analyser
from torchslim.graph.channel_groups import ChannelGroup, ChannelGroups
from torchslim.graph.inputs import remembered_inputs
from torchslim.graph.meta import params_on_meta, to_meta
from torchslim.graph.rules import run
from torchslim.graph.rules_modules import whole_modules
from torchslim.graph.state import preserved
from torchslim.graph.tracer import Trace, trace
from torchslim.graph.unionfind import FROZEN, components

__all__ = ["META_FAILURES", "analyse", "build_groups", "groups"]

log = logging.getLogger(__name__)


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



# What a shape-only (meta) trace legitimately raises. The forward runs through
# graph.inputs.call_model, which wraps what it raises in ModelRunError / InputShapeError with the
# original as __cause__; the original is what is checked (a torchslim error is never one):
#   NotImplementedError  an op with no meta kernel ("... with Meta tensors, but there was no fake
#                        impl or Meta kernel registered"), an output size that depends on values
#                        (nonzero, boolean-mask indexing, unique), or data read back (.tolist(), .cpu())
#   RuntimeError         a value read from a meta tensor (.item(), bool(t), int(t): "cannot be
#                        called on meta tensors"; an ``if`` on a tensor), an output size that depends
#                        on values (repeat_interleave), a tensor the forward makes on a real device
#                        meeting the meta ones, or a parameter that cannot be moved to meta
#   TypeError            a meta tensor handed to numpy ("can't convert meta device type tensor"):
#                        only with "meta" in its message, any other TypeError is a bug
# The real forward then traces the model. Anything else propagates.
META_FAILURES: tuple[type[Exception], ...] = (NotImplementedError, RuntimeError)


def _meta_failure(exc: Exception) -> BaseException | None:
    """What made the meta trace fail, when it is a failure the real forward gets past; else None."""
    cause = exc.__cause__ if isinstance(exc, (ModelRunError, InputShapeError)) and exc.__cause__ else exc
    if isinstance(cause, TorchslimError):
        return None
    if isinstance(cause, META_FAILURES) or (isinstance(cause, TypeError) and "meta" in str(cause)):
        return cause
    return None


def _meta_trace(model: nn.Module, example_inputs: Any) -> tuple[Trace | None, str | None]:
    """A shape-only trace (no arithmetic, no memory for activations, no copy of the model), or
    (None, why it could not be taken) for a model whose forward needs values."""
    try:
        with params_on_meta(model), evaluating(model), sliced_swin(model):
            return trace(model, to_meta(example_inputs), grad=True), None
    except Exception as exc:
        cause = _meta_failure(exc)
        if cause is None:
            raise
        reason = _fallback_reason(exc, cause)
    log.info("channel analysis of %s: %s", type(model).__name__, reason)
    return None, reason


def _fallback_reason(exc: Exception, cause: BaseException) -> str:
    op, module = getattr(exc, "op", None), getattr(exc, "module", None)  # set by trace()
    at = f" at {op}" if op else ""
    where = f" in module '{module or '(top level)'}'" if module is not None else ""
    first_line = (str(cause).strip().splitlines() or [""])[0]
    return (f"the shape-only (meta) trace failed{at}{where}: {type(cause).__name__}: {first_line}; "
            "traced the real forward instead")


def analyse(model: nn.Module, example_inputs: Any, *, skip: tuple[str, ...] | list[str] | str = (),
            ignore: tuple[str, ...] | list[str] | None = None) -> ChannelGroups:
    """Trace ``model`` (eval mode, autograd on, so no fused kernels hide structure) and find its groups.

    The trace is shape-only (parameters and inputs on the ``meta`` device) when the forward allows
    it; a forward that needs values (data-dependent shapes or branches, ops with no meta kernel)
    is traced for real instead, and ``meta_fallback`` on the result says why (also logged at
    INFO on ``torchslim.graph.build``).

    Args:
        model: any module that runs eagerly; not modified: its modes, attributes and every tensor
            it holds are put back, even when the analysis fails (:mod:`torchslim.graph.state`).
        example_inputs: a tensor, tuple or dict of inputs.
        skip: module names, globs or ``re:`` patterns whose ops are not analysed; their channels
            stay whole (``ignore=`` is its deprecated name).

    Raises:
        ConfigError: a ``skip`` pattern selects no module (the nearest name is suggested).
        UnsupportedOpError: an op with no channel rule touches prunable channels; the message
            names the op and the module.
        InputShapeError, ModelRunError: the forward raised (on the real inputs, or on meta ones
            with an error a shape-only run does not explain, see ``META_FAILURES``).
    """
    skip = renamed_argument(skip, ignore, old_name="ignore", new_name="skip", where="analyse", default=())
    skip = as_patterns(skip, "skip") or ()
    check_patterns(skip, [n for n, _ in model.named_modules()], "skip")  # before any work
    start = time.perf_counter()
    with preserved(model, guard_writes=False):  # every forward inside guards its own writes (trace)
        tr, fallback = _meta_trace(model, example_inputs)
        if tr is None:
            # Swin window attention is traced with the forward surgery gives it (graph._swin)
            with evaluating(model), sliced_swin(model):
                tr = trace(model, example_inputs, grad=True)
    # regions taken as a whole besides attention and recurrent layers: detection's RoI pooling
    # and ops on empty tensors (graph._detection); single-op regions join the calls the loop sees
    whole, extra = regions(tr)
    tr_loop = dataclasses.replace(tr, module_calls=[*tr.module_calls, *extra]) if extra else tr
    a = Analyser(tr_loop, tuple(skip), {**whole_modules(model), **whole})
    run(a)
    drivers = a.resolve_drivers()
    grps = build_groups(a, drivers)
    head_dims = {a.uf.find(h): d for h, d in a.head_dims.items()}
    for g in grps:
        g.head_dim = head_dims.get(g.channels[0]) if g.channels else None
    frozen = [n for n, dims in a.param_atoms.items() if all(d is None or not a.uf.roots(d).any() for d in dims)]
    return ChannelGroups(grps, tr, a.param_atoms, a.uf, frozen, time.perf_counter() - start, drivers,
                         meta_ok=fallback is None, meta_fallback=fallback)


def groups(model: nn.Module, example_inputs: Any = None, *, skip: tuple[str, ...] | list[str] | str = (),
           ignore: tuple[str, ...] | list[str] | None = None) -> ChannelGroups:
    """The coupled channel groups of ``model``: ``print(ts.graph.groups(m, x))`` lists them.

    Args:
        model: any module that runs eagerly; not modified.
        example_inputs: a tensor, tuple or dict of inputs; None takes the inputs the model
            remembers (``ts.create_model`` records them).
        skip: module names, globs or ``re:`` patterns whose ops are not analysed; their channels
            stay whole (``ignore=`` is its deprecated name).

    Raises:
        SpecError: no example inputs given and the model remembers none.
        UnsupportedOpError: an op with no channel rule touches prunable channels.

    Example:
        >>> import torch, torchslim as ts
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> g = ts.graph.groups(m, torch.randn(1, 4))
        >>> [(grp.size, grp.producers) for grp in g]
        [(8, [('0.weight', 0)])]
    """
    if example_inputs is None:
        example_inputs = remembered_inputs(model)
    skip = renamed_argument(skip, ignore, old_name="ignore", new_name="skip", where="groups", default=())
    return analyse(model, example_inputs, skip=skip)
