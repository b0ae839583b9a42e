"""GGUF's Q4_0 / Q8_0 grids: the QScheme that lands on them, ggml's own rounding, the block bytes.

A Q4_0 block holds 32 weights as ``(q - 8) * d``, ``q`` in ``0..15`` and one fp16 ``d``; a Q8_0
block ``q * d``, ``q`` in ``[-127, 127]``. :func:`gguf_scheme` gives the QScheme fields whose
torchslim weights are such blocks exactly (symmetric, signed, groups of 32: torchslim's scale
rule ``max|w| / 7.5`` differs from ggml's ``w_max / -8``, the grid does not);
:func:`ggml_quantize` is ggml's reference rounding (bit-identical to ``gguf.quants.quantize``);
:func:`encode_blocks` lays integers and scales out as GGUF block bytes. Used by
:mod:`torchslim.export.gguf`, which writes whole models.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torchslim.errors import ConfigError

__all__ = ["QBLOCK", "encode_blocks", "ggml_quantize", "gguf_scheme"]

QBLOCK = 32  # elements per Q4_0 / Q8_0 block


def gguf_scheme(kind: str) -> dict[str, Any]:
    """The QScheme fields whose quantized weights are exact GGUF blocks of type ``kind``.

    ``"q4_0"``: 4-bit symmetric signed, groups of 32 (integers ``[-8, 7]``); ``"q8_0"``: 8-bit
    symmetric signed, groups of 32. Build the scheme with
    ``torchslim.quantize.primitives.QScheme(**gguf_scheme("q4_0"))`` (the export package sits below
    the quantize family and returns plain fields). Any method using it (RTN, GPTQ, AWQ...) gives
    weights :func:`export_gguf` writes without requantizing; the scale rule differs from ggml's
    (see the module doc), not the grid.

    Example:
        >>> gguf_scheme("q4_0")
        {'bits': 4, 'symmetric': True, 'signed': True, 'granularity': 'group', 'group_size': 32}
    """
    bits = {"q4_0": 4, "q8_0": 8}.get(str(kind).lower()) if isinstance(kind, str) else None
    if bits is None:
        raise ConfigError(f"gguf_scheme: kind must be 'q4_0' or 'q8_0'; got {kind!r}")
    return {"bits": bits, "symmetric": True, "signed": True, "granularity": "group", "group_size": QBLOCK}


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), written as ``gguf.quants.np_roundf`` computes it."""
    a = x.abs()
    floored = torch.floor(a)
    return a.sub_(floored).mul_(2).floor_().add_(floored).mul_(torch.sign(x))


def ggml_quantize(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's reference quantization of a ``(rows, cols)`` weight (``cols % 32 == 0``) to Q4_0 / Q8_0.

    Returns ``(ints, scales)``: int8 ``(rows, cols)`` (``[-8, 7]`` for Q4_0, ``[-127, 127]`` for
    Q8_0) and fp16 ``(rows, cols / 32)``, with ``value = ints * scale`` per 32-element block, the
    same numbers ``gguf.quants.quantize`` (and ggml's C code) produce. Q4_0 scales may be negative.

    Example:
        >>> w = torch.tensor([[1.0, -2.0] + [0.5] * 30])
        >>> ints, d = ggml_quantize(w, "q4_0")
        >>> float(d[0, 0]), ints[0, :3].tolist()
        (0.25, [4, -8, 2])
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConfigError(f"ggml_quantize needs a 2-D tensor; got {type(weight).__name__}"
                          f"{'' if not isinstance(weight, torch.Tensor) else ' of shape ' + str(tuple(weight.shape))}")
    if kind not in ("q4_0", "q8_0"):
        raise ConfigError(f"ggml_quantize: kind must be 'q4_0' or 'q8_0'; got {kind!r}")
    rows, cols = weight.shape
    if cols % QBLOCK:
        raise ConfigError(f"ggml_quantize: the row length {cols} is not a multiple of {QBLOCK} (the GGUF block size)")
    blocks = weight.detach().float().reshape(rows, cols // QBLOCK, QBLOCK)
    if kind == "q4_0":
        imax = blocks.abs().argmax(dim=-1, keepdim=True)
        d = torch.gather(blocks, -1, imax) / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(blocks * inv + 8.5).clamp(0, 15) - 8
    else:
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _roundf(blocks * inv)
    return q.to(torch.int8).reshape(rows, cols), d.squeeze(-1).half()


def encode_blocks(ints: torch.Tensor, scales: torch.Tensor, kind: str) -> np.ndarray:
    """GGUF block bytes ``(rows, blocks * block_bytes)`` of integers and fp16 block scales."""
    rows, cols = ints.shape
    nb = cols // QBLOCK
    d = np.ascontiguousarray(scales.to(torch.float16).reshape(rows, nb).numpy()).view(np.uint8).reshape(rows, nb, 2)
    blocks = ints.reshape(rows, nb, QBLOCK)
    if kind == "q4_0":
        q = (blocks.to(torch.int16) + 8).to(torch.uint8)
        body = (q[..., : QBLOCK // 2] | (q[..., QBLOCK // 2:] << 4)).numpy()  # byte j: element j low, j + 16 high
    else:
        body = np.ascontiguousarray(blocks.to(torch.int8).numpy()).view(np.uint8)
    return np.ascontiguousarray(np.concatenate([d, body], axis=-1).reshape(rows, -1))
