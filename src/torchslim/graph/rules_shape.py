"""Op rules that move channels between dimensions: views, permutes, slices, cat/split, indexing.

``view``/``reshape``/``flatten`` keep per-dimension *factors*, so a linear after a flatten is
bound to the conv before it and a projection reshaped into heads makes the heads channels
(:meth:`~torchslim.graph.analyser.Analyser.split_heads`); ``permute``/``transpose`` reorder dims;
``cat`` concatenates atom lists and ``split`` takes whole pieces back; a slice or index with
bounds fixed in the model's code freezes the dim it cuts.
"""

from __future__ import annotations

import numpy as np
import torch

from torchslim.graph.analyser import Analyser, Dim, Rule, is_frozen
from torchslim.graph.tracer import OpNode, TensorMeta

__all__ = ["RULES"]


def _permute(a: Analyser, op: OpNode) -> None:
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


def _view(a: Analyser, op: OpNode) -> None:
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
        if parts is None and len(factors) == 1 and len(gj) > 1 and not is_frozen((factors[0],)):
            parts = a.split_heads(factors[0], [s for _, s in gj])
        if parts is None:
            for _, d in gi:
                a.freeze_dim(d)
            parts = [a.opaque(s) for _, s in gj]
        for (k, s), p in zip(gj, parts):
            res[k] = p if p is not None else a.opaque(s)
    a.set(out, tuple(d if d is not None else a.opaque(out.shape[k]) for k, d in enumerate(res)))


def _unsqueeze(a: Analyser, op: OpNode) -> None:
    _view(a, op)


def _expand(a: Analyser, op: OpNode) -> None:
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


def _select(a: Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = list(a.layout(x))
    d = int(op.args[1]) % len(xl)
    a.freeze_dim(xl[d])
    del xl[d]
    a.set(op.outputs[0], tuple(xl))


def _slice_dim(a: Analyser, d: Dim, start: int, end: int, step: int, n: int, *, whole: bool = False) -> Dim:
    start, end, _ = slice(start, end, step).indices(n)
    if start == 0 and end == n and step == 1:
        return d
    if len(d) == 1 and whole:  # one piece of a split that covers the whole dim
        return (d[0][start:end:step],)
    # A partial slice with bounds fixed in the model's code: removing channels before the bound
    # would silently select different ones, so the sliced dim stays whole.
    a.freeze_dim(d)
    return a.opaque(len(range(start, end, step)))


def _slice_args(op: OpNode, x: TensorMeta) -> tuple[int, int, int, int]:
    """(dim, start, end, step) of a ``slice`` op, normalised to the tensor's size."""
    n = len(x.shape)
    dim = int(op.args[1]) % n if len(op.args) > 1 else 0
    start = op.args[2] if len(op.args) > 2 and op.args[2] is not None else 0
    end = op.args[3] if len(op.args) > 3 and op.args[3] is not None else x.shape[dim]
    step = int(op.args[4]) if len(op.args) > 4 else 1
    start, end, step = slice(int(start), int(end), step).indices(x.shape[dim])
    return dim, start, end, step


def _partitions(a: Analyser) -> set[tuple[int, int]]:
    """(tensor id, dim) of the tensors that the trace slices into contiguous pieces covering the
    whole dim: Phi-3's fused ``qkv[..., :q], qkv[..., q:q + kv], qkv[..., q + kv:]``. Those
    slices are a split whose bounds the model computes from its sizes (head counts, widths), so
    each piece keeps its channels, as ``split`` does; a model whose bounds do not follow the
    pruned sizes fails the trial forward and its group is left whole."""
    cached = a.__dict__.get("_partitions")
    if cached is not None:
        return cached
    pieces: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for op in a.tr.ops:
        if op.packet != "slice" or not op.args or not isinstance(op.args[0], TensorMeta) or not op.args[0].shape:
            continue
        x = op.args[0]
        dim, start, end, step = _slice_args(op, x)
        if step == 1 and end > start:
            pieces.setdefault((x.id, dim), set()).add((start, end))
    out: set[tuple[int, int]] = set()
    sizes = {t.id: t.shape for op in a.tr.ops for t in op.tensor_args() if op.packet == "slice"}
    for (tid, dim), ranges in pieces.items():
        spans = sorted(ranges)
        if len(spans) < 2 or spans[0][0] != 0 or spans[-1][1] != sizes[tid][dim]:
            continue
        if all(e == s2 for (_, e), (s2, _) in zip(spans, spans[1:])):
            out.add((tid, dim))
    a.__dict__["_partitions"] = out
    return out


def _slice(a: Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = list(a.layout(x))
    dim, start, end, step = _slice_args(op, x)
    whole = (x.id, dim) in _partitions(a)
    xl[dim] = _slice_dim(a, xl[dim], start, end, step, x.shape[dim], whole=whole)
    a.set(op.outputs[0], tuple(xl))


def _split(a: Analyser, op: OpNode) -> None:
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


def _unbind(a: Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = list(a.layout(x))
    dim = int(op.args[1]) % len(xl) if len(op.args) > 1 else 0
    a.freeze_dim(xl[dim])
    del xl[dim]
    for o in op.outputs:
        a.set(o, tuple(xl))


def _cat(a: Analyser, op: OpNode) -> None:
    tensors = [t for t in op.args[0] if isinstance(t, TensorMeta) and t.numel > 0]
    out = op.outputs[0]
    dim = int(op.args[1]) % len(out.shape) if len(op.args) > 1 else 0
    lays = [a.layout(t) for t in tensors]
    res: list[Dim] = []
    for k in range(len(out.shape)):
        if k == dim:
            parts = [lay[k] for lay in lays]
            made = a.__dict__.get("_constant_ids", ())
            for t, p in zip(tensors, parts):
                if t.id in made:  # zeros(n) concatenated: n is written in the code, it stays
                    a.freeze_dim(p)
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


def _stack(a: Analyser, op: OpNode) -> None:
    tensors = [t for t in op.args[0] if isinstance(t, TensorMeta)]
    out = op.outputs[0]
    dim = int(op.args[1]) % len(out.shape) if len(op.args) > 1 else 0
    lays = [a.layout(t) for t in tensors]
    base = list(lays[0])
    for lay in lays[1:]:
        base = [a.unite(x, y) for x, y in zip(base, lay)]
    base.insert(dim, a.opaque(out.shape[dim]))
    a.set(out, tuple(base))


def _pad(a: Analyser, op: OpNode) -> None:
    x, pads = op.args[0], list(op.args[1])
    xl = list(a.layout(x))
    for i in range(len(pads) // 2):
        d = len(xl) - 1 - i
        if pads[2 * i] or pads[2 * i + 1]:
            a.freeze_dim(xl[d])
            xl[d] = None
    out = op.outputs[0]
    a.set(out, tuple(d if d is not None else a.opaque(out.shape[i]) for i, d in enumerate(xl)))


def _index_select(a: Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = list(a.layout(x))
    dim = int(op.args[1]) % len(xl)
    a.freeze_dim(xl[dim])
    out = op.outputs[0]
    xl[dim] = a.opaque(out.shape[dim])
    a.set(out, tuple(xl))


def _index(a: Analyser, op: OpNode) -> None:
    """``x[..., idx, ...]`` with index tensors (Swin's relative-position table ``table[index]``,
    CLIP's pooled token ``h[arange(B), eos]``): the indexed dims' positions are picked by data, so
    they are frozen; the dims no index touches keep their channels (numpy's rule places the
    indexed result where adjacent index tensors were, else first). A boolean mask consumes as
    many dims as it has."""
    x, indices = op.args[0], op.args[1] if len(op.args) > 1 else None
    out = op.outputs[0]
    if not isinstance(x, TensorMeta) or not isinstance(indices, (list, tuple)) or not indices:
        return a.opaque_op(op)
    xl = list(a.layout(x))
    used: list[int] = []  # the dims of x the index tensors consume
    k = 0
    for t in indices:
        if t is None:
            k += 1
            continue
        if not isinstance(t, TensorMeta):
            return a.opaque_op(op)
        n = len(t.shape) if t.dtype in (torch.bool, torch.uint8) else 1
        used.extend(range(k, k + n))
        k += n
    if not used or k > len(xl):
        return a.opaque_op(op)
    for d in used:
        a.freeze_dim(xl[d])
    rest_before = [d for i, d in enumerate(xl) if i < used[0]]
    rest_after = [d for i, d in enumerate(xl) if i > used[-1]]
    rest = [d for i, d in enumerate(xl) if i not in used]
    nb = len(out.shape) - len(rest)
    if nb < 0:
        return a.opaque_op(op)
    adjacent = used == list(range(used[0], used[-1] + 1))
    if adjacent:
        lay = (*rest_before, *(a.opaque(n) for n in out.shape[len(rest_before) : len(rest_before) + nb]), *rest_after)
    else:
        lay = (*(a.opaque(n) for n in out.shape[:nb]), *rest)
    a.set(out, lay if len(lay) == len(out.shape) else a.opaque_layout(out.shape))


def _repeat(a: Analyser, op: OpNode) -> None:
    """``x.repeat(r0, r1, ...)`` tiles each dim ``r`` times: output index ``j * n + i`` is input
    index ``i``, so the output dim is the product (copy, channel) and removing channel ``i``
    removes every copy of it (DeBERTa tiles its per-head position projections over the batch)."""
    x, out = op.args[0], op.outputs[0]
    reps = [int(r) for r in op.args[1]]
    xl = a.layout(x)
    off = len(reps) - len(xl)
    if off < 0:
        return a.opaque_op(op)
    lay: list[Dim] = [a.opaque(out.shape[k]) for k in range(off)]
    for i, d in enumerate(xl):
        r = reps[off + i]
        lay.append(d if r == 1 else (a.opaque(r)[0], *d))
    a.set(out, tuple(lay))


RULES: dict[str, Rule] = {
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
    "constant_pad_nd": _pad,
    "index_select": _index_select,
    "index": _index,
    "repeat": _repeat,
}
