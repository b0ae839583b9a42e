"""Compressed storage of sparse weights: bitmask or CSR inside the model's own state dict.

:func:`attach_sparse_storage` registers a state-dict hook on a module so that
``module.state_dict()`` (hence ``ts.save``'s ``model.safetensors`` and the profiler's file size)
holds a sparse weight as

- ``bitmask``: ``NAME::bitmask`` (one bit per weight, uint8) + ``NAME::values`` (the non-zeros);
- ``csr``: ``NAME::crow`` (int32 row offsets) + ``NAME::col`` (int16 when the matrix has at
  most 32,767 columns, else int32) + ``NAME::values``, over the ``(out, -1)`` matrix;
- ``dense``: the tensor as it is.

``auto`` picks the smallest of the three, tensor by tensor, every time it writes (so a weight
that became dense again is stored dense). A load pre-hook decodes those keys back into the
dense tensor, so ``load_state_dict`` (and ``ts.load``, after the sparsify plan replays the hooks)
gets exactly the same values.

Example:
    >>> import torch
    >>> t = torch.tensor([[0.0, 1.5, 0.0, 0.0], [2.0, 0.0, 0.0, -1.0]])
    >>> parts = encode(t, "bitmask")
    >>> sorted(parts), parts["bitmask"].dtype
    (['bitmask', 'values'], torch.uint8)
    >>> torch.equal(decode(parts, t.shape, t.dtype), t)
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from torchslim.errors import CheckpointError, ConfigError

__all__ = ["FORMATS", "encode", "decode", "encoded_bytes", "best_format", "attach_sparse_storage", "detach_sparse_storage", "sparse_storage"]

FORMATS = ("auto", "bitmask", "csr", "dense")
SEP = "::"
_ATTR = "_torchslim_sparse_storage"
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _col_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32


def encoded_bytes(t: torch.Tensor, fmt: str) -> int:
    """Bytes ``t`` takes in format ``fmt`` (``"bitmask"``, ``"csr"`` or ``"dense"``)."""
    n, es = t.numel(), t.element_size()
    if fmt == "dense":
        return n * es
    nnz = int(torch.count_nonzero(t))
    if fmt == "bitmask":
        return math.ceil(n / 8) + nnz * es
    rows = t.shape[0] if t.dim() >= 1 else 1
    cols = n // max(rows, 1)
    return (rows + 1) * 4 + nnz * (es + torch.empty((), dtype=_col_dtype(cols)).element_size())


def best_format(t: torch.Tensor) -> str:
    """The format among bitmask, csr and dense in which ``t`` takes the fewest bytes."""
    sizes = {fmt: encoded_bytes(t, fmt) for fmt in ("dense", "bitmask", "csr")}
    return min(sizes, key=lambda f: sizes[f])


def encode(t: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Parts of ``t`` in ``fmt`` (``{}`` means: store it dense, unchanged)."""
    if fmt == "auto":
        fmt = best_format(t)
    if fmt == "dense" or t.numel() == 0:
        return {}
    flat = t.detach().reshape(-1)
    if fmt == "bitmask":
        nz = flat != 0
        pad = (-flat.numel()) % 8
        bits = torch.cat([nz, nz.new_zeros(pad)]).reshape(-1, 8).to(torch.uint8)
        packed = (bits * _BITS.to(bits.device)).sum(dim=1, dtype=torch.uint8)
        return {"bitmask": packed, "values": flat[nz].contiguous()}
    if fmt == "csr":
        mat = t.detach().reshape(t.shape[0], -1) if t.dim() >= 1 else flat.reshape(1, -1)
        nz = mat != 0
        counts = nz.sum(dim=1)
        crow = torch.zeros(mat.shape[0] + 1, dtype=torch.int32, device=mat.device)
        crow[1:] = torch.cumsum(counts, 0)
        cols = nz.nonzero()[:, 1]  # row-major order
        return {"crow": crow, "col": cols.to(_col_dtype(mat.shape[1])), "values": mat[nz].contiguous()}
    raise ConfigError(f"sparse storage format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def decode(parts: dict[str, torch.Tensor], shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The dense tensor of ``shape`` that :func:`encode` turned into ``parts``."""
    n = math.prod(shape)
    values = parts["values"].to(dtype)
    if "bitmask" in parts:
        packed = parts["bitmask"]
        bits = (packed.unsqueeze(1) & _BITS.to(packed.device)).ne(0).reshape(-1)[:n]
        out = torch.zeros(n, dtype=dtype, device=values.device)
        if int(bits.sum()) != values.numel():
            raise CheckpointError(f"sparse weight is corrupt: bitmask has {int(bits.sum())} ones, {values.numel()} values")
        out[bits.to(values.device)] = values
        return out.reshape(shape)
    if "crow" in parts:
        rows = parts["crow"].numel() - 1
        cols = n // max(rows, 1)
        crow = parts["crow"].to(torch.int64)
        if int(crow[-1]) != values.numel():
            raise CheckpointError(f"sparse weight is corrupt: CSR rows hold {int(crow[-1])} entries, {values.numel()} values")
        row_of = torch.repeat_interleave(torch.arange(rows, device=crow.device), crow.diff())
        out = torch.zeros(rows, cols, dtype=dtype, device=values.device)
        out[row_of.to(values.device), parts["col"].to(torch.int64).to(values.device)] = values
        return out.reshape(shape)
    raise CheckpointError(f"sparse weight parts {sorted(parts)} are neither bitmask nor csr")


def _state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for name, fmt in getattr(module, _ATTR, {}).items():
        key = prefix + name
        t = state_dict.get(key)
        if t is None:
            continue
        parts = encode(t, fmt)
        if parts:
            del state_dict[key]
            for part, value in parts.items():
                state_dict[f"{key}{SEP}{part}"] = value


def _load_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for name in getattr(module, _ATTR, {}):
        key = prefix + name
        if key in state_dict:
            continue
        parts = {p: state_dict[f"{key}{SEP}{p}"] for p in ("bitmask", "crow", "col", "values") if f"{key}{SEP}{p}" in state_dict}
        if not parts:
            continue  # let load_state_dict report the missing key
        target = getattr(module, name)
        state_dict[key] = decode(parts, target.shape, target.dtype)
        for p in parts:
            del state_dict[f"{key}{SEP}{p}"]


def attach_sparse_storage(module: nn.Module, names: list[str] | tuple[str, ...], fmt: str = "auto") -> None:
    """Store ``module``'s tensors ``names`` compressed in its state dict from now on.

    Raises:
        ConfigError: unknown format.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"sparse storage format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    table = module.__dict__.get(_ATTR)
    if table is None:
        table = {}
        module.__dict__[_ATTR] = table
        module.__dict__[_ATTR + "_handles"] = (
            module.register_state_dict_post_hook(_state_dict_hook),
            module.register_load_state_dict_pre_hook(_load_pre_hook),
        )
    for name in names:
        table[name] = fmt


def detach_sparse_storage(module: nn.Module) -> None:
    """Go back to dense storage for ``module``."""
    for handle in module.__dict__.pop(_ATTR + "_handles", ()):
        handle.remove()
    module.__dict__.pop(_ATTR, None)


def sparse_storage(module: nn.Module) -> dict[str, str]:
    """Tensor name -> storage format of ``module`` (empty when stored dense)."""
    return dict(module.__dict__.get(_ATTR, {}))
