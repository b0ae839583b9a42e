"""Bit-packing of ±1 tensors: 32 or 64 signs to a machine word, and back, exactly.

Layout: the last dimension is packed; bit ``j`` (least significant first) of word ``w`` holds
element ``w * B + j`` of that row (``B`` = 32 or 64), 1 for ``+1`` and 0 for ``-1``; the last
word of a row is padded with zero bits. Words are ``torch.int32`` (B = 32) or ``torch.int64``
(B = 64), signed only because torch has no unsigned 32/64-bit arithmetic: the bits are what
count. Two 32-bit words of a row viewed as one ``int64`` (little-endian) are the 64-bit packing
of the same row, which :func:`as_words64` uses to hand weights to the XNOR kernel.

The sign convention is ``sign(0) = +1`` everywhere in this family (as in BNN and Larq), so
``pack_signs`` of any real tensor packs ``x >= 0``.

Example:
    >>> import torch
    >>> t = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0]])
    >>> w = pack_signs(t)
    >>> w, w.dtype
    (tensor([[25]], dtype=torch.int32), torch.int32)
    >>> torch.equal(unpack_signs(w, 5), t)
    True
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from torchslim.errors import CheckpointError, ConfigError

__all__ = [
    "WORD_BITS",
    "word_dtype",
    "packed_words",
    "pack_signs",
    "unpack_signs",
    "as_words64",
    "check_packed",
    "packed_bytes",
]

WORD_BITS = (32, 64)
_DTYPES = {32: torch.int32, 64: torch.int64}


def word_dtype(word_bits: int) -> torch.dtype:
    """``torch.int32`` for 32-bit words, ``torch.int64`` for 64-bit words.

    Raises:
        ConfigError: ``word_bits`` is not 32 or 64.
    """
    if word_bits not in _DTYPES or isinstance(word_bits, bool):
        raise ConfigError(f"word_bits must be 32 or 64; got {word_bits!r}")
    return _DTYPES[word_bits]


def packed_words(k: int, word_bits: int = 32) -> int:
    """Words needed for ``k`` signs: ``ceil(k / word_bits)``."""
    word_dtype(word_bits)
    return -(-int(k) // word_bits)


_BYTE_PLACES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_LITTLE = sys.byteorder == "little"


def _place_values(word_bits: int, device: torch.device) -> torch.Tensor:
    # 2**j as a signed word; 2**(B-1) is the sign bit, i.e. -2**(B-1) (no overflow when summed:
    # the other bits of a word add up to less than 2**(B-1))
    vals = [1 << j for j in range(word_bits - 1)] + [-(1 << (word_bits - 1))]
    return torch.tensor(vals, dtype=word_dtype(word_bits), device=device)


def pack_signs(t: torch.Tensor, word_bits: int = 32) -> torch.Tensor:
    """Pack the signs of ``t``'s last dimension, ``word_bits`` to a word.

    Args:
        t: any real tensor with at least one dimension; ``t >= 0`` becomes bit 1 (``+1``).
        word_bits: 32 (``int32`` words) or 64 (``int64`` words).

    Returns:
        Words of shape ``(*t.shape[:-1], ceil(t.shape[-1] / word_bits))`` on ``t``'s device.

    Raises:
        ConfigError: a 0-d tensor or a bad ``word_bits``.
    """
    dtype = word_dtype(word_bits)
    if t.dim() == 0:
        raise ConfigError("pack_signs needs a tensor with at least one dimension; got a scalar")
    k = t.shape[-1]
    n = packed_words(k, word_bits)
    pad = n * word_bits - k
    if _LITTLE:  # 8 bits to a byte, then the bytes of a row viewed as words (least significant first)
        bits = (t.detach() >= 0).to(torch.uint8)
        if pad:
            bits = F.pad(bits, (0, pad))
        by = (bits.reshape(*t.shape[:-1], n * word_bits // 8, 8) * _BYTE_PLACES.to(t.device)).sum(dim=-1, dtype=torch.uint8)
        return by.view(dtype)
    bits = (t.detach() >= 0).to(dtype)
    if pad:
        bits = F.pad(bits, (0, pad))
    bits = bits.reshape(*t.shape[:-1], n, word_bits)
    return (bits * _place_values(word_bits, t.device)).sum(dim=-1, dtype=dtype)


def unpack_signs(words: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``±1`` tensor (last dimension ``k``) that :func:`pack_signs` packed into ``words``.

    Raises:
        ConfigError: ``words`` is not int32/int64, or has not ``ceil(k / word_bits)`` words per row.
    """
    word_bits = _word_bits_of(words)
    if words.dim() == 0 or words.shape[-1] != packed_words(k, word_bits):
        raise ConfigError(
            f"{k} signs take {packed_words(k, word_bits)} {word_bits}-bit words per row; "
            f"got words of shape {tuple(words.shape)}"
        )
    shifts = torch.arange(word_bits, device=words.device, dtype=words.dtype)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*words.shape[:-1], -1)[..., :k]
    return bits.to(dtype) * 2 - 1


def _word_bits_of(words: torch.Tensor) -> int:
    for bits, dt in _DTYPES.items():
        if words.dtype == dt:
            return bits
    raise ConfigError(f"packed words must be int32 or int64; got {words.dtype}")


def as_words64(words: torch.Tensor) -> torch.Tensor:
    """The 64-bit packing of the same rows (32-bit words are paired up, exact; a copy if needed)."""
    if _word_bits_of(words) == 64:
        return words.contiguous()
    if words.shape[-1] % 2:
        words = F.pad(words, (0, 1))
    return words.contiguous().view(torch.int64)


def check_packed(words: torch.Tensor, rows: int, k: int, word_bits: int, what: str = "packed weight") -> None:
    """Check that ``words`` holds ``rows`` rows of ``k`` signs in ``word_bits``-bit words.

    Raises:
        CheckpointError: wrong dtype or shape, or padding bits that are not zero (a corrupt file).
    """
    expected = (rows, packed_words(k, word_bits))
    dtype = word_dtype(word_bits)
    if words.dtype != dtype or tuple(words.shape) != expected:
        raise CheckpointError(
            f"{what} should be {dtype} words of shape {expected} ({rows} rows of {k} signs, "
            f"{word_bits} to a word); got {words.dtype} of shape {tuple(words.shape)}"
        )
    pad = expected[1] * word_bits - k
    if pad and rows:
        last = words[:, -1]
        used = word_bits - pad
        if bool(((last >> used) & ((1 << pad) - 1)).ne(0).any()):
            raise CheckpointError(f"{what} is corrupt: padding bits beyond the {k} signs of a row are set")


def packed_bytes(rows: int, k: int, word_bits: int = 32) -> int:
    """Bytes of ``rows`` rows of ``k`` packed signs (no scales)."""
    return rows * packed_words(k, word_bits) * word_bits // 8

