"""The ``.tslim`` container: magic, version, a small JSON header, the coded streams, a checksum.

Layout (all integers little-endian)::

    8 bytes   magic b"\\x89TSLIM\\r\\n"
    2 bytes   format version (uint16)
    4 bytes   header length H (uint32)
    4 bytes   CRC-32 of the header bytes
    H bytes   header: zlib-deflated UTF-8 JSON
    ...       payload: the streams, back to back (offsets and lengths in the header)
    4 bytes   CRC-32 of everything before it

The header lists every stream as ``{"name", "offset", "length", "crc32", ...}``; each stream is
checked on its own (so an error names the stream) and the whole file once more. Any truncation
or corruption raises :class:`~torchslim.errors.CheckpointError` naming the file and the check
that failed; a file of a newer format version raises one telling to upgrade torchslim.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchslim.errors import CheckpointError

__all__ = ["MAGIC", "FORMAT", "VERSION", "Container", "read_container", "container_bytes"]

MAGIC = b"\x89TSLIM\r\n"
FORMAT = "torchslim-packed"
VERSION = 1
_PREFIX = struct.Struct("<8sHII")  # magic, version, header length, header crc
_TRAILER = struct.Struct("<I")


@dataclass
class Container:
    """A parsed ``.tslim`` file: the header dict and the raw bytes of each stream by name."""

    header: dict[str, Any]
    streams: dict[str, bytes] = field(default_factory=dict)
    header_bytes: int = 0  # coded size of the header, for size breakdowns


def container_bytes(header: dict[str, Any], streams: dict[str, bytes]) -> tuple[bytes, int]:
    """Serialise ``header`` (stream table filled in here) and ``streams``; returns (file bytes, header size)."""
    table, offset = [], 0
    for name, data in streams.items():
        table.append({"name": name, "offset": offset, "length": len(data), "crc32": zlib.crc32(data)})
        offset += len(data)
    head = dict(header, format=FORMAT, version=VERSION, streams=table)
    raw = zlib.compress(json.dumps(head, separators=(",", ":"), sort_keys=True).encode(), 9)
    body = _PREFIX.pack(MAGIC, VERSION, len(raw), zlib.crc32(raw)) + raw + b"".join(streams.values())
    return body + _TRAILER.pack(zlib.crc32(body)), len(raw)


def read_container(path: str | os.PathLike[str], *, header_only: bool = False) -> Container:
    """Read and verify a ``.tslim`` file.

    Raises:
        CheckpointError: missing file, not a .tslim file, a newer format version, truncated,
            or a checksum that does not match (the message names the file and the part).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read packed model {p}: {exc.strerror or exc}") from exc
    if not data:
        raise CheckpointError(f"{p} is empty: it is not a torchslim packed model (.tslim)")
    if len(data) < _PREFIX.size and MAGIC.startswith(data[:8]):
        raise CheckpointError(f"{p} is truncated: {len(data)} bytes, shorter than the .tslim file prefix ({_PREFIX.size})")
    if data[:8] != MAGIC:
        raise CheckpointError(f"{p} is not a torchslim packed model (.tslim): it does not start with the .tslim magic bytes")
    _, version, hlen, hcrc = _PREFIX.unpack_from(data)
    if version > VERSION:
        raise CheckpointError(
            f"{p} was written by a newer torchslim (packed format version {version} > {VERSION}); upgrade torchslim to read it"
        )
    if version < 1:
        raise CheckpointError(f"{p} has packed format version {version}, which does not exist (known: 1..{VERSION})")
    start = _PREFIX.size
    if len(data) < start + hlen + _TRAILER.size:
        raise CheckpointError(f"{p} is truncated: its header needs {start + hlen} bytes, the file has {len(data)}")
    raw = data[start : start + hlen]
    if zlib.crc32(raw) != hcrc:
        raise CheckpointError(f"{p} is corrupted: the header checksum does not match")
    try:
        header = json.loads(zlib.decompress(raw))
    except (zlib.error, ValueError) as exc:
        raise CheckpointError(f"{p} is corrupted: its header cannot be decoded ({' '.join(str(exc).split())})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{p} is corrupted: its header is a {type(header).__name__}, not a JSON object")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{p} has format {header.get('format')!r}, expected {FORMAT!r}")
    payload = start + hlen
    table = _stream_table(p, header.get("streams", []))
    end = payload + sum(int(s["length"]) for s in table)
    if len(data) < end + _TRAILER.size:
        raise CheckpointError(f"{p} is truncated: the header announces {end + _TRAILER.size} bytes, the file has {len(data)}")
    if len(data) > end + _TRAILER.size:
        raise CheckpointError(f"{p} is corrupted: {len(data) - end - _TRAILER.size} unexpected bytes after the last stream")
    out = Container(header, {}, hlen)
    if header_only:
        return out
    for s in table:
        lo = payload + int(s["offset"])
        chunk = data[lo : lo + int(s["length"])]
        if zlib.crc32(chunk) != int(s["crc32"]):
            raise CheckpointError(f"{p} is corrupted: the checksum of stream {s['name']!r} does not match")
        out.streams[s["name"]] = chunk
    (total,) = _TRAILER.unpack_from(data, end)
    if zlib.crc32(data[:end]) != total:
        raise CheckpointError(f"{p} is corrupted: the whole-file checksum does not match")
    return out


def _stream_table(p: Path, table: Any) -> list[dict[str, Any]]:
    """The header's stream table, every entry checked (name, and offset / length / crc32 >= 0)."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(table, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and all(whole(e.get(k)) for k in ("offset", "length", "crc32"))
        for e in table
    ):
        raise CheckpointError(f"{p} is corrupted: its stream table is malformed (expected a list of "
                              "{name, offset, length, crc32} entries)")
    return table
