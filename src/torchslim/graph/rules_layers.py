"""Op rules for the layers that create channels: convolutions, matrix products, norms, embeddings,
attention.

These are the *producers*: a conv's output channels, a linear's rows, an embedding's width get
fresh atoms (the parameter's own) and are recorded in ``Analyser.producers``; their input
channels are united with the incoming activation's. Grouped convolutions keep equal counts per
group, norms bind their affine parameters to the normalised features, and scaled-dot-product
attention unites query/key widths and key/value lengths (grouped-query heads are derived).
"""

from __future__ import annotations

from torchslim.graph.analyser import Analyser, Rule
from torchslim.graph.tracer import OpNode, TensorMeta

__all__ = ["RULES"]


def _conv(a: Analyser, op: OpNode) -> None:
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


def _mm(a: Analyser, op: OpNode, offset: int = 0) -> None:
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


def _mark_weight_producer(a: Analyser, m2: TensorMeta) -> None:
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


def _addmm(a: Analyser, op: OpNode) -> None:
    _mm(a, op, offset=1)


def _bmm(a: Analyser, op: OpNode, offset: int = 0) -> None:
    b1, b2 = op.args[offset], op.args[offset + 1]
    l1, l2 = a.layout(b1), a.layout(b2)
    batch = a.unite(l1[0], l2[0])
    a.unite(l1[2], l2[1])
    a.set(op.outputs[0], (batch, l1[1], l2[2]))


def _baddbmm(a: Analyser, op: OpNode) -> None:
    _bmm(a, op, offset=1)
    a.unite_layouts(a.layout(op.outputs[0]), a.layout(op.args[0]))


def _linear(a: Analyser, op: OpNode) -> None:
    x, w = op.args[0], op.args[1]
    bias = op.args[2] if len(op.args) > 2 and isinstance(op.args[2], TensorMeta) else None
    xl, wl = a.layout(x), a.layout(w)
    a.unite(xl[-1], wl[1])
    if bias is not None:
        a.unite(a.layout(bias)[0], wl[0])
    if w.param:
        a.producers.append((w.param, 0))
    a.set(op.outputs[0], (*xl[:-1], wl[0]))


def _norm_channels_first(a: Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = a.layout(x)
    for t in op.args[1:5]:
        if isinstance(t, TensorMeta) and len(t.shape) == 1 and t.shape[0] == x.shape[1]:
            a.unite(xl[1], a.layout(t)[0])
    a.set(op.outputs[0], xl)
    for o in op.outputs[1:]:
        a.set(o, (xl[1],) if o.shape == (x.shape[1],) else a.opaque_layout(o.shape))


def _layer_norm(a: Analyser, op: OpNode) -> None:
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


def _group_norm(a: Analyser, op: OpNode) -> None:
    x = op.args[0]
    groups = int(op.args[6]) if len(op.args) > 6 else 1
    xl = a.layout(x)
    channels = x.shape[1]
    if groups not in (1, channels):
        if len(xl[1]) == 1 and channels % groups == 0:
            # as a grouped convolution: position r of every group is one channel, so pruning it takes
            # one channel from each group; every group keeps the same count and ``num_groups`` stays
            per_group = xl[1][0].reshape(groups, channels // groups)
            for j in range(1, groups):
                a.uf.union_arrays(per_group[j], per_group[0])
        else:
            a.freeze_dim(xl[1])
    for t in op.args[1:3]:
        if isinstance(t, TensorMeta):
            a.unite(xl[1], a.layout(t)[0])
    a.set(op.outputs[0], xl)
    for o in op.outputs[1:]:
        a.set(o, a.opaque_layout(o.shape))


def _embedding(a: Analyser, op: OpNode) -> None:
    w, ids = op.args[0], op.args[1]
    wl = a.layout(w)
    a.freeze_dim(wl[0])
    if w.param:
        a.producers.append((w.param, 1))
    a.set(op.outputs[0], (*a.layout(ids), wl[1]))


def _sdpa(a: Analyser, op: OpNode) -> None:
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


RULES: dict[str, Rule] = {
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
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa,
    "_scaled_dot_product_flash_attention": _sdpa,
    "_scaled_dot_product_efficient_attention": _sdpa,
    "_scaled_dot_product_cudnn_attention": _sdpa,
}
