"""One cost formula per ATen op: multiply-accumulates (MACs) and floating-point operations.

Conventions (the ones torchvision's published ``_ops`` and most papers use):

* **MACs** count the multiply-accumulates of convolutions, matrix products, attention
  (``Q @ K^T`` and ``A @ V``) and recurrent cells. Bias additions, normalisation,
  activations and pooling are not MACs.
* **FLOPs** are ``2 x MACs`` plus one operation per output element of every other arithmetic
  op (elementwise ops, activations), per input element of reductions and pooling, and a small
  fixed count per element for normalisation and softmax (documented in ``_FLOPS_PER_ELEMENT``).

Ops are sorted into: a formula (here), pointwise (``graph.optable.is_pointwise``, the table the
channel analysis reads too), free (views, copies, creation, indexing, integer results) or
*unsupported*. Unsupported ops are reported by name, never silently counted as zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import Any

from torchslim.graph.optable import is_pointwise
from torchslim.graph.tracer import OpNode, TensorMeta

__all__ = ["Cost", "op_cost"]


@dataclass(frozen=True)
class Cost:
    macs: int = 0
    flops: int = 0
    supported: bool = True


def _t(x: Any) -> TensorMeta | None:
    return x if isinstance(x, TensorMeta) else None


def _arg(op: OpNode, i: int, name: str, default: Any = None) -> Any:
    if len(op.args) > i:
        return op.args[i]
    return op.kwargs.get(name, default)


def _macs(m: int, extra_flops: int = 0) -> Cost:
    return Cost(macs=int(m), flops=int(2 * m + extra_flops))


# ---- matrix products ---------------------------------------------------------------------
def _mm(op: OpNode) -> Cost:  # (M,K) @ (K,N)
    a, b = _t(op.args[0]), _t(op.args[1])
    return _macs(a.shape[0] * a.shape[1] * b.shape[1])


def _addmm(op: OpNode) -> Cost:  # bias + (M,K) @ (K,N)
    a, b = _t(op.args[1]), _t(op.args[2])
    out = op.outputs[0]
    return _macs(a.shape[0] * a.shape[1] * b.shape[1], extra_flops=out.numel)


def _bmm(op: OpNode) -> Cost:  # (B,M,K) @ (B,K,N)
    a, b = _t(op.args[0]), _t(op.args[1])
    return _macs(a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])


def _baddbmm(op: OpNode) -> Cost:
    a, b = _t(op.args[1]), _t(op.args[2])
    return _macs(a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], extra_flops=op.outputs[0].numel)


def _mv(op: OpNode) -> Cost:
    a = _t(op.args[0])
    return _macs(a.shape[0] * a.shape[1])


def _addmv(op: OpNode) -> Cost:
    a = _t(op.args[1])
    return _macs(a.shape[0] * a.shape[1], extra_flops=a.shape[0])


def _dot(op: OpNode) -> Cost:
    return _macs(_t(op.args[0]).numel)


def _linear(op: OpNode) -> Cost:  # input (..., in) @ weight(out, in)^T
    w = _t(op.args[1])
    bias = _t(_arg(op, 2, "bias"))
    out = op.outputs[0]
    return _macs(out.numel * w.shape[-1], extra_flops=out.numel if bias is not None else 0)


def _matmul(op: OpNode) -> Cost:  # general broadcasting matmul
    k = _t(op.args[0]).shape[-1]
    return _macs(op.outputs[0].numel * k)


# ---- convolution -------------------------------------------------------------------------
def _convolution(op: OpNode) -> Cost:
    x, w = _t(op.args[0]), _t(op.args[1])
    bias = _t(_arg(op, 2, "bias"))
    transposed = bool(_arg(op, 6, "transposed", False))
    out = op.outputs[0]
    per = w.shape[1] * prod(w.shape[2:])
    # direct: every output element is a dot product over (C_in/groups) x kernel;
    # transposed: every input element is scattered over (C_out/groups) x kernel
    macs = (x.numel if transposed else out.numel) * per
    return _macs(macs, extra_flops=out.numel if bias is not None else 0)


def _conv_nd(op: OpNode) -> Cost:  # conv1d/2d/3d/conv_transpose when they reach the dispatcher
    x, w = _t(op.args[0]), _t(op.args[1])
    out = op.outputs[0]
    transposed = "transpose" in op.packet
    per = w.shape[1] * prod(w.shape[2:])
    return _macs((x.numel if transposed else out.numel) * per)


# ---- attention ---------------------------------------------------------------------------
def _sdpa(op: OpNode) -> Cost:
    q, k, v = _t(op.args[0]), _t(op.args[1]), _t(op.args[2])
    batch = prod(q.shape[:-2])
    lq, e = q.shape[-2], q.shape[-1]
    s, ev = k.shape[-2], v.shape[-1]
    macs = batch * lq * s * e + batch * lq * s * ev
    return _macs(macs, extra_flops=5 * batch * lq * s)  # scale + softmax


def _native_mha(op: OpNode) -> Cost:
    # _native_multi_head_attention(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias,
    #                              proj_weight, proj_bias, mask, need_weights, ...)
    q, k = _t(op.args[0]), _t(op.args[1])
    e = int(op.args[3])
    lq = prod(q.shape[:-1])  # batch x target length
    b = q.shape[0] if len(q.shape) == 3 else 1
    tgt = q.shape[-2]
    src = k.shape[-2]
    lk = prod(k.shape[:-1])
    proj_in = lq * e * e + 2 * lk * e * e
    attn = 2 * b * tgt * src * e
    proj_out = lq * e * e
    return _macs(proj_in + attn + proj_out, extra_flops=5 * b * tgt * src * int(op.args[4]))


def _encoder_layer_fwd(op: OpNode) -> Cost:
    # _transformer_encoder_layer_fwd(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
    #   proj_bias, use_gelu, norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2,
    #   norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2, mask, mask_type)
    src = _t(op.args[0])
    e, heads = int(op.args[1]), int(op.args[2])
    ffn = _t(op.args[14]).shape[0]
    b, length = (src.shape[0], src.shape[1]) if len(src.shape) == 3 else (1, src.shape[0])
    tokens = b * length
    macs = 4 * tokens * e * e + 2 * b * length * length * e + 2 * tokens * e * ffn
    elementwise = 5 * b * heads * length * length + 14 * tokens * e + tokens * ffn
    return _macs(macs, extra_flops=elementwise)


# ---- recurrent layers: every token passes every 2-D weight once ---------------------------
def _rnn(op: OpNode) -> Cost:
    x = _t(op.args[0])
    tokens = prod(x.shape[:-1]) if x.shape else 0
    weights = [m for m in op.tensor_args()[1:] if len(m.shape) == 2 and m.param is not None]
    if not weights:  # unnamed weights (functional use): take every 2-D tensor argument
        weights = [m for m in op.tensor_args()[1:] if len(m.shape) == 2]
    macs = tokens * sum(w.numel for w in weights)
    return _macs(macs, extra_flops=tokens * 4 * max((w.shape[0] for w in weights), default=0))


_MAC_FORMULAS: dict[str, Callable[[OpNode], Cost]] = {
    "mm": _mm,
    "_int_mm": _mm,
    "addmm": _addmm,
    "_addmm_activation": _addmm,
    "bmm": _bmm,
    "baddbmm": _baddbmm,
    "addbmm": _baddbmm,
    "mv": _mv,
    "addmv": _addmv,
    "dot": _dot,
    "vdot": _dot,
    "linear": _linear,
    "matmul": _matmul,
    "convolution": _convolution,
    "_convolution": _convolution,
    "convolution_overrideable": _convolution,
    "mkldnn_convolution": _conv_nd,
    "cudnn_convolution": _conv_nd,
    "conv1d": _conv_nd,
    "conv2d": _conv_nd,
    "conv3d": _conv_nd,
    "conv_transpose1d": _conv_nd,
    "conv_transpose2d": _conv_nd,
    "conv_transpose3d": _conv_nd,
    "_scaled_dot_product_flash_attention": _sdpa,
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa,
    "_scaled_dot_product_efficient_attention": _sdpa,
    "_scaled_dot_product_cudnn_attention": _sdpa,
    "_scaled_dot_product_fused_attention_overrideable": _sdpa,
    "_efficient_attention_forward": _sdpa,
    "_flash_attention_forward": _sdpa,
    "_native_multi_head_attention": _native_mha,
    "_transformer_encoder_layer_fwd": _encoder_layer_fwd,
    "lstm": _rnn,
    "gru": _rnn,
    "rnn_tanh": _rnn,
    "rnn_relu": _rnn,
    "mkldnn_rnn_layer": _rnn,
    "_cudnn_rnn": _rnn,
    "_thnn_fused_lstm_cell": _rnn,
    "_thnn_fused_gru_cell": _rnn,
}

# Ops that are arithmetic but not MACs: FLOPs per element (of the output unless "in").
_FLOPS_PER_ELEMENT: dict[str, tuple[int, str]] = {
    "native_batch_norm": (2, "out"),  # inference: scale and shift (statistics folded)
    "_native_batch_norm_legit": (4, "out"),
    "_native_batch_norm_legit_no_training": (2, "out"),
    "batch_norm": (2, "out"),
    "native_layer_norm": (5, "out"),
    "layer_norm": (5, "out"),
    "native_group_norm": (5, "out"),
    "group_norm": (5, "out"),
    "_fused_rms_norm": (4, "out"),
    "rms_norm": (4, "out"),
    "instance_norm": (5, "out"),
    "_softmax": (5, "out"),
    "softmax": (5, "out"),
    "_log_softmax": (5, "out"),
    "log_softmax": (5, "out"),
    "_safe_softmax": (5, "out"),
    "max_pool1d": (1, "in"),
    "max_pool2d": (1, "in"),
    "max_pool3d": (1, "in"),
    "max_pool2d_with_indices": (1, "in"),
    "max_pool3d_with_indices": (1, "in"),
    "avg_pool1d": (1, "in"),
    "avg_pool2d": (1, "in"),
    "avg_pool3d": (1, "in"),
    "_adaptive_avg_pool2d": (1, "in"),
    "_adaptive_avg_pool3d": (1, "in"),
    "adaptive_avg_pool1d": (1, "in"),
    "adaptive_max_pool2d": (1, "in"),
    "adaptive_max_pool3d": (1, "in"),
    "mean": (1, "in"),
    "sum": (1, "in"),
    "prod": (1, "in"),
    "var": (2, "in"),
    "std": (2, "in"),
    "var_mean": (3, "in"),
    "std_mean": (3, "in"),
    "amax": (1, "in"),
    "amin": (1, "in"),
    "max": (1, "in"),
    "min": (1, "in"),
    "norm": (2, "in"),
    "linalg_vector_norm": (2, "in"),
    "logsumexp": (3, "in"),
    "cumsum": (1, "in"),
    "upsample_nearest1d": (0, "out"),
    "upsample_nearest2d": (0, "out"),
    "upsample_nearest3d": (0, "out"),
    "_upsample_nearest_exact2d": (0, "out"),
    "upsample_bilinear2d": (7, "out"),
    "_upsample_bilinear2d_aa": (7, "out"),
    "upsample_bicubic2d": (30, "out"),
    "upsample_linear1d": (3, "out"),
    "upsample_trilinear3d": (15, "out"),
    "grid_sampler_2d": (7, "out"),
    "cdist": (3, "out"),
    "_cdist_forward": (3, "out"),
}

# Ops that move, create or select data without arithmetic.
_FREE = {
    "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full",
    "full_like", "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "arange",
    "linspace", "scalar_tensor", "lift_fresh", "lift_fresh_copy", "clone", "copy", "copy_",
    "_to_copy", "to", "contiguous", "detach", "cat", "stack", "hstack", "vstack", "concat",
    "index", "index_select", "gather", "scatter", "index_put", "index_put_", "_index_put_impl_",
    "slice_scatter", "select_scatter", "diagonal_scatter", "as_strided_scatter", "embedding",
    "_embedding_bag", "embedding_bag", "masked_select", "nonzero", "repeat", "repeat_interleave",
    "roll", "flip", "constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d",
    "replication_pad1d", "replication_pad2d", "_unsafe_view", "native_dropout", "dropout",
    "feature_dropout", "alpha_dropout", "bernoulli", "bernoulli_", "rand", "randn", "randint",
    "rand_like", "randn_like", "normal", "normal_", "uniform_", "fill", "fill_", "zero_",
    "tril", "triu", "topk", "sort", "argsort", "argmax", "argmin", "unique_dim", "_unique2",
    "sym_size", "sym_stride", "sym_numel", "_local_scalar_dense", "item", "set_", "resize_",
    "_nested_tensor_from_mask", "_nested_tensor_from_tensor_list", "_nested_view_from_buffer",
    "to_padded_tensor", "_pad_packed_sequence", "_pack_padded_sequence", "unfold", "im2col",
    "col2im", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
    "_assert_async", "_assert_tensor_metadata", "_functional_assert_async", "one_hot",
    "_prelu_kernel", "masked_scatter", "index_add", "index_copy", "index_fill", "take",
    "take_along_dim", "narrow_copy", "split_with_sizes_copy", "_reshape_alias", "alias",
    "view_as_real", "view_as_complex", "_make_dep_token", "record_stream", "_foreach_copy_",
    "block_diag", "cartesian_prod", "meshgrid", "searchsorted", "bucketize", "histc",
    "eye", "as_strided_", "tensor_split", "unsafe_split", "unsafe_chunk", "lift", "_scaled_dot_product_attention_math",
}


def _is_view(func: Any) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def op_cost(op: OpNode) -> Cost:
    """MACs and FLOPs of one recorded op; ``supported=False`` when no rule covers it."""
    packet = op.packet
    formula = _MAC_FORMULAS.get(packet)
    if formula is not None:
        return formula(op)
    rule = _FLOPS_PER_ELEMENT.get(packet)
    if rule is not None:
        per, which = rule
        if which == "in":
            ins = op.tensor_args()
            n = ins[0].numel if ins else 0
        else:
            n = op.outputs[0].numel if op.outputs else 0
        return Cost(flops=per * n)
    if packet in _FREE or _is_view(op.func):
        return Cost()
    if is_pointwise(op.func):
        out = op.outputs[0] if op.outputs else None
        if out is None or not out.is_floating:
            return Cost()  # comparisons / masks / integer arithmetic are bookkeeping
        return Cost(flops=out.numel)
    if all(not o.is_floating for o in op.outputs) and op.outputs:
        return Cost()  # integer/boolean results (shapes, indices, masks)
    return Cost(supported=False)
