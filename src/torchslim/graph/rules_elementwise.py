"""Op rules, generic kinds: ops that keep the layout, elementwise ops, reductions, pooling.

A rule reads the layouts of an op's inputs (:class:`~torchslim.graph.analyser.Analyser`), unites,
freezes or derives their atoms, and sets its outputs' layouts. The rules here cover the ops that
do not move channels between dimensions: copies and dropouts keep the layout (:func:`same`),
elementwise and broadcasting ops unite their inputs' channels (:func:`elementwise`), reductions
and softmax-like ops freeze the dims they mix, pooling keeps batch and channels. Ops that produce
no floating tensors, create fresh tensors, or that no rule can follow are :func:`frozen_op` /
:func:`freeze_all`; a float op with no rule that touches live channels is :func:`unknown`.
"""

from __future__ import annotations

from torchslim.errors import UnsupportedOpError
from torchslim.graph.analyser import Analyser, Dim, Rule, is_frozen
from torchslim.graph.tracer import OpNode, TensorMeta

__all__ = ["RULES", "elementwise", "freeze_all", "frozen_op", "same", "unknown"]


def same(a: Analyser, op: OpNode) -> None:
    """Copies, casts, dropouts: the output has its first tensor input's layout."""
    x = next((t for t in op.args if isinstance(t, TensorMeta)), None)
    if x is None:
        return frozen_op(a, op)
    lay = a.layout(x)
    for o in op.outputs:
        a.set(o, lay if o.shape == x.shape else a.opaque_layout(o.shape))


def frozen_op(a: Analyser, op: OpNode) -> None:
    """Creation ops and integer results: outputs opaque, inputs untouched."""
    for o in op.outputs:
        a.layouts[o.id] = a.opaque_layout(o.shape)


def unknown(a: Analyser, op: OpNode) -> None:
    """An op with no rule: refused when it reads live channels, else like :func:`frozen_op`."""
    live = [t for t in op.tensor_args() if t.is_floating and any(not is_frozen(d) for d in a.layout(t))]
    if live:
        raise UnsupportedOpError(
            f"no channel rule for {op.name} in module '{op.module or '(top)'}' "
            f"({a.tr.module_types.get(op.module, '?')}); skip that module "
            f"(skip=[{op.module!r}]) to leave its channels untouched"
        )
    frozen_op(a, op)


def elementwise(a: Analyser, op: OpNode) -> None:
    """Elementwise ops (broadcasting): the inputs' channels are united, broadcast dims frozen."""
    out = op.outputs[0] if op.outputs else None
    if out is None:
        return
    n = len(out.shape)
    dims: list[Dim | None] = [None] * n
    for t in op.tensor_args():
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


def freeze_all(a: Analyser, op: OpNode) -> None:
    """Ops whose channels cannot be followed: every input frozen, outputs opaque."""
    a.opaque_op(op)


def _reduce(a: Analyser, op: OpNode) -> None:
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
        return frozen_op(a, op)
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


def _pool(a: Analyser, op: OpNode) -> None:
    x = op.args[0]
    xl = a.layout(x)
    for o in op.outputs:
        lead = len(o.shape) - (len(x.shape) - 2) if len(x.shape) >= 3 else len(o.shape)
        a.set(o, tuple(xl[i] if i < 2 and i < lead else a.opaque(s) for i, s in enumerate(o.shape)))


def _along_dim_same(a: Analyser, op: OpNode) -> None:
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


RULES: dict[str, Rule] = {
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
    "_softmax": _along_dim_same,
    "_log_softmax": _along_dim_same,
    "_safe_softmax": _along_dim_same,
    "cumsum": _along_dim_same,
    "roll": _along_dim_same,
    "flip": _along_dim_same,
    "clone": same,
    "_to_copy": same,
    "contiguous": same,
    "alias": same,
    "detach": same,
    "lift_fresh": same,
    "native_dropout": same,
    "dropout": same,
    "fill_": same,
    "zero_": same,
    "copy_": elementwise,
    "where": elementwise,
    "masked_fill": elementwise,
    "masked_fill_": elementwise,
    "lstm": freeze_all,
    "gru": freeze_all,
    "rnn_tanh": freeze_all,
    "rnn_relu": freeze_all,
    "mkldnn_rnn_layer": freeze_all,
    "_cudnn_rnn": freeze_all,
    "gather": freeze_all,
    "as_strided": freeze_all,
    "as_strided_": freeze_all,
    "channel_shuffle": freeze_all,
    "native_channel_shuffle": freeze_all,
    "pixel_shuffle": freeze_all,
    "pixel_unshuffle": freeze_all,
    "im2col": freeze_all,
    "col2im": freeze_all,
    "unfold": freeze_all,
    "topk": freeze_all,
    "sort": freeze_all,
    "_native_multi_head_attention": freeze_all,
    "_transformer_encoder_layer_fwd": freeze_all,
    "scalar_tensor": frozen_op,
    "empty": frozen_op,
    "zeros": frozen_op,
    "ones": frozen_op,
    "full": frozen_op,
    "arange": frozen_op,
    "new_zeros": frozen_op,
    "new_ones": frozen_op,
    "new_empty": frozen_op,
    "new_full": frozen_op,
    "empty_like": frozen_op,
    "zeros_like": frozen_op,
    "ones_like": frozen_op,
    "randn": frozen_op,
    "rand": frozen_op,
}
