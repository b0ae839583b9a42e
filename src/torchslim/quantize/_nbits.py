"""Real int4 ONNX: ONNX Runtime's ``MatMulNBits`` / ``GatherBlockQuantized`` for int4 weight-only layers.

:func:`write_int4_onnx` rewrites the float ONNX of a quantized model's float twin (see
:func:`torchslim.quantize._onnx.float_twin`): every MatMul / Gemm whose constant weight equals the
dequantized weight of an int4 group-wise :class:`~torchslim.quantize.weight_only.QuantizedLinear`
becomes a ``com.microsoft.MatMulNBits`` holding that layer's very integers and scales, and every
Gather on a table equal to an int4 :class:`QuantizedEmbedding`'s becomes a
``com.microsoft.GatherBlockQuantized``. Nothing is re-quantized: the file stores the integers
torchslim chose, so ONNX Runtime computes what the torch quantized model computes, and the
weights take 4 bits (plus one scale per group) instead of 32.

Layers are matched by value, not by name (exporters rename and transpose weights): a node's
weight must equal the layer's dequantized weight exactly.

:class:`QuantizedEmbedding` is the int4 / int8 counterpart of ``nn.Embedding`` (group-wise
symmetric scales along the hidden axis); :func:`float_embedding` is its float twin.

Example:
    >>> import torch
    >>> from torchslim.quantize.primitives import QScheme
    >>> emb = torch.nn.Embedding(100, 64)
    >>> q = QuantizedEmbedding.from_float(emb, QScheme(bits=4, granularity="group", group_size=32))
    >>> q.qweight.dtype, q.qweight.numel(), tuple(q.scale.shape)
    (torch.uint8, 3200, (100, 2))
    >>> idx = torch.tensor([[1, 5, 99]])
    >>> bool(torch.equal(q(idx), q.dequantized_weight()[idx]))
    True
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim._optional import require
from torchslim.errors import ConfigError
from torchslim.quantize.primitives import QScheme, choose_qparams, minmax, pack_int4, quantize, unpack_int4

__all__ = ["QuantizedEmbedding", "float_embedding", "int4_onnx_blocker", "write_int4_onnx"]

_MS = "com.microsoft"
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)
_EXTERNAL_ABOVE = 1_800_000_000  # bytes of tensor data above which the file is saved with external data


# --------------------------------------------------------------------------- QuantizedEmbedding


def _check_embedding_scheme(scheme: QScheme, embedding_dim: int) -> None:
    if not isinstance(scheme, QScheme):
        raise ConfigError(f"QuantizedEmbedding needs a QScheme; got {type(scheme).__name__}")
    if scheme.bits not in (4, 8):
        raise ConfigError(f"QuantizedEmbedding bits must be 4 or 8; got {scheme.bits}")
    if scheme.granularity != "group":
        raise ConfigError(f"QuantizedEmbedding needs granularity='group' (groups along the hidden axis); got {scheme.granularity!r}")
    if not (scheme.symmetric and scheme.signed):
        raise ConfigError(
            "QuantizedEmbedding is symmetric signed only (symmetric=True, signed=True); "
            f"got symmetric={scheme.symmetric}, signed={scheme.signed}"
        )
    if embedding_dim % scheme.group_size:
        raise ConfigError(
            f"QuantizedEmbedding group_size={scheme.group_size} does not divide embedding_dim={embedding_dim}; "
            "use a divisor of the embedding dimension"
        )


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32, positive) rounded *up* to fp16, so that ``x <= result`` and values quantized
    against the stored scale stay within half a step of the original."""
    if bool((x > _FP16_MAX).any()):
        raise ConfigError(
            f"an embedding group's scale {float(x.max()):.4g} exceeds the fp16 range ({_FP16_MAX}); "
            "the table's values are too large for fp16 scales"
        )
    h = x.clamp(min=_FP16_TINY).half()
    low = h.float() < x
    return torch.where(low, torch.nextafter(h, torch.full_like(h, math.inf)), h)


class QuantizedEmbedding(nn.Module):
    """An ``nn.Embedding`` whose table is stored as int4 (two per byte) or int8 integers.

    Groups of ``scheme.group_size`` consecutive columns of a row share one fp16 scale,
    symmetric signed: ``table[r, c] = qweight[r, c] * scale[r, c // group_size]``.

    Buffers: ``qweight`` (int4: ``uint8`` of ``ceil(rows * cols / 2)`` bytes, packed row-major by
    :func:`~torchslim.quantize.primitives.pack_int4`; int8: ``int8`` of shape ``(rows, cols)``) and
    ``scale`` (``float16``, ``(rows, cols / group_size)``). ``forward`` dequantizes only the rows it
    looks up and returns float32.

    ``QuantizedEmbedding(num_embeddings, embedding_dim, scheme, padding_idx)`` builds the empty
    structure (zeros / unit scales) for loading a state dict; :meth:`from_float` quantizes a table.

    Raises:
        ConfigError: bits not 4 or 8, not a symmetric signed group scheme, or a group size that
            does not divide ``embedding_dim``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: QScheme, padding_idx: int | None = None) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ConfigError(f"QuantizedEmbedding needs positive sizes; got num_embeddings={num_embeddings}, embedding_dim={embedding_dim}")
        _check_embedding_scheme(scheme, embedding_dim)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ConfigError(f"padding_idx={padding_idx} is outside [-{num_embeddings}, {num_embeddings - 1}]")
            padding_idx = padding_idx % num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.scheme = scheme
        n = num_embeddings * embedding_dim
        if scheme.bits == 4:
            self.register_buffer("qweight", torch.zeros(math.ceil(n / 2), dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings, embedding_dim // scheme.group_size, dtype=torch.float16))

    @classmethod
    @torch.no_grad()
    def from_float(cls, emb: nn.Embedding, scheme: QScheme) -> QuantizedEmbedding:
        """Round-to-nearest quantization of ``emb``'s table: one scale ``max|x| / half-range`` per
        group, stored as fp16 (rounded up, so no value moves by more than half a step) and used
        as stored to compute the integers.

        Raises:
            ConfigError: see the class doc; also ``max_norm`` embeddings (their forward rewrites
                the table, which an integer table cannot follow).
        """
        if getattr(emb, "max_norm", None) is not None:
            raise ConfigError("QuantizedEmbedding cannot quantize an nn.Embedding with max_norm (its forward renormalizes the table)")
        w = emb.weight.detach().float()
        rows, cols = w.shape
        q = cls(rows, cols, scheme, emb.padding_idx).to(w.device)
        lo, hi = minmax(w, scheme)
        scale, zp = choose_qparams(lo, hi, scheme)  # symmetric signed: max|x| / half-range, zero point 0
        scale = _fp16_at_least(scale)
        ints = quantize(w, scale.float(), zp, scheme)  # int8, (rows, groups, group_size)
        if scheme.bits == 4:
            q.qweight.copy_(pack_int4(ints))
        else:
            q.qweight.copy_(ints.reshape(rows, cols))
        q.scale.copy_(scale.reshape(q.scale.shape))
        return q

    def _int_rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        """The integers of the table rows ``rows`` (all rows when ``None``) as int8 ``(n, cols)``."""
        cols = self.embedding_dim
        if self.scheme.bits == 8:
            return self.qweight if rows is None else self.qweight[rows]
        if rows is None:
            return unpack_int4(self.qweight, self.num_embeddings * cols).reshape(self.num_embeddings, cols)
        if cols % 2 == 0:  # each row is whole bytes: gather the bytes, then split nibbles
            packed = self.qweight.view(self.num_embeddings, cols // 2)[rows]
            nib = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(rows.numel(), cols).to(torch.int8)
        else:  # rows straddle bytes: gather nibble by nibble
            pos = rows.unsqueeze(1) * cols + torch.arange(cols, device=rows.device)
            byte = self.qweight[pos // 2]
            nib = torch.where(pos % 2 == 0, byte & 0xF, byte >> 4).to(torch.int8)
        return torch.where(nib > 7, nib - 16, nib)

    def _dequantize(self, ints: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        g = self.scheme.group_size
        n = ints.shape[0]
        return (ints.float().reshape(n, -1, g) * scale.float().unsqueeze(-1)).reshape(n, self.embedding_dim)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 table ``(num_embeddings, embedding_dim)`` the integers stand for."""
        return self._dequantize(self._int_rows(None), self.scale)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Look up ``idx`` (any shape of integer indices): ``idx.shape + (embedding_dim,)``, float32.
        Only the looked-up rows are dequantized."""
        flat = idx.reshape(-1).long()
        flat = torch.where(flat < 0, flat + self.num_embeddings, flat)
        out = self._dequantize(self._int_rows(flat), self.scale[flat])
        return out.reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        s = self.scheme
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int{s.bits} group={s.group_size}{pad}"


def float_embedding(q: QuantizedEmbedding) -> nn.Embedding:
    """The float twin of ``q``: an ``nn.Embedding`` holding the dequantized table (what
    :func:`write_int4_onnx` recognizes in the exported graph)."""
    emb = nn.Embedding(q.num_embeddings, q.embedding_dim, padding_idx=q.padding_idx, device=q.scale.device)
    with torch.no_grad():
        emb.weight.copy_(q.dequantized_weight())
    return emb


# --------------------------------------------------------------------------- int4 ONNX writer


def int4_onnx_blocker(module: nn.Module) -> str | None:
    """Why ``module`` (a QuantizedLinear or QuantizedEmbedding) cannot ship as int4 ONNX, or
    ``None`` when it can. Eligible: 2-4 bit (stored as int4) group-wise weights whose group size is
    a power of two >= 16 (ONNX Runtime's ``block_size`` rule) dividing the row."""
    from torchslim.quantize.weight_only import QuantizedLinear

    if isinstance(module, QuantizedLinear):
        s, cols = module.scheme, module.in_features
    elif isinstance(module, QuantizedEmbedding):
        s, cols = module.scheme, module.embedding_dim
    else:
        return f"{type(module).__name__} is not a QuantizedLinear or QuantizedEmbedding"
    if s.bits > 4:
        return f"int{s.bits} weights: only int4 (bits <= 4) ships as MatMulNBits / GatherBlockQuantized"
    if s.granularity != "group":
        return f"granularity={s.granularity!r}: the int4 ONNX ops need granularity='group'"
    g = s.group_size
    if g < 16 or g & (g - 1):
        return f"group_size={g}: ONNX Runtime needs a power of two >= 16"
    if cols % g:
        return f"group_size={g} does not divide the row length {cols}"
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
    digests: dict[str, str] = field(default_factory=dict)

    def digest(self, dtype: np.dtype) -> str:
        key = np.dtype(dtype).str
        if key not in self.digests:
            self.digests[key] = _digest(self.weight.astype(dtype))
        return self.digests[key]


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a) + a.dtype.type(0)  # -0.0 -> +0.0: equal values hash equal
    return hashlib.sha1(a.tobytes()).hexdigest()


def _target(name: str, module: nn.Module) -> _Target:
    from torchslim.quantize.weight_only import QuantizedLinear

    if isinstance(module, QuantizedLinear):
        rows, cols = module.out_features, module.in_features
        s = module.scheme
        g = cols // s.group_size
        # dequantized_weight computes (ints - zp) * scale with ints = s + (0 if signed else 8) and zp
        # the stored zero point (0 when symmetric): as a zero point of the unsigned code s + 8 that
        # is zp + (8 if signed else 0)
        z = module.zero_point.detach().float().cpu().reshape(rows, g) if not s.symmetric else torch.zeros(rows, g)
        zp = (z + (8 if s.signed else 0)).round().clamp(0, 15).to(torch.uint8).numpy()
        if bool((zp == 8).all()):
            zp = None
        weight = module.dequantized_weight()
    else:
        assert isinstance(module, QuantizedEmbedding)
        rows, cols = module.num_embeddings, module.embedding_dim
        zp = None
        weight = module.dequantized_weight()
    return _Target(
        names=[name], rows=rows, cols=cols, block=module.scheme.group_size,
        packed=module.qweight.detach().cpu().numpy().reshape(-1),
        scale=module.scale.detach().float().cpu().numpy().reshape(rows, cols // module.scheme.group_size),
        zp=zp, weight=weight.detach().float().cpu().numpy(),
    )


class _Rewriter:
    """State of one :func:`write_int4_onnx` pass over a graph."""

    def __init__(self, onnx: Any, graph: Any, targets: list[_Target], accuracy_level: int = 0) -> None:
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
            K=t.cols, N=t.rows, bits=4, block_size=t.block, accuracy_level=self.accuracy_level,
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
                accuracy_level=self.accuracy_level,
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


def write_int4_onnx(
    model: nn.Module, fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, accuracy_level: int = 0
) -> dict[str, Any]:
    """Write ``out_path``: the float ONNX ``fp32_path`` with its int4 layers as ONNX Runtime int4 ops.

    ``model`` is the quantized torch model and ``fp32_path`` the ONNX export of its float twin
    (``float_twin(model)``, QuantizedEmbedding turned into :func:`float_embedding`), so each
    quantized layer's weight is in the graph as a float initializer equal to its dequantized
    weight. Rewrites (matching by value):

    * MatMul ``(A, B)`` with ``B = W.T`` an initializer (or a ``Transpose`` of ``W``), and Gemm
      ``(A, B, C)`` with ``transA=0`` and ``B = W`` (``transB=1``) or ``W.T``, where ``W`` is an
      eligible QuantizedLinear's (or QuantizedEmbedding's, for a tied head) weight ->
      ``com.microsoft.MatMulNBits`` (``bits=4``, ``block_size`` = group size; ``B`` uint8
      ``(N, K/block, block/2)`` of the unsigned codes ``v + 8``, scales ``(N, K/block)``, packed
      ``zero_points`` only for asymmetric schemes); a Gemm's ``alpha`` becomes a Mul and its bias
      ``beta * C`` an Add;
    * Gather (axis 0) on an initializer equal to an eligible symmetric table ->
      ``com.microsoft.GatherBlockQuantized`` (INT4 data ``(rows, cols)``, scales ``(rows, cols/block)``,
      ``gather_axis=0``, ``quantize_axis=1``).

    ``accuracy_level`` is MatMulNBits' compute type: 0 computes in the activations' float type
    (outputs equal the torch model's), 4 lets ONNX Runtime quantize activations to int8 per block
    and use its integer kernels on CPU (on all-MiniLM-L6-v2 with GPTQ int4 weights: 1.4x faster at
    batch 1 than level 0, mean embedding cosine to the fp32 model 0.9859 against 0.9860).

    Eligibility is :func:`int4_onnx_blocker`. The float weights the replaced nodes read are
    removed unless another node still reads them; the file is written atomically (a temporary
    name, then ``os.replace``); ``fp32_path`` may equal ``out_path``.

    Returns:
        ``{"matmul_nbits": [layer names], "gather_block_quantized": [layer names],
        "left_float": [quantized layers not shipped as int4], "why_float": {layer: reason}}``
        (names as in ``model.named_modules()``, in module order).
    """
    onnx = require("onnx", "int4 ONNX export")
    from torchslim.quantize.weight_only import QuantizedLinear

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]
    why: dict[str, str] = {}
    targets: list[_Target] = []
    by_digest: dict[tuple[Any, ...], _Target] = {}
    with torch.no_grad():
        for name, m in layers:
            reason = int4_onnx_blocker(m)
            if reason is not None:
                why[name] = reason
                continue
            t = _target(name, m)
            key = (t.rows, t.cols, t.block, t.digest(np.dtype(np.float32)), t.packed.tobytes(), t.scale.tobytes(),
                   None if t.zp is None else t.zp.tobytes())
            if key in by_digest:  # the same weight twice (tied layers): one set of integers serves both
                by_digest[key].names.append(name)
            else:
                by_digest[key] = t
                targets.append(t)

    proto = onnx.load(str(fp32_path))
    graph = proto.graph
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level must be 0..4 (MatMulNBits); got {accuracy_level!r}")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    big = sum(len(i.raw_data) for i in graph.initializer) > _EXTERNAL_ABOVE  # past protobuf's 2 GB: external data
    try:
        if big:
            onnx.save(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=out.name + ".data")
        else:
            onnx.save(proto, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

    shipped = rw.shipped
    order = [n for n, _ in layers]
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
