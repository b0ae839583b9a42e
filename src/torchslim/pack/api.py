"""``ts.pack`` / ``ts.unpack``: a clustered model as one entropy-coded ``.tslim`` file, and back.

What goes into the file (see :mod:`torchslim.pack.fileformat` for the container):

- the header: the model's architecture spec and its plans (the same ``ModelInfo`` that
  ``ts.save`` writes to ``plan.json``; ``unpack`` rebuilds and replays them), per clustered
  layer its codebook (exact float32 bytes, base64), bits, shape, non-zero count and the
  frequency table of each of its streams, plus a checksum per stream;
- per clustered layer an *index* stream (the cluster index of every non-zero weight) and, for a
  sparse layer, a *position* stream (relative indices with fillers), each entropy coded
  (:mod:`torchslim.pack.coding`: ANS by default, range coding or Huffman);
- every other tensor (biases, norms, running statistics, unclustered layers) raw, in its own
  dtype (float32 for float32 models: lossless, so the unpacked model's outputs are identical),
  as one safetensors blob.

Example:
    >>> import tempfile, os, torch, torchslim as ts
    >>> from torchslim.pack import cluster_, pack, unpack
    >>> model = ts.create_model("zoo:lenet300")
    >>> _ = cluster_(model, bits=4)
    >>> path = os.path.join(tempfile.mkdtemp(), "m.tslim")
    >>> result = pack(model, path)
    >>> result.size_bytes == os.path.getsize(path)
    True
    >>> torch.equal(unpack(path).fc1.weight, model.fc1.weight)
    True
"""

from __future__ import annotations

import base64
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim._utils import atomic_path
from torchslim.errors import CheckpointError, ConfigError, MissingDependencyError, TorchslimError
from torchslim.pack import coding
from torchslim.pack.cluster import check_bits, cluster_, clustered_layers, index_dtype
from torchslim.pack.fileformat import MAGIC, container_bytes, read_container

__all__ = ["PackResult", "pack", "pack_result", "unpack", "packed_size_bytes", "read_header"]

_RAW = "raw"
_EXAMPLE = "__example__."
_CONTAINER_OVERHEAD = len(MAGIC) + 2 + 4 + 4 + 4  # magic, version, header length, header crc, file crc


@dataclass
class PackResult:
    """What :func:`pack` wrote.

    Attributes:
        path: the file (``None`` when only measured by :func:`packed_size_bytes`).
        size_bytes: bytes of the packed file.
        dense_bytes: bytes of the same tensors stored dense in their dtype (fp32 for fp32 models).
        coder: ``"ans"``, ``"range"`` or ``"huffman"``.
        breakdown: bytes by part: ``indices``, ``positions`` (coded streams), ``raw`` (tensors
            not clustered), ``header`` (deflated JSON incl. codebooks and frequency tables),
            ``container`` (magic, lengths, checksums).
        layers: per clustered weight: ``numel``, ``nonzero``, ``bits``, ``index_bytes``,
            ``position_bytes``, ``gap_bits``, ``index_bits_per_symbol``, ``index_entropy_bits``.
    """

    path: str | None
    size_bytes: int
    dense_bytes: int
    coder: str
    breakdown: dict[str, int] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``dense_bytes / size_bytes``: how many times smaller than the dense tensors."""
        return self.dense_bytes / max(self.size_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "size_bytes": self.size_bytes, "dense_bytes": self.dense_bytes, "ratio": self.ratio,
            "coder": self.coder, "breakdown": dict(self.breakdown), "layers": {k: dict(v) for k, v in self.layers.items()},
        }


# --------------------------------------------------------------------------- encoding


def _model_meta(model: nn.Module) -> dict[str, Any]:
    from torchslim._modelinfo import model_info

    info = model_info(model)
    if info is None or info.kind not in ("torchvision", "timm", "zoo", "file"):
        raise ConfigError(
            f"cannot pack {type(model).__name__}: it has no model spec to rebuild it from; "
            "create it with ts.create_model(spec) (a file.py:factory spec works for any model)"
        )
    return info.to_dict()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _prepared(model: nn.Module, bits: int | None) -> nn.Module:
    """The model to pack: ``model`` itself when clustered, else a clustered copy (``bits`` given)."""
    if bits is not None:
        check_bits(bits)
    layers = clustered_layers(model)
    if layers:
        if bits is not None:
            other = sorted({sw.bits for _, sw in layers.values()} - {bits})
            if other:
                raise ConfigError(f"the model is already clustered with {other} bits; pass bits=None to pack it as it is")
        return model
    if bits is None:
        raise ConfigError("the model has no clustered layers: pass bits= (1..8) to cluster it first, or call cluster_(model, bits)")
    copied = copy.deepcopy(model)
    cluster_(copied, bits)
    return copied


def _example_meta(model: nn.Module, raw: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Float example inputs are kept as their shape (rebuilt as seeded randn), others stored raw."""
    from torchslim._modelinfo import model_info

    info = model_info(model)
    ex = info.example if info is not None else None

    def one(key: str, t: Any) -> dict[str, Any] | None:
        if not isinstance(t, torch.Tensor):
            return None
        if t.is_floating_point():
            return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        raw[_EXAMPLE + key] = t.detach().cpu().contiguous()
        return {"stored": _EXAMPLE + key}

    if ex is None:
        return {"args": [], "kwargs": {}}
    return {
        "args": [one(f"arg{i}", t) for i, t in enumerate(ex.args)],
        "kwargs": {k: one(f"kw.{k}", v) for k, v in ex.kwargs.items()},
    }


def _encode(model: nn.Module, coder: str) -> tuple[bytes, PackResult]:
    coding.check_coder(coder)
    meta = _model_meta(model)
    layers = clustered_layers(model)
    state = model.state_dict(keep_vars=False)
    streams: dict[str, bytes] = {}
    lheader: dict[str, Any] = {}
    details: dict[str, dict[str, Any]] = {}
    dense = 0
    for name, (module, sw) in layers.items():
        mname = name.rpartition(".")[0]
        pre = f"{mname}." if mname else ""
        pos_in_list = list(module.parametrizations["weight"]).index(sw)
        for key in (f"{pre}parametrizations.weight.original", f"{pre}parametrizations.weight.{pos_in_list}.indices"):
            state.pop(key, None)
        codebook = module.parametrizations["weight"].original.detach().cpu()
        idx = sw.indices.detach().cpu().reshape(-1).numpy().astype(np.int64)
        k = sw.k
        nz = idx != k
        sym = idx[nz]
        enc = coding.encode_stream(sym, k, coder)
        streams[f"{name}/indices"] = enc.data
        entry: dict[str, Any] = {
            "shape": list(sw.indices.shape), "bits": sw.bits, "dtype": str(codebook.dtype).removeprefix("torch."),
            "codebook": base64.b64encode(_tensor_bytes(codebook)).decode(), "nonzero": int(sym.size),
            "indices": {"symbols": int(sym.size), "alphabet": k, "model": enc.model},
            "positions": None,
        }
        pos_bytes, g = 0, None
        if sym.size < idx.size:
            positions = np.flatnonzero(nz)
            g = coding.best_gap_bits(positions)
            gsym = coding.gaps_encode(positions, 2**g)
            genc = coding.encode_stream(gsym, 2**g, coder)
            streams[f"{name}/positions"] = genc.data
            entry["positions"] = {"symbols": int(gsym.size), "alphabet": 2**g, "gap_bits": g, "model": genc.model}
            pos_bytes = len(genc.data)
        lheader[name] = entry
        dense += idx.size * codebook.element_size()
        details[name] = {
            "numel": int(idx.size), "nonzero": int(sym.size), "bits": sw.bits, "index_bytes": len(enc.data),
            "position_bytes": pos_bytes, "gap_bits": g,
            "index_bits_per_symbol": 8 * len(enc.data) / max(int(sym.size), 1),
            "index_entropy_bits": coding.entropy_bits(sym, k),
        }
    raw, aliases, seen = {}, {}, {}
    for key, t in state.items():
        t = t.detach().cpu()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        raw[key] = t.contiguous()
        dense += t.numel() * t.element_size()
    example = _example_meta(model, raw)
    from safetensors.torch import save as st_save

    streams[_RAW] = st_save(raw) if raw else b""
    header = {
        "torch": torch.__version__, "model": meta, "example_inputs": example, "coder": coder, "layers": lheader,
        "raw": {"stream": _RAW, "aliases": aliases, "tensors": len(raw)},
    }
    data, hlen = container_bytes(header, streams)
    idx_bytes = sum(len(streams[f"{n}/indices"]) for n in layers)
    pos_total = sum(len(v) for k, v in streams.items() if k.endswith("/positions"))
    breakdown = {
        "indices": idx_bytes, "positions": pos_total, "raw": len(streams[_RAW]), "header": hlen,
        "container": _CONTAINER_OVERHEAD,
    }
    return data, PackResult(None, len(data), dense, coder, breakdown, details)


def pack(
    model: nn.Module, path: str | os.PathLike[str], *, bits: int | None = None, coder: str = "ans"
) -> PackResult:
    """Write ``model`` as one entropy-coded ``.tslim`` file (Deep Compression's final stage).

    The clustered layers (:func:`~torchslim.pack.cluster_`) are stored as their codebook plus
    entropy-coded index and position streams; everything else raw. ``model`` is not changed.

    Args:
        model: a model built by ``ts.create_model`` (or loaded), clustered or not.
        path: the file to write (created atomically: nothing is left there on error).
        bits: when the model is not clustered yet, cluster a copy of it with this many bits
            (1..8) first; when it is, must be ``None`` or equal its bits.
        coder: ``"ans"`` (default), ``"range"`` or ``"huffman"``.

    Returns:
        A :class:`PackResult`: file size, dense size, the byte breakdown and per-layer figures.

    Raises:
        ConfigError: bits outside 1..8 or different from the model's; no clustered layer and no
            ``bits``; an unknown coder; a model without a spec to rebuild it from.
    """
    data, result = _encode(_prepared(model, bits), coder)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    result.path = str(Path(path))
    return result


def packed_size_bytes(model: nn.Module, bits: int | None = None, coder: str = "ans") -> int:
    """Bytes ``ts.pack(model, path, bits=bits, coder=coder)`` would write (nothing is written).

    For reports and profiles: a clustered model is measured as it is; an unclustered one needs
    ``bits`` (a clustered copy is measured).
    """
    data, _ = _encode(_prepared(model, bits), coder)
    return len(data)


def packed_size_if_clustered(model: nn.Module) -> int | None:
    """:func:`packed_size_bytes` of a clustered (weight-shared) model; ``None`` for any other.

    Registered as ``ts.profile``'s ``packed_bytes`` estimator when ``torchslim.pack`` is imported.
    """
    from torchslim._modelinfo import model_info

    info = model_info(model)
    if info is None or not any(p.get("kind") == "cluster" for p in info.plans):
        return None
    return packed_size_bytes(model)


def pack_result(model: nn.Module, bits: int | None = None, coder: str = "ans") -> PackResult:
    """The :class:`PackResult` of packing ``model`` (nothing is written; ``path`` is ``None``)."""
    return _encode(_prepared(model, bits), coder)[1]


# --------------------------------------------------------------------------- decoding


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified JSON header of a ``.tslim`` file (codebooks still base64-encoded float bytes)."""
    return read_container(path, header_only=True).header


def _dtype(name: str, where: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return dt


def _decode_layer(p: Path, name: str, entry: dict[str, Any], streams: dict[str, bytes], coder: str) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"{p}: layer {name}"
    try:
        shape = [int(s) for s in entry["shape"]]
        bits = check_bits(entry["bits"], f"bits of {name}")
        k = 2**bits
        dt = _dtype(entry["dtype"], where)
        codebook = torch.frombuffer(bytearray(base64.b64decode(entry["codebook"])), dtype=dt).clone()
        ientry, pentry = entry["indices"], entry.get("positions")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: header entry is malformed ({_one_line(exc)})") from exc
    if codebook.numel() != k:
        raise CheckpointError(f"{where}: codebook has {codebook.numel()} values, {k} expected for {bits} bits")
    numel = int(np.prod(shape)) if shape else 1
    n = int(ientry["symbols"])
    sym = coding.decode_stream(streams.get(f"{name}/indices", b""), ientry["model"], n, k, coder)
    if pentry is None:
        if n != numel:
            raise CheckpointError(f"{where}: {n} indices for {numel} weights and no position stream")
        positions = np.arange(numel)
    else:
        a = int(pentry["alphabet"])
        gsym = coding.decode_stream(streams.get(f"{name}/positions", b""), pentry["model"], int(pentry["symbols"]), a, coder)
        positions = coding.gaps_decode(gsym, a)
        if positions.size != n or (positions.size and (positions[-1] >= numel or positions[0] < 0)):
            raise CheckpointError(f"{where}: the position stream gives {positions.size} positions for {n} indices in {numel} weights")
    idx = np.full(numel, k, dtype=np.int64)
    idx[positions] = sym
    return codebook, torch.from_numpy(idx).reshape(shape).to(index_dtype(bits))


def unpack(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model written by :func:`pack`, with exactly the packed weights.

    The architecture is rebuilt from its spec, the plans are replayed (so the clustered layers
    come back clustered: codebook plus indices, fine-tunable again), and every weight is
    bit-identical to the packed model's. The model remembers its spec, so ``ts.save`` works on it.

    Raises:
        CheckpointError: the file is missing, not a ``.tslim`` file, from a newer format version,
            truncated or corrupted (checksums), or does not fit the rebuilt architecture.
    """
    p = Path(path)
    cont = read_container(p)
    try:
        return _unpack_container(p, cont, map_location)
    except (CheckpointError, MissingDependencyError):
        raise
    except TorchslimError as exc:  # a header field the code below refused (bits, dtype...)
        raise CheckpointError(f"{p}: its header is malformed ({_one_line(exc)})") from exc
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # the checksums passed, so the file is as written, but its header is not one pack() writes
        raise CheckpointError(f"{p}: its header is malformed ({type(exc).__name__}: {_one_line(exc)})") from exc


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unpack_container(p: Path, cont: Any, map_location: str | torch.device) -> nn.Module:
    from dataclasses import replace

    from safetensors.torch import load as st_load

    from torchslim._modelinfo import attach, model_info, rebuild

    h = cont.header
    coder = h.get("coder")
    if coder not in coding.CODERS:
        raise CheckpointError(f"{p}: unknown coder {coder!r} (known: {', '.join(coding.CODERS)})")
    info = h.get("model") or {}
    try:
        model = rebuild(info)  # the architecture with every plan replayed, as ts.load does
    except MissingDependencyError:
        raise
    except TorchslimError as exc:  # the header names a spec, a shape, a plan that cannot be built
        raise CheckpointError(f"cannot rebuild the model packed in {p}: {_one_line(exc)}") from exc
    try:
        raw = st_load(cont.streams.get(_RAW, b"")) if cont.streams.get(_RAW) else {}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{p}: the raw tensor block cannot be read ({_one_line(exc)})") from exc
    example_raw = {k: raw.pop(k) for k in [k for k in raw if k.startswith(_EXAMPLE)]}
    state: dict[str, torch.Tensor] = dict(raw)
    for key, target in (h.get("raw", {}).get("aliases") or {}).items():
        if target not in state:
            raise CheckpointError(f"{p}: tensor {key!r} refers to {target!r}, which is not in the file")
        state[key] = state[target]
    modules = dict(model.named_modules())
    for name, entry in (h.get("layers") or {}).items():
        codebook, indices = _decode_layer(p, name, entry, cont.streams, coder)
        mname = name.rpartition(".")[0]
        module = modules.get(mname)
        plist = getattr(module, "parametrizations", None) if module is not None else None
        if plist is None or "weight" not in plist:
            raise CheckpointError(f"{p}: layer {name} is packed clustered, but the rebuilt model has no clustered {name}")
        pre = f"{mname}." if mname else ""
        pos_in_list = next((i for i, m in enumerate(plist["weight"]) if hasattr(m, "indices")), 0)
        state[f"{pre}parametrizations.weight.original"] = codebook
        state[f"{pre}parametrizations.weight.{pos_in_list}.indices"] = indices
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the tensors in {p} do not fit the rebuilt model: {_one_line(exc)}") from exc
    model.to(map_location).eval()
    example = _example_inputs(h.get("example_inputs") or {}, example_raw, p)
    return attach(model, replace(model_info(model), example=example))


def _example_inputs(meta: dict[str, Any], stored: dict[str, torch.Tensor], p: Path) -> Any:
    from torchslim.graph.inputs import Inputs

    gen = torch.Generator().manual_seed(0)

    def one(entry: Any) -> Any:
        if entry is None:
            return None
        if "stored" in entry:
            if entry["stored"] not in stored:
                raise CheckpointError(f"{p}: example input {entry['stored']!r} is missing")
            return stored[entry["stored"]]
        return torch.randn([int(s) for s in entry["shape"]], generator=gen).to(_dtype(entry["dtype"], str(p)))

    return Inputs(tuple(one(e) for e in meta.get("args", [])), {k: one(v) for k, v in meta.get("kwargs", {}).items()})

