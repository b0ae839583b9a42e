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

import numpy as np

from torchslim.errors import UnsupportedOpError
from torchslim.graph.analyser import Analyser, Dim, Rule, dim_atoms, is_frozen
from torchslim.graph.tracer import OpNode, TensorMeta
from torchslim.graph.unionfind import FROZEN

__all__ = ["RULES", "constant", "elementwise", "freeze_all", "frozen_op", "same", "unknown"]


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


def constant(a: Analyser, op: OpNode) -> None:
    """``zeros``/``ones``/``full``/``empty`` and their ``new_``/``_like`` forms: every index holds the
    same value, so removing one changes nothing; each dim gets free atoms that take the channels
    of whatever the tensor meets (T5's cross-attention ``position_bias = zeros(1, n_heads, q, k)``
    added to per-head scores). A size written in the model's code that does not follow a pruning
    fails the trial forward, and that group is left whole. Concatenated as channels (``cat([x,
    zeros(n)])``) a constant's width is written in the code: ``cat`` freezes it."""
    for o in op.outputs:
        if not o.is_floating:
            a.layouts[o.id] = a.opaque_layout(o.shape)
            continue
        lay = tuple(a.opaque(s) if s == 1 else (a.uf.new(s),) for s in o.shape)
        a.__dict__.setdefault("_constant_atoms", []).extend(d[0] for d in lay if d[0].any())
        a.__dict__.setdefault("_constant_ids", set()).add(o.id)
        a.layouts[o.id] = lay


def _live(a: Analyser, tensors: list[TensorMeta]) -> bool:
    """Whether any of ``tensors`` carries channels that can be removed: atoms not frozen, other
    than those of constants that met nothing else (``unique(zeros(3))``)."""
    dims = [d for t in tensors if t.is_floating for d in a.layout(t) if not is_frozen(d)]
    if not dims:
        return False
    made = a.__dict__.get("_constant_atoms")
    if not made:
        return True
    root = a.uf.root_array()
    constant = np.zeros(len(root), dtype=bool)
    constant[np.concatenate(made)] = True
    real = np.unique(root[~constant])  # classes holding any atom a constant did not make
    return any(np.isin(root[dim_atoms(d)], real[real != FROZEN]).any() for d in dims)


def unknown(a: Analyser, op: OpNode) -> None:
    """An op with no rule: refused when it reads live channels, else like :func:`frozen_op`."""
    if _live(a, op.tensor_args()):
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
    if not _norm_statistic(a, op):
        for d in red:
            a.freeze_dim(xl[d])
    keep = [d for i, d in enumerate(xl) if i not in red]
    if len(keep) == len(out.shape):
        lay = tuple(keep)
    else:
        lay = tuple(a.opaque(1) if i in red else d for i, d in enumerate(xl))
    for o in op.outputs:
        a.set(o, lay)


def _norm_statistic(a: Analyser, op: OpNode) -> bool:
    """Whether a reduction is the statistic of a normalisation layer: a ``mean``/``var`` with
    ``keepdim`` inside a module whose class is a norm (``LlamaRMSNorm``, ``T5LayerNorm``,
    ``nn.RMSNorm``...). Like ``native_layer_norm``, it normalises over whatever channels are left,
    so removing some does not freeze them (the statistic is taken over fewer)."""
    if op.packet not in ("mean", "var", "var_mean"):
        return False
    if "keepdim" in op.kwargs:
        keepdim = op.kwargs["keepdim"]
    else:  # mean.dim(x, dim, keepdim), var.dim(x, dim, unbiased, keepdim)
        pos = 2 if op.packet == "mean" else 3
        keepdim = op.args[pos] if len(op.args) > pos else False
    if keepdim is not True:
        return False
    return "Norm" in a.tr.module_types.get(op.module, "")


def _gather(a: Analyser, op: OpNode) -> None:
    """``gather(x, dim, index)``: ``out[..., i, ...] = x[..., index[..., i, ...], ...]``: the gathered
    dim is picked by data (frozen), every other dim is read at the same position (kept)."""
    x, index, out = op.args[0], op.args[2] if len(op.args) > 2 else None, op.outputs[0]
    if not isinstance(x, TensorMeta) or not isinstance(index, TensorMeta) or len(x.shape) != len(out.shape):
        return a.opaque_op(op)
    xl = a.layout(x)
    dim = int(op.args[1]) % max(len(xl), 1)
    a.freeze_dim(xl[dim])
    lay = tuple(a.opaque(s) if k == dim or x.shape[k] != s else xl[k] for k, s in enumerate(out.shape))
    for k, s in enumerate(out.shape):
        if k != dim and x.shape[k] != s:
            a.freeze_dim(xl[k])
    a.set(out, lay)


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
    "gather": _gather,
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
    "empty": constant,
    "zeros": constant,
    "ones": constant,
    "full": constant,
    "arange": frozen_op,
    "new_zeros": constant,
    "new_ones": constant,
    "new_empty": constant,
    "new_full": constant,
    "empty_like": constant,
    "zeros_like": constant,
    "ones_like": constant,
    "randn": frozen_op,
    "rand": frozen_op,
}
