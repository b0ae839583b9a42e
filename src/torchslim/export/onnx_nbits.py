"""Int4 ONNX: ONNX Runtime's ``MatMulNBits`` / ``GatherBlockQuantized`` from stored integers.

:func:`write_nbits_onnx` rewrites a float ONNX file: every MatMul / Gemm whose constant weight
equals the dequantized value of one of the given :class:`Int4Weight` becomes a
``com.microsoft.MatMulNBits`` holding that weight's very integers and scales, and every Gather
on a table equal to a symmetric one becomes a ``com.microsoft.GatherBlockQuantized``. Nothing is
re-quantized: the file stores the integers it was given, so ONNX Runtime computes what the
quantized model computes, and the weights take 4 bits (plus one scale per group) instead of 32.

Weights are matched by value, not by name (exporters rename and transpose weights): a node's
weight must equal the :class:`Int4Weight`'s ``weight`` exactly. This module knows no module
type: a family turns its quantized layers into :class:`Int4Weight` (see
:func:`torchslim.export.onnx_int.register_onnx_lowering`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from torchslim._optional import require
from torchslim._utils import atomic_path
from torchslim.errors import ConfigError

__all__ = ["Int4Weight", "nbits_blocker", "write_nbits_onnx"]

_MS = "com.microsoft"
_EXTERNAL_ABOVE = 1_800_000_000  # bytes of tensor data above which the file is saved with external data


@dataclass(frozen=True, eq=False)
class Int4Weight:
    """A ``(rows, cols)`` weight stored as 4-bit integers in groups of ``block`` along ``cols``.

    Row ``r`` is a Linear layer's output channel or an embedding table's row. The value is
    ``(code - zero_point) * scale`` with ``code = s + 8`` for the signed nibble ``s``.

    Attributes:
        rows, cols, block: the shape and the group size (``cols % block == 0``).
        packed: uint8, ``rows * cols / 2`` bytes row-major, two signed nibbles per byte (the
            low nibble is the even element).
        scale: float32 ``(rows, cols / block)``.
        zero_point: uint8 ``(rows, cols / block)``, the zero point of the unsigned code
            ``s + 8``; ``None`` means 8 everywhere (symmetric).
        weight: float32 ``(rows, cols)``, the dequantized weight as the float graph holds it.
        accuracy_level: the ``MatMulNBits`` compute type that equals the layer: 4 when it rounds
            its input to int8 per block (weight-only ``compute="int8"``), 0 for float inputs.
    """

    rows: int
    cols: int
    block: int
    packed: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    weight: np.ndarray
    accuracy_level: int = 0


def nbits_blocker(block: int, cols: int) -> str | None:
    """Why groups of ``block`` along rows of ``cols`` cannot be ONNX Runtime int4 ops (its
    ``block_size`` rule: a power of two >= 16 dividing the row), or ``None`` when they can."""
    if block < 16 or block & (block - 1):
        return f"group_size={block}: ONNX Runtime needs a power of two >= 16"
    if cols % block:
        return f"group_size={block} does not divide the row length {cols}"
    return None


@dataclass
class _Target:
    """One quantized layer in the common form both ONNX ops take: a ``(rows, cols)`` weight whose
    row ``r`` is the layer's output channel (Linear) or table row (Embedding), grouped along cols."""

    names: list[str]
    rows: int
    cols: int
    block: int
    packed: np.ndarray  # uint8, flat row-major, two signed nibbles s per byte (low = even element)
    scale: np.ndarray  # float32 (rows, cols / block)
    zp: np.ndarray | None  # uint8 (rows, cols / block) zero point of the unsigned code s + 8; None = 8 everywhere
    weight: np.ndarray  # float32 (rows, cols): the dequantized weight, as the twin holds it
    level: int = 0  # MatMulNBits accuracy_level that equals the layer
    digests: dict[str, str] = field(default_factory=dict)

    def digest(self, dtype: np.dtype) -> str:
        key = np.dtype(dtype).str
        if key not in self.digests:
            self.digests[key] = _digest(self.weight.astype(dtype))
        return self.digests[key]


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a) + a.dtype.type(0)  # -0.0 -> +0.0: equal values hash equal
    return hashlib.sha1(a.tobytes()).hexdigest()


def _target(name: str, w: Int4Weight) -> _Target:
    return _Target(names=[name], rows=w.rows, cols=w.cols, block=w.block, packed=np.asarray(w.packed, np.uint8).reshape(-1),
                   scale=np.asarray(w.scale, np.float32).reshape(w.rows, w.cols // w.block),
                   zp=None if w.zero_point is None else np.asarray(w.zero_point, np.uint8),
                   weight=np.asarray(w.weight, np.float32), level=w.accuracy_level)


class _Rewriter:
    """State of one :func:`write_nbits_onnx` pass over a graph."""

    def __init__(self, onnx: Any, graph: Any, targets: list[_Target], accuracy_level: int | None = None) -> None:
        self.onnx, self.graph = onnx, graph
        self.accuracy_level = accuracy_level
        self.inits = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.by_shape: dict[tuple[int, int], list[_Target]] = {}
        for t in targets:
            self.by_shape.setdefault((t.rows, t.cols), []).append(t)
        self.taken = set(self.inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        self.new_inits: list[Any] = []
        self.made: dict[tuple[str, int, str], list[str]] = {}  # (op, id(target), dtype) -> initializer names
        self.dropped_consts: set[str] = set()  # initializers some replaced node read
        self.bypassed: list[Any] = []  # Transpose nodes a replaced node read through
        self.shipped: dict[str, set[str]] = {"matmul_nbits": set(), "gather_block_quantized": set()}

    def level(self, t: _Target) -> int:
        """The target's ``accuracy_level``: the one asked for, else the layer's own."""
        return t.level if self.accuracy_level is None else self.accuracy_level

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def constant(self, name: str) -> tuple[np.ndarray, str, Any] | None:
        """The value of tensor ``name`` when it is an initializer, or a 2-D Transpose of one:
        ``(value, initializer name, transpose node or None)``."""
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name]), name, None
        node = self.producer.get(name)
        if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or node.input[0] not in self.inits:
            return None
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        arr = numpy_helper.to_array(self.inits[node.input[0]])
        if arr.ndim != 2 or (perm and perm[0] != [1, 0]):
            return None
        return arr.T, node.input[0], node

    def match(self, w: np.ndarray, need_symmetric: bool = False) -> _Target | None:
        """The eligible target whose dequantized weight equals ``w`` (rows, cols), if any."""
        if w.ndim != 2 or w.dtype not in (np.float32, np.float16):
            return None
        cands = [t for t in self.by_shape.get(tuple(w.shape), []) if not (need_symmetric and t.zp is not None)]
        if not cands:
            return None
        d = _digest(w)
        for t in cands:
            if t.digest(w.dtype) == d and np.array_equal(t.weight.astype(w.dtype), w):
                return t
        return None

    def _init(self, base: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.new_inits.append(numpy_helper.from_array(arr, name))
        return name

    def nbits_inputs(self, t: _Target, dtype: np.dtype, base: str) -> list[str]:
        """``[B, scales(, zero_points)]`` initializers of a MatMulNBits for ``t``."""
        key = ("MatMulNBits", id(t), np.dtype(dtype).str)
        if key not in self.made:
            g = t.cols // t.block
            b = (t.packed ^ 0x88).reshape(t.rows, g, t.block // 2)  # signed nibble s -> unsigned s + 8
            names = [self._init(base + "_Q4", b), self._init(base + "_scales", t.scale.astype(dtype))]
            if t.zp is not None:
                z = t.zp if g % 2 == 0 else np.concatenate([t.zp, np.zeros((t.rows, 1), np.uint8)], axis=1)
                names.append(self._init(base + "_zero_points", z[:, 0::2] | (z[:, 1::2] << 4)))
            self.made[key] = names
        return self.made[key]

    def gbq_inputs(self, t: _Target, dtype: np.dtype, base: str) -> list[str]:
        """``[data, scales]`` initializers of a GatherBlockQuantized for symmetric ``t``."""
        key = ("GatherBlockQuantized", id(t), np.dtype(dtype).str)
        if key not in self.made:
            name = self.fresh(base + "_Q4")
            self.new_inits.append(
                self.onnx.helper.make_tensor(name, self.onnx.TensorProto.INT4, [t.rows, t.cols], t.packed.tobytes(), raw=True)
            )
            self.made[key] = [name, self._init(base + "_scales", t.scale.astype(dtype))]
        return self.made[key]

    def _ship(self, op: str, t: _Target, const: tuple[np.ndarray, str, Any]) -> None:
        self.shipped[op].update(t.names)
        self.dropped_consts.add(const[1])
        if const[2] is not None:
            self.bypassed.append(const[2])

    def matmul(self, node: Any) -> list[Any] | None:
        const = self.constant(node.input[1])
        if const is None or const[0].ndim != 2:
            return None
        b = const[0]
        t = self.match(b.T)
        if t is None:
            return None
        helper = self.onnx.helper
        ins = [node.input[0], *self.nbits_inputs(t, b.dtype, const[1])]
        new = helper.make_node(
            "MatMulNBits", ins, [node.output[0]], name=(node.name + "_Q4") if node.name else "", domain=_MS,
            K=t.cols, N=t.rows, bits=4, block_size=t.block, accuracy_level=self.level(t),
        )
        self._ship("matmul_nbits", t, const)
        return [new]

    def gemm(self, node: Any) -> list[Any] | None:
        helper = self.onnx.helper
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            return None
        const = self.constant(node.input[1])
        if const is None or const[0].ndim != 2:
            return None
        b = const[0]
        t = self.match(b if attrs.get("transB", 0) else b.T)
        if t is None:
            return None
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] and beta != 0.0 else None
        y, stem = node.output[0], node.name or node.output[0]
        out = y if alpha == 1.0 and bias is None else self.fresh(stem + "_nbits")
        nodes = [
            helper.make_node(
                "MatMulNBits", [node.input[0], *self.nbits_inputs(t, b.dtype, const[1])], [out],
                name=(node.name + "_Q4") if node.name else "", domain=_MS, K=t.cols, N=t.rows, bits=4, block_size=t.block,
                accuracy_level=self.level(t),
            )
        ]
        if alpha != 1.0:
            scaled = y if bias is None else self.fresh(stem + "_alpha")
            nodes.append(helper.make_node("Mul", [out, self._init(stem + "_alpha_value", np.array(alpha, b.dtype))], [scaled]))
            out = scaled
        if bias is not None:
            if beta != 1.0:
                if bias in self.inits:
                    from onnx import numpy_helper

                    bias = self._init(stem + "_beta_bias", (numpy_helper.to_array(self.inits[bias]) * beta).astype(b.dtype))
                else:
                    scaled_bias = self.fresh(stem + "_beta_bias")
                    nodes.append(helper.make_node("Mul", [bias, self._init(stem + "_beta_value", np.array(beta, b.dtype))], [scaled_bias]))
                    bias = scaled_bias
            nodes.append(helper.make_node("Add", [out, bias], [y], name=(node.name + "_bias") if node.name else ""))
        self._ship("matmul_nbits", t, const)
        return nodes

    def gather(self, node: Any) -> list[Any] | None:
        axis = next((self.onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if node.input[0] not in self.inits:
            return None
        const = self.constant(node.input[0])
        assert const is not None
        w = const[0]
        if w.ndim != 2 or axis not in (0, -2):
            return None
        t = self.match(w, need_symmetric=True)
        if t is None:
            return None
        data, scales = self.gbq_inputs(t, w.dtype, const[1])
        new = self.onnx.helper.make_node(
            "GatherBlockQuantized", [data, node.input[1], scales], [node.output[0]], name=(node.name + "_Q4") if node.name else "", domain=_MS,
            gather_axis=0, quantize_axis=1, block_size=t.block,
        )
        self._ship("gather_block_quantized", t, const)
        return [new]


def _used_names(graph: Any, onnx: Any) -> set[str]:
    """Every tensor name read by a node of ``graph`` or of its subgraphs, plus the graph outputs."""
    used = {o.name for o in graph.output}
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(a.g, onnx)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    used |= _used_names(g, onnx)
    return used


def write_nbits_onnx(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    weights: Sequence[tuple[str, Int4Weight | str]],
    *,
    accuracy_level: int | None = None,
) -> dict[str, Any]:
    """Write ``out_path``: the float ONNX ``fp32_path`` with the given int4 weights as ONNX Runtime int4 ops.

    ``weights`` names every quantized layer, in order, with its :class:`Int4Weight` or the reason
    it cannot ship as int4 (a string, reported in ``why_float``). Each weight must be in the
    graph as a float initializer equal to its ``weight``. Rewrites (matching by value):

    * MatMul ``(A, B)`` with ``B = W.T`` an initializer (or a ``Transpose`` of ``W``), and Gemm
      ``(A, B, C)`` with ``transA=0`` and ``B = W`` (``transB=1``) or ``W.T`` ->
      ``com.microsoft.MatMulNBits`` (``bits=4``, ``block_size`` = group size; ``B`` uint8
      ``(N, K/block, block/2)`` of the unsigned codes ``v + 8``, scales ``(N, K/block)``, packed
      ``zero_points`` only for asymmetric weights); a Gemm's ``alpha`` becomes a Mul and its bias
      ``beta * C`` an Add;
    * Gather (axis 0) on an initializer equal to a symmetric weight ->
      ``com.microsoft.GatherBlockQuantized`` (INT4 data ``(rows, cols)``, scales ``(rows, cols/block)``,
      ``gather_axis=0``, ``quantize_axis=1``).

    ``accuracy_level`` is MatMulNBits' compute type: 0 computes in the activations' float type, 4
    lets ONNX Runtime quantize activations to int8 per block and use its integer kernels on CPU
    (on all-MiniLM-L6-v2 with GPTQ int4 weights: 1.4x faster at batch 1 than level 0, mean
    embedding cosine to the fp32 model 0.9859 against 0.9860). ``None`` (default) gives each
    layer its own (:attr:`Int4Weight.accuracy_level`: 4 for layers that compute with int8
    activations, ``compute="int8"``, else 0), so the file computes what the torch model does.

    A weight whose group size breaks :func:`nbits_blocker` stays float. The float weights the
    replaced nodes read are removed unless another node still reads them; the file is written
    atomically (a temporary name, then ``os.replace``); ``fp32_path`` may equal ``out_path``.

    Returns:
        ``{"matmul_nbits": [names], "gather_block_quantized": [names], "left_float": [names not
        shipped as int4], "why_float": {name: reason}}`` (in the order of ``weights``).

    Raises:
        ConfigError: ``accuracy_level`` not None or 0..4.
    """
    onnx = require("onnx", "int4 ONNX export")
    why: dict[str, str] = {}
    targets: list[_Target] = []
    by_digest: dict[tuple[Any, ...], _Target] = {}
    for name, w in weights:
        reason = w if isinstance(w, str) else nbits_blocker(w.block, w.cols)
        if reason is not None:
            why[name] = reason
            continue
        assert isinstance(w, Int4Weight)
        t = _target(name, w)
        key = (t.rows, t.cols, t.block, t.level, t.digest(np.dtype(np.float32)), t.packed.tobytes(), t.scale.tobytes(),
               None if t.zp is None else t.zp.tobytes())
        if key in by_digest:  # the same weight twice (tied layers): one set of integers serves both
            by_digest[key].names.append(name)
        else:
            by_digest[key] = t
            targets.append(t)

    proto = onnx.load(str(fp32_path))
    graph = proto.graph
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level must be None (each layer's own) or 0..4 (MatMulNBits); got {accuracy_level!r}")
    rw = _Rewriter(onnx, graph, targets, accuracy_level)
    nodes: list[Any] = []
    for node in graph.node:
        new = None
        if node.domain in ("", "ai.onnx") and len(node.input) >= 2:
            if node.op_type == "MatMul":
                new = rw.matmul(node)
            elif node.op_type == "Gemm":
                new = rw.gemm(node)
            elif node.op_type == "Gather":
                new = rw.gather(node)
        nodes.extend([node] if new is None else new)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(rw.new_inits)

    # drop the Transposes the new nodes bypassed and the float weights nobody reads any more
    used = _used_names(graph, onnx)
    dead = {n.output[0] for n in rw.bypassed if n.output[0] not in used}
    if dead:
        keep = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in dead)]
        del graph.node[:]
        graph.node.extend(keep)
        used = _used_names(graph, onnx)
    gone = {name for name in rw.dropped_consts if name not in used}
    if gone:
        for container in (graph.initializer, graph.input, graph.value_info):
            keep = [x for x in container if x.name not in gone]
            del container[:]
            container.extend(keep)
    if rw.new_inits and not any(o.domain == _MS for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(_MS, 1))

    out = Path(out_path)
    big = sum(len(i.raw_data) for i in graph.initializer) > _EXTERNAL_ABOVE  # past protobuf's 2 GB: external data
    with atomic_path(out) as tmp:
        if big:
            onnx.save(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=out.name + ".data")
        else:
            onnx.save(proto, str(tmp))

    shipped = rw.shipped
    order = list(dict.fromkeys(n for n, _ in weights))
    done = shipped["matmul_nbits"] | shipped["gather_block_quantized"]
    for name in order:
        if name not in done and name not in why:
            why[name] = "its weight was not found as a MatMul / Gemm / Gather initializer of the fp32 ONNX"
    return {
        "matmul_nbits": [n for n in order if n in shipped["matmul_nbits"]],
        "gather_block_quantized": [n for n in order if n in shipped["gather_block_quantized"]],
        "left_float": [n for n in order if n not in done],
        "why_float": {n: why[n] for n in order if n in why and n not in done},
    }
