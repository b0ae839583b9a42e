"""Detection and optical flow: the data-dependent parts, analysed at their channel boundary.

Detectors select boxes by value (top-k, score thresholds, NMS), pool a variable number of regions
out of the feature maps (RoI Align) and post-process in Python; none of it has channels of its own,
but RoI pooling carries the feature maps' channels into the box, mask and keypoint heads, so the
backbone, the FPN and those heads are one channel space. The trace runs the real forward (the
meta one cannot pick boxes), and this module marks the *regions* the op loop takes as a whole
(the mechanism :mod:`~torchslim.graph.rules_modules` uses for attention and recurrent layers):

* ``MultiScaleRoIAlign`` calls (``kind="roi_pool"``): the pooled output's channels are the
  channels of the feature maps it reads (one space across the levels); boxes and scales are
  frozen. Its body (a zero tensor filled level by level with ``index_put_``) is not analysed op
  by op.
* ``torchvision::roi_align`` / ``roi_pool`` called elsewhere (``kind="roi_op"``): the same, for
  one feature map.
* ops whose every tensor is empty (``kind="empty"``): a detector that keeps no box concatenates
  empty lists; nothing there has channels.

Anything else data-dependent (NMS, top-k, box decoding, mask pasting, keypoint decoding) reads
only the heads' outputs, whose channels are the model's interface (anchors x classes, box
coordinates) and stay whole; the op rules freeze them, and an op that would touch live channels
still raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from torchslim.graph.analyser import Analyser, Dim
from torchslim.graph.tracer import ModuleCall, OpNode, Trace

__all__ = ["HANDLERS", "fixed_counts", "regions", "sync_vision_attributes"]

_ROI_MODULES = ("MultiScaleRoIAlign",)
# torchvision's prediction heads: their outputs are the interface (anchors x classes, box
# coordinates, mask classes, keypoints) whatever the example's detections exercise downstream
_HEADS = ("RPNHead", "FastRCNNPredictor", "MaskRCNNPredictor", "KeypointRCNNPredictor",
          "RetinaNetClassificationHead", "RetinaNetRegressionHead", "FCOSClassificationHead", "FCOSRegressionHead",
          "SSDClassificationHead", "SSDRegressionHead", "SSDLiteClassificationHead", "SSDLiteRegressionHead")
_ROI_OPS = ("roi_align", "roi_pool")  # channel-preserving region pooling (ps_* mix channels: no rule)


def _is_torchvision_op(op: OpNode, names: tuple[str, ...]) -> bool:
    try:
        ns = op.func._schema.name.split("::")[0]
    except AttributeError:
        return False
    return ns == "torchvision" and op.packet in names


def regions(tr: Trace) -> tuple[dict[str, dict[str, Any]], list[ModuleCall]]:
    """The parts of ``tr`` the op loop takes as a whole: ``(info by name, extra calls)``.

    Module calls (``MultiScaleRoIAlign``) are named by their module; single ops get a call of their
    own named ``<kind@index>`` (extra calls, to add to the trace's calls for the loop)."""
    info: dict[str, dict[str, Any]] = {}
    extra: list[ModuleCall] = []
    covered: list[tuple[int, int]] = []
    taken: set[int] = set()
    for c in tr.module_calls:
        if c.last_op < c.first_op or c.first_op in taken:
            continue
        if c.type in _ROI_MODULES:
            info[c.name] = {"kind": "roi_pool"}
            covered.append((c.first_op, c.last_op))
            taken.add(c.first_op)
        elif c.type in _HEADS and c.name not in info:
            info[c.name] = {"kind": "head"}
            taken.add(c.first_op)
    covered.sort()
    starts = np.array([s for s, _ in covered], dtype=np.int64)
    ends = np.array([e for _, e in covered], dtype=np.int64)

    def inside(i: int) -> bool:
        k = int(np.searchsorted(starts, i, side="right")) - 1
        return k >= 0 and ends[k] >= i

    for op in tr.ops:
        kind = None
        if _is_torchvision_op(op, _ROI_OPS):
            kind = "roi_op"
        else:
            ts = op.tensor_args()
            if ts and op.outputs and all(t.numel == 0 for t in ts) and all(o.numel == 0 for o in op.outputs) \
                    and not any(t.param for t in ts):
                kind = "empty"
        if kind is None or inside(op.index):
            continue
        name = f"<{kind}@{op.index}>"
        info[name] = {"kind": kind}
        extra.append(ModuleCall(name, kind, first_op=op.index, last_op=op.index))
    return info, extra


def _pooled(a: Analyser, ops: list[OpNode], last: int, feats: list[Any], others: list[Any]) -> None:
    """Set the layouts of a pooling region's results: (regions, channels of ``feats``, bins...)."""
    chan: Dim | None = None
    for f in feats:
        d = a.layout(f)[1]
        chan = d if chan is None else a.unite(chan, d)
    for t in others:
        a.freeze(t)
    width = len(chan[0]) if chan is not None and len(chan) == 1 else None
    for op in ops:
        for o in op.outputs:
            if a.last_use.get(o.id, -1) <= last and o.id not in a.output_ids:
                continue
            if chan is not None and len(o.shape) == 4 and o.shape[1] == width:
                a.layouts[o.id] = (a.opaque(o.shape[0]), chan, a.opaque(o.shape[2]), a.opaque(o.shape[3]))
            else:
                a.layouts[o.id] = a.opaque_layout(o.shape)


def roi_pool_call(a: Analyser, call: ModuleCall) -> None:
    """A ``MultiScaleRoIAlign`` call: the feature maps it reads share one channel space, which its
    output (regions x channels x bins) carries; boxes and everything else are frozen."""
    ops = a.tr.ops[call.first_op : call.last_op + 1]
    inside = {o.id for op in ops for o in op.outputs}
    feats: list[Any] = []
    others: list[Any] = []
    seen: set[int] = set()
    for op in ops:
        for t in op.tensor_args():
            if t.id in inside or t.id in seen or not t.is_floating:
                continue
            seen.add(t.id)
            # the maps pooled from are the first argument of roi_align; the rest are boxes
            (feats if _is_torchvision_op(op, _ROI_OPS) and op.args and op.args[0] is t else others).append(t)
    widths = {f.shape[1] for f in feats if len(f.shape) == 4}
    if len(widths) != 1:  # maps of different widths cannot be one space
        feats, others = [], others + feats
    _pooled(a, ops, call.last_op, feats, others)


def roi_op_call(a: Analyser, call: ModuleCall) -> None:
    """One ``torchvision::roi_align`` / ``roi_pool`` op: output channels are the input's."""
    op = a.tr.ops[call.first_op]
    x = op.args[0]
    rest = [t for t in op.tensor_args() if t is not x]
    if len(getattr(x, "shape", ())) != 4:
        return a.opaque_op(op)
    _pooled(a, [op], call.last_op, [x], rest)


def head_call(a: Analyser, call: ModuleCall) -> None:
    """A detection head's call: its ops analysed one by one as usual, then its results frozen (they
    are the interface, read by the data-dependent post-processing: class scores, box coordinates,
    mask classes, keypoint heatmaps). Without this, an example with no detection would leave e.g.
    the keypoint predictor's 17 heatmaps prunable, since nothing downstream ran on them."""
    from torchslim._select import matches
    from torchslim.graph.rules import rule_for  # the op loop's table (rules imports this module)

    ops = a.tr.ops[call.first_op : call.last_op + 1]
    for op in ops:
        single = next((a.mha[n] for n in (f"<roi_op@{op.index}>", f"<empty@{op.index}>") if n in a.mha), None)
        if a.ignore and any(matches(op.module, p) for p in a.ignore):
            a.opaque_op(op)
        elif single is not None:
            HANDLERS[single["kind"]](a, ModuleCall(op.module, single["kind"], op.index, op.index))
        else:
            rule_for(op)(a, op)
    for op in ops:
        for o in op.outputs:
            if a.last_use.get(o.id, -1) > call.last_op or o.id in a.output_ids:
                a.freeze(o)


def empty_call(a: Analyser, call: ModuleCall) -> None:
    """An op on empty tensors only (no values, but a ``(0, 4)`` tensor of boxes still has its 4
    coordinates): each result dim is its inputs' dims of the same rank and size, united (``cat``
    of empty lists, elementwise ops); any other input dim is frozen (views that regroup dims)."""
    op = a.tr.ops[call.first_op]
    ins = [t for t in op.tensor_args() if t.is_floating]
    used: set[tuple[int, int]] = set()
    for o in op.outputs:
        lay = []
        for k, n in enumerate(o.shape):
            d: Dim | None = None
            for t in ins:
                if len(t.shape) == len(o.shape) and t.shape[k] == n:
                    d = a.layout(t)[k] if d is None else a.unite(d, a.layout(t)[k])
                    used.add((t.id, k))
            lay.append(d if d is not None else a.opaque(n))
        a.set(o, tuple(lay))
    for t in ins:
        for k, d in enumerate(a.layout(t)):
            if (t.id, k) not in used:
                a.freeze_dim(d)


HANDLERS = {"roi_pool": roi_pool_call, "roi_op": roi_op_call, "empty": empty_call, "head": head_call}


# ---- surgery: widths torchvision's flow models keep as Python ints --------------------------------
def _conv_out(m: Any) -> int | None:
    w = getattr(m, "weight", None)
    if w is None and hasattr(m, "__getitem__"):
        try:
            w = m[0].weight
        except (IndexError, AttributeError, TypeError):
            return None
    return int(w.shape[0]) if w is not None else None


def sync_vision_attributes(model: Any) -> None:
    """After surgery: the widths RAFT reads in its forward (``UpdateBlock.hidden_state_size``, which
    splits the context encoder's output into hidden state and context) and the ones its blocks
    describe themselves with (``RecurrentBlock.hidden_size``, ``MotionEncoder.out_channels``), from
    their (already sliced) convolutions."""
    for m in model.modules():
        mod = type(m).__module__
        if not mod.startswith("torchvision.models.optical_flow"):
            continue
        kind = type(m).__name__
        if kind == "RecurrentBlock" and hasattr(m, "convgru1"):
            n = _conv_out(m.convgru1.convz)
            if n:
                m.hidden_size = n
        elif kind == "MotionEncoder" and hasattr(m, "conv"):
            n = _conv_out(m.conv)
            if n:
                m.out_channels = n + 2  # the flow's 2 channels are concatenated at the end
    for m in model.modules():  # after the blocks they read
        if type(m).__name__ == "UpdateBlock" and type(m).__module__.startswith("torchvision.models.optical_flow"):
            hidden = getattr(getattr(m, "recurrent_block", None), "hidden_size", None)
            if isinstance(hidden, int):
                m.hidden_state_size = hidden


@contextlib.contextmanager
def fixed_counts(model: Any) -> Iterator[None]:
    """While inside, a torchvision detector's NMS and score thresholds keep every candidate, so its
    RoI heads see fixed counts: MACs and outputs of two models (before / after pruning) compare
    work for work instead of following how many boxes their weights happen to score."""
    saved = []
    for mod, values in ((getattr(model, "rpn", None), {"nms_thresh": 1.0}),
                        (getattr(model, "roi_heads", None), {"nms_thresh": 1.0, "score_thresh": 0.0})):
        for k, v in values.items() if mod is not None else ():
            if hasattr(mod, k):
                saved.append((mod, k, getattr(mod, k)))
                setattr(mod, k, v)
    try:
        yield
    finally:
        for mod, k, v in reversed(saved):
            setattr(mod, k, v)
