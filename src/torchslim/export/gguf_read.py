"""Reading GGUF files: the key/value metadata and tensor infos of the header, and the tensors.

A direct reader of the little-endian GGUF layout (``gguf.GGUFReader`` takes seconds on a 50k-token
vocabulary because it builds one memory-map view per string; this one reads the header pages
only); tensor blocks are expanded by ``gguf.quants.dequantize``. Used by :mod:`torchslim.export.gguf`
(metadata copied from a source file, the round-trip checks) and by tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchslim._optional import require
from torchslim.errors import ConfigError

__all__ = ["gguf_metadata", "gguf_tensor_types", "read_gguf_weights"]


def _gguf() -> Any:
    return require("gguf", "GGUF export")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


_Field = tuple[str, int, Any, "int | None"]  # key, value type, value, array item type
_TensorInfo = tuple[str, tuple[int, ...], int, int]  # name, (rows, cols) shape, GGML type, byte offset in the file


def _read_header(path: Path, tensors: bool = False) -> tuple[list[_Field], list[_TensorInfo]]:
    """Key/value fields (and, with ``tensors``, tensor infos) of a little-endian GGUF file.

    A direct reader: ``gguf.GGUFReader`` takes seconds on a 50k-token vocabulary because it builds
    one memory-map view per string; this one reads the header pages only."""
    import mmap
    import struct

    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise ConfigError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        if not 2 <= version < 256:
            raise ConfigError(f"{path}: GGUF version {version} (big-endian or too old) is not supported")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        fields, pos = _parse_kv(buf, 24, n_kv, path)
        infos: list[_TensorInfo] = []
        if tensors:
            raw = []
            for _ in range(n_tensors):
                (n,) = struct.unpack_from("<Q", buf, pos)
                name = buf[pos + 8:pos + 8 + n].decode("utf-8")
                pos += 8 + n
                (n_dims,) = struct.unpack_from("<I", buf, pos)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
                ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
                pos += 4 + 8 * n_dims + 12
                raw.append((name, tuple(int(d) for d in reversed(dims)), int(ttype), int(offset)))
            align = next((int(v) for k, _, v, _ in fields if k == "general.alignment"), 32)
            start = -(-pos // align) * align
            infos = [(name, shape, ttype, start + offset) for name, shape, ttype, offset in raw]
        return fields, infos
    finally:
        buf.close()


def _read_kv(path: Path) -> list[_Field]:
    return _read_header(path)[0]


def _parse_kv(buf: Any, pos: int, n_kv: int, path: Path) -> tuple[list[_Field], int]:
    import struct

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return buf[pos - n:pos].decode("utf-8", errors="replace")

    def scalar(t: int) -> Any:
        nonlocal pos
        fmt = _SCALARS[t]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    out: list[tuple[str, int, Any, int | None]] = []
    for _ in range(n_kv):
        key = string()
        (t,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if t == _STRING:
            out.append((key, t, string(), None))
        elif t == _ARRAY:
            sub, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if sub == _STRING:
                value: Any = [string() for _ in range(n)]
            elif sub in _SCALARS:
                dtype = np.dtype(_SCALARS[sub])
                value = np.frombuffer(buf, dtype=dtype, count=n, offset=pos).tolist()  # copies out of the map
                pos += n * dtype.itemsize
            else:
                raise ConfigError(f"{path}: nested array under {key!r} is not supported")
            out.append((key, t, value, sub))
        elif t in _SCALARS:
            out.append((key, t, scalar(t), None))
        else:
            raise ConfigError(f"{path}: unknown GGUF value type {t} under {key!r}")
    return out, pos


def read_gguf_weights(path: str | os.PathLike[str], *, dequantize: bool = True,
                      names: Any = None) -> dict[str, torch.Tensor]:
    """The tensors of a GGUF file by name (all, or those in ``names``), in PyTorch's ``(rows, cols)`` order.

    With ``dequantize=True`` (default) each is float32 (Q4_0 / Q8_0 / F16 blocks expanded by
    ``gguf.quants.dequantize``); with ``False`` the raw block bytes (uint8 ``(rows, bytes per
    row)``) or the float data. Q / K rows stay in the file's (llama.cpp) order.
    """
    gguf = _gguf()
    _, infos = _read_header(Path(path), tensors=True)
    wanted = None if names is None else set(names)
    out: dict[str, torch.Tensor] = {}
    for name, shape, ttype, offset in infos:
        if wanted is not None and name not in wanted:
            continue
        qtype = gguf.GGMLQuantizationType(ttype)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        data = np.fromfile(path, dtype=np.uint8, count=int(np.prod(byte_shape)), offset=offset).reshape(byte_shape)
        if dequantize:
            data = gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False)
        elif qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = data.view(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
        out[name] = torch.from_numpy(np.ascontiguousarray(data))
    if wanted is not None and wanted - set(out):
        raise ConfigError(f"{path} has no tensors {sorted(wanted - set(out))}")
    return out


def gguf_tensor_types(path: str | os.PathLike[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (GGML type name, (rows, cols) shape)}`` of every tensor of a GGUF file, in file order."""
    gguf = _gguf()
    _, infos = _read_header(Path(path), tensors=True)
    return {name: (gguf.GGMLQuantizationType(t).name, shape) for name, shape, t, _ in infos}


def gguf_metadata(path: str | os.PathLike[str], *, arrays: bool = False) -> dict[str, Any]:
    """The key/value metadata of a GGUF file; arrays longer than 64 items (the tokenizer's tokens,
    merges...) are replaced by their length unless ``arrays=True``."""
    return {k: (len(v) if sub is not None and not arrays and len(v) > 64 else v) for k, _, v, sub in _read_kv(Path(path))}
