"""``QuantizedEmbedding``: an ``nn.Embedding`` whose table is stored as int4 or int8 integers.

Group-wise symmetric scales along the hidden axis; :func:`float_embedding` is its float twin.
A table that scales its output (Gemma's ``*ScaledWordEmbedding``: rows times ``sqrt(hidden)``)
keeps that factor as ``embed_scale``; the stored integers are the unscaled table's.

:class:`TiedQuantizedHead` is the ``lm_head`` of a model whose output projection is tied to its
token table (SmolLM2, Gemma-3): it multiplies by that one quantized table instead of a second
copy of it, so the table is stored once (Gemma-3-270M's 262k x 640 table is 63% of its weights).

Int4 tables ship in ONNX as ONNX Runtime's ``GatherBlockQuantized`` holding these very integers
(:mod:`torchslim.quantize.onnx_lowering`, written by :mod:`torchslim.export.onnx_nbits`).

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

import math

import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.quantize.primitives import (
    QScheme,
    choose_qparams,
    int8_blocks,
    minmax,
    pack_int4,
    quantize,
    unpack_int4,
)

__all__ = ["QuantizedEmbedding", "TiedQuantizedHead", "embedding_scale", "float_embedding"]

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)


# --------------------------------------------------------------------------- QuantizedEmbedding


def embedding_scale(emb: nn.Module) -> float | None:
    """The factor a token table multiplies its rows by in ``forward``: 1.0 for a plain
    ``nn.Embedding``, ``sqrt(hidden)`` for transformers' ``*ScaledWordEmbedding`` (Gemma), None for
    any other subclass (its forward is unknown, so its table is not quantized)."""
    if type(emb) is nn.Embedding:
        return 1.0
    if isinstance(emb, nn.Embedding) and type(emb).__name__.endswith("ScaledWordEmbedding"):
        scale = getattr(emb, "scalar_embed_scale", None)
        if scale is None and isinstance(getattr(emb, "embed_scale", None), torch.Tensor):
            scale = emb.embed_scale
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            scale = float(scale)
        return float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None
    return None


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
    looks up and returns float32, times ``embed_scale`` (a Python float, 1.0 unless the float
    table scaled its rows: Gemma; not in the state dict, the rebuilt model gives it again).

    ``QuantizedEmbedding(num_embeddings, embedding_dim, scheme, padding_idx)`` builds the empty
    structure (zeros / unit scales) for loading a state dict; :meth:`from_float` quantizes a table.

    Raises:
        ConfigError: bits not 4 or 8, not a symmetric signed group scheme, or a group size that
            does not divide ``embedding_dim``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: QScheme, padding_idx: int | None = None,
                 embed_scale: float = 1.0) -> None:
        super().__init__()
        self.embed_scale = float(embed_scale)
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
        factor = embedding_scale(emb)
        if factor is None:
            raise ConfigError(f"QuantizedEmbedding quantizes nn.Embedding or a *ScaledWordEmbedding; got {type(emb).__name__} "
                              "(its forward is unknown)")
        w = emb.weight.detach().float()
        rows, cols = w.shape
        q = cls(rows, cols, scheme, emb.padding_idx, factor).to(w.device)
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
        if self.embed_scale != 1.0:
            out = out * torch.tensor(self.embed_scale, dtype=out.dtype)
        return out.reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        s = self.scheme
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        scaled = f", embed_scale={self.embed_scale:.6g}" if self.embed_scale != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int{s.bits} group={s.group_size}{pad}{scaled}"


class TiedQuantizedHead(nn.Module):
    """An output projection tied to a :class:`QuantizedEmbedding`: ``logits = x @ table.T`` with
    the table's own integers and scales, so the table is stored once.

    The table is referenced, not registered as a submodule: the head has no state of its own
    (``lm_head.*`` is absent from the state dict), and ``ts.load`` ties it again (the quantize
    plan's ``tied_heads``). ``forward`` dequantizes ``rows_per_chunk`` rows at a time (a 262k-row
    table is never materialized in float); the output is in the input's dtype. With
    ``act_block=B`` the input is first rounded to int8 per block of ``B`` (what ONNX Runtime's
    ``MatMulNBits`` does at ``accuracy_level=4``, the only level at which its 8-bit kernel is fast:
    about 1.4 ms against 125 ms at levels 0-3 for a 49,152 x 576 head, onnxruntime 1.32, 1 thread).

    Example:
        >>> import torch
        >>> from torchslim.quantize.primitives import QScheme
        >>> emb = torch.nn.Embedding(100, 64)
        >>> q = QuantizedEmbedding.from_float(emb, QScheme(bits=8, granularity="group", group_size=32))
        >>> head = TiedQuantizedHead(q, rows_per_chunk=30)
        >>> x = torch.randn(2, 3, 64)
        >>> bool(torch.allclose(head(x), x @ q.dequantized_weight().T, atol=1e-5)), len(head.state_dict())
        (True, 0)
    """

    def __init__(self, table: QuantizedEmbedding, rows_per_chunk: int = 16384, act_block: int = 0) -> None:
        super().__init__()
        if not isinstance(table, QuantizedEmbedding):
            raise ConfigError(f"TiedQuantizedHead needs a QuantizedEmbedding; got {type(table).__name__}")
        if isinstance(rows_per_chunk, bool) or not isinstance(rows_per_chunk, int) or rows_per_chunk < 1:
            raise ConfigError(f"rows_per_chunk must be a positive integer; got {rows_per_chunk!r}")
        if isinstance(act_block, bool) or not isinstance(act_block, int) or act_block < 0 or (act_block and table.embedding_dim % act_block):
            raise ConfigError(f"act_block must be 0 (float inputs) or divide the table's width {table.embedding_dim}; got {act_block!r}")
        self.__dict__["_table"] = table  # a reference, not a submodule: the table's tensors are stored once
        self.rows_per_chunk = rows_per_chunk
        self.act_block = act_block  # > 0: inputs rounded to int8 per block of this many, as MatMulNBits at level 4
        self.in_features, self.out_features = table.embedding_dim, table.num_embeddings

    @property
    def table(self) -> QuantizedEmbedding:
        """The quantized token table this head multiplies by."""
        return self.__dict__["_table"]

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 ``(vocabulary, hidden)`` weight: the table's (without its ``embed_scale``)."""
        return self.table.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.table
        if x.shape[-1] != t.embedding_dim:
            raise ConfigError(f"TiedQuantizedHead expects inputs with {t.embedding_dim} features; got shape {tuple(x.shape)}")
        flat = x.reshape(-1, t.embedding_dim)
        if self.act_block and flat.numel():
            flat = int8_blocks(flat, self.act_block)
        out = flat.new_empty(flat.shape[0], t.num_embeddings)
        for r0 in range(0, t.num_embeddings, self.rows_per_chunk):
            rows = torch.arange(r0, min(r0 + self.rows_per_chunk, t.num_embeddings), device=t.scale.device)
            w = t._dequantize(t._int_rows(rows), t.scale[rows]).to(flat.dtype)
            out[:, r0 : r0 + rows.numel()] = flat @ w.T
        return out.reshape(*x.shape[:-1], t.num_embeddings)

    def extra_repr(self) -> str:
        return (f"tied to a {self.table.num_embeddings} x {self.table.embedding_dim} int{self.table.scheme.bits} table"
                + (f", int8 activations per {self.act_block}" if self.act_block else ""))


def float_embedding(q: QuantizedEmbedding) -> nn.Embedding:
    """The float twin of ``q``: an ``nn.Embedding`` holding the dequantized table (what the int4
    ONNX writer recognizes in the exported graph).

    Raises:
        ConfigError: ``q`` scales its rows (``embed_scale`` != 1: a plain ``nn.Embedding`` cannot).
    """
    if q.embed_scale != 1.0:
        raise ConfigError(f"this quantized table scales its rows by {q.embed_scale:.6g} (Gemma); a plain nn.Embedding twin "
                          "cannot, so it does not lower to GatherBlockQuantized")
    emb = nn.Embedding(q.num_embeddings, q.embedding_dim, padding_idx=q.padding_idx, device=q.scale.device)
    with torch.no_grad():
        emb.weight.copy_(q.dequantized_weight())
    return emb
