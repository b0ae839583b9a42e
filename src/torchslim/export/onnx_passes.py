"""Graph passes on ONNX files, in place: rewrites that keep what the graph computes.

* :func:`merge_duplicate_nodes`: common-subexpression elimination that also merges equal
  initializers (the integer writer runs it on every float file it quantizes);
* :func:`avoid_skip_layernorm_fusion`: residual ``Add`` -> ``LayerNormalization`` written as
  ``Sum`` (every integer file torchslim writes gets it).

Both read the file with ``onnx``, change the graph and write it back atomically (a temporary
name, then ``os.replace``) only when something changed; both return how many nodes they changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from torchslim._optional import require
from torchslim._utils import atomic_path

__all__ = ["merge_duplicate_nodes", "avoid_skip_layernorm_fusion"]


def _save_in_place(model: Any, path: Path) -> None:
    onnx = require("onnx", "ONNX graph passes")
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def merge_duplicate_nodes(path: str | os.PathLike[str]) -> int:
    """Common-subexpression elimination on the ONNX file at ``path``, in place; returns the
    number of nodes removed.

    Two nodes merge when they have the same op, domain and attributes and read the same tensors,
    where two initializers with equal type, shape and bytes count as the same tensor. This is
    what makes the three SmoothQuant divisions of Q, K and V (one shared scale, three buffers)
    one Div, which ONNX Runtime's own CSE does not do (it compares initializers by name).
    Nodes with subgraphs or several outputs are left alone.
    """
    onnx = require("onnx", "ONNX graph passes")
    from onnx import numpy_helper

    path = Path(path)
    model = onnx.load(str(path))
    graph = model.graph
    digest = {
        i.name: f"init:{i.data_type}:{list(i.dims)}:" + hashlib.sha1(numpy_helper.to_array(i).tobytes()).hexdigest()
        for i in graph.initializer
    }
    rename: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}
    keep = []
    for node in graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        if len(node.output) != 1 or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            keep.append(node)
            continue
        key = (
            node.op_type, node.domain, tuple(digest.get(x, x) for x in node.input),
            tuple(a.SerializeToString(deterministic=True) for a in node.attribute),
        )
        if key in first and node.output[0] not in {o.name for o in graph.output}:
            rename[node.output[0]] = first[key]
            continue
        first.setdefault(key, node.output[0])
        keep.append(node)
    removed = len(graph.node) - len(keep)
    if removed:
        del graph.node[:]
        graph.node.extend(keep)
        kept_vi = [v for v in graph.value_info if v.name not in rename]
        del graph.value_info[:]
        graph.value_info.extend(kept_vi)
        used = {x for n in graph.node for x in n.input}
        live = [i for i in graph.initializer if i.name in used or i.name in {o.name for o in graph.output}]
        del graph.initializer[:]
        graph.initializer.extend(live)
        _save_in_place(model, path)
    return removed


def avoid_skip_layernorm_fusion(path: str | os.PathLike[str]) -> int:
    """Turn every ``Add`` whose only reader is a ``LayerNormalization`` into a two-input ``Sum``,
    in place; return how many.

    The two ops compute the same thing, but ONNX Runtime's CPU provider fuses ``Add`` +
    ``LayerNormalization`` on 3-D tensors into its ``SkipLayerNormalization`` kernel, which runs
    several times slower than the two ops it replaces (ORT 1.32, one thread: 0.89 ms against
    0.13 ms at 32 x 14 x 384, 27 us against 9 us at 1 x 11 x 384; the residual adds of a post-LN
    BERT are all of this shape). Its fusion matches ``Add`` only, so a ``Sum`` keeps the fast
    pair: all-MiniLM-L6-v2's int8 file runs 10-20% faster (``benchmarks/quantize_minilm.py``).
    Used on the integer files torchslim writes (ONNX Runtime CPU kernels); the fp32 file keeps
    the plain graph (other execution providers do gain from the fused kernel).
    """
    onnx = require("onnx", "ONNX graph passes")

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)  # nodes only: weights stored beside stay there
    graph = model.graph
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for x in node.input:
            readers.setdefault(x, []).append(node)
    outputs = {o.name for o in graph.output}
    changed = 0
    for node in graph.node:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        after = readers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "LayerNormalization" and after[0].input[0] == node.output[0] \
                and node.output[0] not in outputs:
            node.op_type = "Sum"  # same broadcasting (multidirectional) and types as Add
            changed += 1
    if changed:
        _save_in_place(model, path)
    return changed
