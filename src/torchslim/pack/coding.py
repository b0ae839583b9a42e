"""Entropy coding of integer streams: ANS / range coding (constriction) and a canonical Huffman coder.

The tensor layer under :mod:`torchslim.pack`: every stream is a 1-D array of symbols in
``0 .. alphabet-1`` and is coded against its own empirical frequencies, which travel in the
file header (counts for ANS / range coding, code lengths for Huffman), so a decoder rebuilds
exactly the same model.

- ``"ans"``: asymmetric numeral systems (``constriction.stream.stack.AnsCoder``) with a
  categorical model of the counts. Within a fraction of a percent of the empirical entropy on
  streams of a few thousand symbols or more.
- ``"range"``: range coding (``constriction.stream.queue``), same model.
- ``"huffman"``: canonical Huffman codes, as Deep Compression used (at least 1 bit per symbol,
  so it loses to ANS on very skewed streams).

Positions of the non-zeros of a sparse layer are coded as *relative indices*
(:func:`gaps_encode`): the number of zeros skipped before each non-zero, with a filler symbol
``alphabet-1`` meaning "skip ``alphabet-1`` zeros, no weight here" when a gap is larger, as in
the paper (which pads a filler zero weight instead).

Example:
    >>> import numpy as np
    >>> x = np.array([0, 1, 1, 2, 1, 0, 1, 1], dtype=np.int64)
    >>> enc = encode_stream(x, 3, "huffman")
    >>> decode_stream(enc.data, enc.model, len(x), 3, "huffman").tolist()
    [0, 1, 1, 2, 1, 0, 1, 1]
    >>> positions = gaps_decode(gaps_encode(np.array([0, 5, 6]), 4), 4).tolist()
    >>> positions
    [0, 5, 6]
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from torchslim._optional import require
from torchslim.errors import CheckpointError, ConfigError

__all__ = [
    "CODERS",
    "EncodedStream",
    "entropy_bits",
    "encode_stream",
    "decode_stream",
    "huffman_lengths",
    "gaps_encode",
    "gaps_decode",
    "best_gap_bits",
]

CODERS = ("ans", "range", "huffman")


def check_coder(coder: object) -> str:
    """``coder`` if it is one of :data:`CODERS`, else :class:`ConfigError`."""
    if coder not in CODERS:
        raise ConfigError(f"coder must be one of {', '.join(CODERS)}; got {coder!r}")
    return str(coder)


def entropy_bits(symbols: np.ndarray, alphabet: int | None = None) -> float:
    """Empirical (zeroth-order) entropy of a stream, in bits per symbol."""
    counts = np.bincount(np.asarray(symbols, dtype=np.int64), minlength=alphabet or 0)
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return float(-(p * np.log2(p)).sum())


@dataclass
class EncodedStream:
    """A coded stream: ``data`` (bytes) and ``model`` (counts or Huffman code lengths, per symbol)."""

    data: bytes
    model: list[int]


def _check_symbols(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    x = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if x.size and (int(x.min()) < 0 or int(x.max()) >= alphabet):
        raise ConfigError(f"stream symbols must lie in 0..{alphabet - 1}; got {int(x.min())}..{int(x.max())}")
    return x


def encode_stream(symbols: np.ndarray, alphabet: int, coder: str = "ans") -> EncodedStream:
    """Code ``symbols`` (ints in ``0 .. alphabet-1``) against their own empirical frequencies."""
    check_coder(coder)
    x = _check_symbols(symbols, alphabet)
    counts = np.bincount(x, minlength=alphabet)
    if x.size == 0:
        return EncodedStream(b"", [0] * alphabet)
    if coder == "huffman":
        lengths = huffman_lengths(counts)
        return EncodedStream(_huffman_encode(x, lengths), lengths)
    stream = require("constriction", "entropy coding (ts.pack)").stream
    model = stream.model.Categorical(counts.astype(np.float64), perfect=False)
    sym = x.astype(np.int32)
    if coder == "ans":
        enc = stream.stack.AnsCoder()
        enc.encode_reverse(sym, model)
    else:
        enc = stream.queue.RangeEncoder()
        enc.encode(sym, model)
    return EncodedStream(np.asarray(enc.get_compressed(), dtype="<u4").tobytes(), counts.tolist())


def decode_stream(data: bytes, model: list[int], n: int, alphabet: int, coder: str = "ans") -> np.ndarray:
    """Decode ``n`` symbols coded by :func:`encode_stream` (int64 array).

    Raises:
        CheckpointError: the model does not fit the alphabet or the data cannot hold ``n`` symbols.
    """
    check_coder(coder)
    if len(model) != alphabet:
        raise CheckpointError(f"stream model has {len(model)} entries for an alphabet of {alphabet}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if coder == "huffman":
        return _huffman_decode(data, model, n)
    if len(data) % 4:
        raise CheckpointError(f"an {coder} stream must be whole 32-bit words; got {len(data)} bytes")
    counts = np.asarray(model, dtype=np.float64)
    if counts.sum() != n or (counts < 0).any():
        raise CheckpointError(f"stream frequencies sum to {int(counts.sum())}, expected {n} symbols")
    stream = require("constriction", "entropy decoding (ts.unpack)").stream
    cmodel = stream.model.Categorical(counts, perfect=False)
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    try:
        if coder == "ans":
            out = stream.stack.AnsCoder(words).decode(cmodel, n)
        else:
            out = stream.queue.RangeDecoder(words).decode(cmodel, n)
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"{coder} stream cannot be decoded: {exc}") from exc
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------- Huffman


def huffman_lengths(counts: np.ndarray) -> list[int]:
    """Huffman code length of every symbol (0 for symbols that never occur; 1 when only one does)."""
    counts = np.asarray(counts, dtype=np.int64)
    used = [int(s) for s in np.flatnonzero(counts)]
    lengths = [0] * len(counts)
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    heap: list[tuple[int, int, list[int]]] = [(int(counts[s]), s, [s]) for s in used]
    heapq.heapify(heap)
    tie = len(counts)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:  # every merge puts its symbols one level deeper
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def _canonical(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes: symbols ordered by (length, symbol) get consecutive code values."""
    ln = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(ln), dtype=np.uint64)
    order = sorted((int(ln[s]), s) for s in range(len(ln)) if ln[s] > 0)
    code, prev = 0, order[0][0] if order else 0
    for i, (length, s) in enumerate(order):
        if i:
            code = (code + 1) << (length - prev)
        codes[s] = code
        prev = length
    return codes, ln


def _huffman_encode(x: np.ndarray, lengths: list[int]) -> bytes:
    codes, ln = _canonical(lengths)
    sl = ln[x]
    sc = codes[x]
    total = int(sl.sum())
    starts = np.concatenate([[0], np.cumsum(sl)[:-1]])
    bits = np.zeros(total, dtype=np.uint8)
    for b in range(int(sl.max())):  # b-th bit (from the top) of every code that long
        has = sl > b
        shift = (sl[has] - 1 - b).astype(np.uint64)
        bits[starts[has] + b] = ((sc[has] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits).tobytes()


def _huffman_decode(data: bytes, lengths: list[int], n: int) -> np.ndarray:
    codes, ln = _canonical(lengths)
    used = np.flatnonzero(ln)
    if used.size == 0:
        raise CheckpointError("huffman stream has no code lengths")
    max_len = int(ln.max())
    if max_len > 56:
        raise CheckpointError(f"huffman code lengths up to {max_len} bits are not supported (at most 56)")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).astype(np.uint64)
    bits = np.concatenate([bits, np.zeros(max_len, dtype=np.uint64)])
    m = bits.size - max_len
    window = np.zeros(m, dtype=np.uint64)  # the next max_len bits at every bit position
    for j in range(max_len):
        window = (window << np.uint64(1)) | bits[j : j + m]
    # canonical decoding: the length of the code at a position is the smallest l whose
    # left-justified upper limit lies above the window
    order = sorted(used.tolist(), key=lambda s: (int(ln[s]), s))
    sym_sorted = np.asarray(order, dtype=np.int64)
    limits = np.zeros(max_len + 1, dtype=np.uint64)
    first_index = np.zeros(max_len + 1, dtype=np.int64)
    first_code = np.zeros(max_len + 1, dtype=np.uint64)
    i = 0
    for length in range(1, max_len + 1):
        members = [s for s in order if ln[s] == length]
        first_index[length] = i
        first_code[length] = codes[members[0]] if members else 0
        end = (int(codes[members[-1]]) + 1) if members else (int(limits[length - 1]) >> (max_len - length + 1)) << 1
        limits[length] = np.uint64(end << (max_len - length))
        i += len(members)
    code_len = np.searchsorted(limits[1:], window, side="right") + 1
    code_len = np.minimum(code_len, max_len)
    shift = (max_len - code_len).astype(np.uint64)
    rank = (window >> shift).astype(np.int64) - first_code[code_len].astype(np.int64) + first_index[code_len]
    valid = (rank >= 0) & (rank < sym_sorted.size)
    sym_at = np.where(valid, sym_sorted[np.clip(rank, 0, sym_sorted.size - 1)], -1)
    out = np.empty(n, dtype=np.int64)
    pos, cl, sa = 0, code_len.tolist(), sym_at.tolist()
    for k in range(n):
        if pos >= m or sa[pos] < 0:
            raise CheckpointError(f"huffman stream ends or breaks after {k} of {n} symbols")
        out[k] = sa[pos]
        pos += cl[pos]
    return out


# --------------------------------------------------------------------------- relative indices


def gaps_encode(positions: np.ndarray, alphabet: int) -> np.ndarray:
    """Relative-index symbols of increasing non-zero ``positions`` (filler symbol ``alphabet-1``).

    Symbol ``s < alphabet-1``: skip ``s`` zeros, then a non-zero; symbol ``alphabet-1``: skip
    ``alphabet-1`` zeros with no non-zero (a gap too large for one symbol).
    """
    if alphabet < 2:
        raise ConfigError(f"the relative-index alphabet needs at least 2 symbols; got {alphabet}")
    p = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(p, prepend=-1) - 1
    fill = alphabet - 1
    q, r = np.divmod(gaps, fill)
    # each non-zero: q fillers then its remainder
    out = np.full(int(q.sum()) + p.size, fill, dtype=np.int64)
    ends = np.cumsum(q + 1) - 1
    out[ends] = r
    return out


def gaps_decode(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """Positions of the non-zeros from :func:`gaps_encode`'s symbols."""
    s = np.asarray(symbols, dtype=np.int64)
    fill = alphabet - 1
    emit = s != fill
    step = s + emit  # a non-zero advances past its own position too
    before = np.concatenate([[0], np.cumsum(step)[:-1]])
    return (before + s)[emit]


def best_gap_bits(positions: np.ndarray, max_bits: int = 12) -> int:
    """Gap-alphabet bits (1..max_bits) that minimise the estimated coded size of the positions.

    The estimate is the zeroth-order entropy of the symbols plus the frequency table, plus a
    hundredth of a bit per symbol so that, at equal size, the shorter stream (faster to code) wins.
    """
    best, best_cost = 1, float("inf")
    for g in range(1, max_bits + 1):
        sym = gaps_encode(positions, 2**g)
        counts = np.bincount(sym, minlength=2**g)
        cost = sym.size * (entropy_bits(sym) + 0.01) + 16 * int((counts > 0).sum())
        if cost < best_cost:
            best, best_cost = g, cost
    return best
