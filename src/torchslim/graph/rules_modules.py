"""Modules the analysis takes as a whole instead of op by op: attention and recurrent layers.

``nn.MultiheadAttention`` merges batch and heads in one dimension internally and
``nn.LSTM``/``GRU``/``RNN`` run as one fused op, so following their channels op by op would
freeze them. :func:`whole_modules` finds them in a model; when the op loop reaches the first op
of one of their calls it hands the whole call to :func:`attention_call` or :func:`rnn_call`,
which bind the module's parameters directly (heads, gate rows, hidden columns). Surgery keeps
these modules valid for any width (``graph._mha``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from torchslim.graph._detection import HANDLERS
from torchslim.graph._mha import SlicedMultiheadAttention
from torchslim.graph.analyser import Analyser, dim_atoms
from torchslim.graph.tracer import OpNode, TensorMeta

__all__ = ["attention_call", "module_constraints", "region_handler", "rnn_call", "whole_modules"]


def whole_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Modules analysed as a whole, by name: ``nn.MultiheadAttention`` whose heads and widths can be
    pruned (no bias_k, no zero attn; ``num_heads``, ``head_dim``) and ``nn.LSTM``/``GRU``/``RNN``
    without projections (``kind="rnn"``, ``hidden_size``, ``gates``, ``num_layers``, ``dirs``)."""
    out: dict[str, dict[str, Any]] = {}
    gates = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
    for name, m in model.named_modules():
        if type(m) in (nn.MultiheadAttention, SlicedMultiheadAttention) and m.bias_k is None and not m.add_zero_attn:
            out[name] = {"num_heads": m.num_heads, "head_dim": m.head_dim}
        elif type(m) in (nn.LSTM, nn.GRU, nn.RNN) and getattr(m, "proj_size", 0) == 0:
            out[name] = {"kind": "rnn", "hidden_size": m.hidden_size, "gates": gates[m.mode], "num_layers": m.num_layers,
                         "dirs": 2 if m.bidirectional else 1}
    return out


def _call_parts(a: Analyser, call: Any) -> tuple[str, list[OpNode], set[int], list[TensorMeta]]:
    """A module call handled as a whole: its parameter prefix, its ops, the ids they produce,
    and the float tensors it reads from outside (inputs, states; not its own parameters)."""
    prefix = call.name + "." if call.name else ""
    ops = a.tr.ops[call.first_op : call.last_op + 1]
    inside = {o.id for op in ops for o in op.outputs}
    own = {meta.id for n, meta in a.tr.params.items() if n.startswith(prefix)}
    seen: set[int] = set()
    ext: list[TensorMeta] = []
    for op in ops:
        for t in op.tensor_args():
            if t.id in inside or t.id in own or t.id in seen or not t.is_floating:
                continue
            seen.add(t.id)
            ext.append(t)
    return prefix, ops, inside, ext


def attention_call(a: Analyser, call: Any) -> None:
    """One ``nn.MultiheadAttention`` call as a whole: heads are channels (Q/K/V rows of a head,
    the out-projection columns reading it), the input widths are the projections' columns, the
    output width the out-projection's rows. Its internals (batch x heads merged in one dim) are
    not analysed op by op; surgery keeps the module valid for any widths (``graph._mha``).

    Other regions taken as a whole (detection's RoI pooling, ops on empty tensors: their
    ``kind`` names a handler of :data:`torchslim.graph._detection.HANDLERS`) are handed on."""
    info = a.mha[call.name]
    handler = region_handler(info)
    if handler is not None:
        return handler(a, call)
    prefix, ops, inside, ext = _call_parts(a, call)
    qkv = [t for t in ext if len(t.shape) in (2, 3)][:3]
    if not qkv:
        return _opaque_call(a, ops, inside)
    heads = a.mha_heads.get(call.name)
    hd = int(info["head_dim"])
    if heads is None:
        heads = a.mha_heads[call.name] = a.uf.new(int(info["num_heads"]))
        for h in heads.tolist():
            a.head_dims[h] = hd
    per_head = np.repeat(heads, hd)
    q, k, v = qkv[0], qkv[min(1, len(qkv) - 1)], qkv[-1]  # key is value when two are distinct
    params = a.tr.params
    if prefix + "in_proj_weight" in params:
        w = params[prefix + "in_proj_weight"]
        wl = a.layout(w)
        a.uf.union_arrays(wl[0][0], np.tile(per_head, 3))
        for x in {t.id: t for t in (q, k, v)}.values():
            a.unite(a.layout(x)[-1], wl[1])
        a.producers.append((w.param, 0))
    else:
        for part, x in (("q", q), ("k", k), ("v", v)):
            w = params[f"{prefix}{part}_proj_weight"]
            wl = a.layout(w)
            a.uf.union_arrays(wl[0][0], per_head)
            a.unite(a.layout(x)[-1], wl[1])
            a.producers.append((w.param, 0))
    if prefix + "in_proj_bias" in params:
        a.uf.union_arrays(a.layout(params[prefix + "in_proj_bias"])[0][0], np.tile(per_head, 3))
    ow = params[prefix + "out_proj.weight"]
    ol = a.layout(ow)
    a.uf.union_arrays(ol[1][0], per_head)
    if prefix + "out_proj.bias" in params:
        a.unite(a.layout(params[prefix + "out_proj.bias"])[0], ol[0])
    a.producers.append((ow.param, 0))
    width = len(ol[0][0])
    for op in ops:
        for o in op.outputs:
            if a.last_use.get(o.id, -1) <= call.last_op and o.id not in a.output_ids:
                continue
            if len(o.shape) == len(q.shape) and o.shape[-1] == width:
                a.layouts[o.id] = (*a.opaque_layout(o.shape[:-1]), ol[0])
            else:
                a.layouts[o.id] = a.opaque_layout(o.shape)


def rnn_call(a: Analyser, call: Any) -> None:
    """One ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` call as a whole. Its hidden channels are one
    space shared by every layer and direction (so ``h_n`` stays one tensor of equal widths):
    channel ``j`` is row ``j`` of every gate block of ``weight_ih`` / ``weight_hh`` / biases,
    column ``j`` of ``weight_hh`` and of the next layer's ``weight_ih`` (once per direction).
    The input features are ``weight_ih_l0``'s columns."""
    info = a.mha[call.name]
    prefix, ops, inside, ext = _call_parts(a, call)
    hidden, gates, layers, dirs = int(info["hidden_size"]), int(info["gates"]), int(info["num_layers"]), int(info["dirs"])
    params = a.tr.params
    if not ext or any(f"{prefix}weight_ih_l{k}{sfx}" not in params for k in range(layers)
                      for sfx in ("", "_reverse")[:dirs]):
        return _opaque_call(a, ops, inside)
    hid = a.mha_heads.get(call.name)
    if hid is None:
        hid = a.mha_heads[call.name] = a.uf.new(hidden)
    x = ext[0]
    for k in range(layers):
        for sfx in ("", "_reverse")[:dirs]:
            w_ih = params[f"{prefix}weight_ih_l{k}{sfx}"]
            w_hh = params[f"{prefix}weight_hh_l{k}{sfx}"]
            li, lh = a.layout(w_ih), a.layout(w_hh)
            a.uf.union_arrays(li[0][0], np.tile(hid, gates))
            a.uf.union_arrays(lh[0][0], np.tile(hid, gates))
            a.uf.union_arrays(lh[1][0], hid)
            if k == 0:
                a.unite(a.layout(x)[-1], li[1])
            else:
                a.uf.union_arrays(li[1][0], np.tile(hid, dirs))
            for b in (f"{prefix}bias_ih_l{k}{sfx}", f"{prefix}bias_hh_l{k}{sfx}"):
                if b in params:
                    a.uf.union_arrays(a.layout(params[b])[0][0], np.tile(hid, gates))
            a.producers.append((w_ih.param, 0))
    for t in ext[1:]:  # initial states given by the caller: (layers * dirs, batch, hidden)
        if len(t.shape) >= 1 and t.shape[-1] == hidden:
            a.uf.union_arrays(dim_atoms(a.layout(t)[-1]), hid)
        else:
            a.freeze(t)
    for op in ops:
        for o in op.outputs:
            if a.last_use.get(o.id, -1) <= call.last_op and o.id not in a.output_ids:
                continue
            if len(o.shape) >= 2 and o.shape[-1] == hidden * dirs:
                a.layouts[o.id] = (*a.opaque_layout(o.shape[:-1]), (np.tile(hid, dirs),))
            elif len(o.shape) >= 2 and o.shape[-1] == hidden:
                a.layouts[o.id] = (*a.opaque_layout(o.shape[:-1]), (hid.copy(),))
            else:
                a.layouts[o.id] = a.opaque_layout(o.shape)


def region_handler(info: dict[str, Any]) -> Any:
    """The handler of a region of kind ``info["kind"]`` other than attention and recurrent layers
    (detection and flow: :mod:`torchslim.graph._detection`), or None."""
    return HANDLERS.get(info.get("kind"))


def _opaque_call(a: Analyser, ops: list[OpNode], inside: set[int]) -> None:
    for op in ops:
        a.opaque_op(op)


def module_constraints(a: Analyser) -> None:
    # Attention modules not handled as a whole (bias_k, add_zero_attn, subclasses): PyTorch
    # checks query width == embed_dim == the projections' widths: keep everything they own whole.
    for mod, typ in a.tr.module_types.items():
        if typ == "MultiheadAttention" and mod not in a.mha:
            for name, atoms in a.param_atoms.items():
                if name.startswith(mod + ".") if mod else True:
                    for d in atoms:
                        if d is not None:
                            a.uf.freeze(d)
