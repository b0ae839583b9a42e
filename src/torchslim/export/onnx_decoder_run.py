"""Running an ONNX decoder written by :func:`torchslim.export.onnx_decoder.export_onnx_decoder`:
its metadata, and :class:`OnnxDecoder` (ONNX Runtime on the CPU, the KV cache kept in ONNX
Runtime's memory between steps by IO binding), which ``ts.generate``, ``ts.evaluate_lm`` and
``ts.lm_speed`` use for an ``.onnx`` file.

A generation loop runs through a :class:`DecodeState` (``OnnxDecoder.start(batch, capacity)``).
On a ``fused`` file (GroupQueryAttention) it holds one fixed buffer per key / value of
``capacity`` positions, bound as both the layer's ``past_key_values`` input and its ``present``
output: ONNX Runtime's GroupQueryAttention sees the two share memory and writes each step's new
keys / values in place, reading the first ``length`` positions. Nothing is reallocated or copied
per step (the growing cache of :meth:`OnnxDecoder.step_numpy` copies every layer's whole cache
into a new ``present`` at every token). The logits are the same bit for bit (tested). A
``reference`` file (plain ops, explicit concat) gets the growing cache behind the same interface.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchslim._optional import require
from torchslim.errors import ConfigError, ModelRunError

__all__ = ["META_KEY", "DecodeState", "OnnxDecoder", "decoder_metadata", "is_onnx_decoder"]

#: The ONNX metadata key under which the exporter stores the decoder's facts (JSON).
META_KEY = "torchslim.decoder"


def decoder_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The metadata :func:`export_onnx_decoder` stored in ``path`` (``None``: not such a file)."""
    onnx = require("onnx", "ONNX decoder")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file: not a decoder
        return None
    for p in proto.metadata_props:
        if p.key == META_KEY:
            return dict(json.loads(p.value))
    return None


def is_onnx_decoder(model: Any) -> bool:
    """Whether ``model`` is a path to an ``.onnx`` file (the decoder format is checked when opened)."""
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".onnx"


class OnnxDecoder:
    """An ONNX decoder written by :func:`export_onnx_decoder`, run by ONNX Runtime on the CPU.

    ``step(input_ids, past=None, attention_mask=None)`` runs one forward (``past=None``: the
    prefill) and returns ``(logits, present)``, ``present`` being the list of key/value arrays
    to pass as the next step's ``past``. ``decoder(ids)`` returns the logits of a prefill
    (``(batch, tokens, vocab)`` float32 tensor), as a torch causal LM would. ``threads``: ONNX
    Runtime intra-op threads (default: torch's current count; inter-op 1).

    Raises:
        CheckpointError: the file is missing or not loadable.
        ConfigError: the file is an ONNX model but not a decoder with a KV cache.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        from torchslim.export.ort import ort_session

        self.path = str(path)
        self.threads = int(threads) if threads is not None else torch.get_num_threads()
        self.session = ort_session(self.path, self.threads)
        names = [i.name for i in self.session.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if names[:2] != ["input_ids", "attention_mask"] or not self.past_names:
            raise ConfigError(f"{self.path} is not an ONNX decoder with a KV cache (inputs input_ids, attention_mask, "
                              f"past_key_values.*); its inputs: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}; "
                              "write one with export_onnx_decoder")
        shape = self.session.get_inputs()[2].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.metadata = decoder_metadata(self.path) or {}

    @property
    def layers(self) -> int:
        return len(self.past_names) // 2

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past_names]

    def step_numpy(self, ids: np.ndarray, past: list[Any], mask: np.ndarray) -> tuple[np.ndarray, list[Any]]:
        """One forward (no checks): the fast path of loops. ``past``: numpy arrays or the ONNX
        Runtime ``OrtValue`` s a previous call returned; returns the logits as numpy and the
        present keys/values as ``OrtValue`` s left in ONNX Runtime's memory (IO binding: the
        cache is not copied to numpy and back at every step; inputs are never written)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        for name, value in zip(self.past_names, past):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()
        return out[0].numpy(), list(out[1:])

    @staticmethod
    def past_length(past: list[Any]) -> int:
        """Tokens held by a cache (numpy arrays or ``OrtValue`` s)."""
        shape = past[0].shape
        return int((shape() if callable(shape) else shape)[2])

    def step(self, input_ids: Any, past: list[np.ndarray] | None = None,
             attention_mask: Any = None) -> tuple[torch.Tensor, list[np.ndarray]]:
        ids = np.asarray(torch.as_tensor(input_ids).cpu(), dtype=np.int64)
        if ids.ndim != 2:
            raise ModelRunError(f"input_ids must be (batch, tokens); got shape {ids.shape}")
        past = self.empty_past(ids.shape[0]) if past is None else past
        total = self.past_length(past) + ids.shape[1]
        mask = (np.ones((ids.shape[0], total), np.int64) if attention_mask is None
                else np.asarray(torch.as_tensor(attention_mask).cpu(), dtype=np.int64))
        if self.metadata.get("graph") == "fused" and not bool((mask == 1).all()):
            raise ConfigError(f"{self.path} is a fused decoder (GroupQueryAttention): it takes no padding (attention_mask "
                              "all ones); export with fused=False for left padding")
        try:
            logits, present = self.step_numpy(ids, past, mask)
        except Exception as exc:  # noqa: BLE001 - one line for the user
            raise ModelRunError(f"ONNX Runtime failed on {self.path} (input_ids {ids.shape}, past {self.past_length(past)}): "
                                f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from exc
        return torch.from_numpy(logits), [v.numpy() for v in present]

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.step(input_ids)[0]

    def start(self, batch: int, capacity: int) -> DecodeState:
        """A cache for one generation of ``batch`` rows and at most ``capacity`` tokens (prompt
        and new ones together): see :class:`DecodeState`."""
        return DecodeState(self, batch, capacity)

    def __repr__(self) -> str:
        return f"OnnxDecoder({self.path!r}, layers={self.layers}, kv_heads={self.kv_heads}, head_dim={self.head_dim})"


class DecodeState:
    """One generation's KV cache on an :class:`OnnxDecoder`: ``step(ids)`` feeds ``ids``
    (``(batch, tokens)`` int64 numpy) after the ``length`` tokens already held and returns their
    logits (``(batch, tokens, vocab)`` float32 numpy, a fresh array).

    On a ``fused`` file the cache is ``capacity`` positions long and updated in place by ONNX
    Runtime (see the module doc); on a ``reference`` file it grows as :meth:`OnnxDecoder.step_numpy`
    returns it. :meth:`rewind` forgets the tokens after the first ``length`` (their keys / values
    are overwritten by the next step), so a prompt's cache can be decoded from again.

    Raises:
        ConfigError: ``batch`` / ``capacity`` not positive integers; a step past ``capacity``.
    """

    def __init__(self, decoder: OnnxDecoder, batch: int, capacity: int) -> None:
        for name, value in (("batch", batch), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
        self.decoder, self.batch, self.capacity = decoder, int(batch), int(capacity)
        self.length = 0
        self.in_place = decoder.metadata.get("graph") == "fused"
        self._vocab = int(decoder.metadata.get("vocab") or decoder.session.get_outputs()[0].shape[-1])
        if self.in_place:
            ort = require("onnxruntime", "ONNX decoder")
            shape = (self.batch, decoder.kv_heads, self.capacity, decoder.head_dim)
            self._buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in decoder.past_names]
            self._binding = decoder.session.io_binding()
            for past, present, value in zip(decoder.past_names, decoder.output_names[1:], self._buffers):
                self._binding.bind_ortvalue_input(past, value)
                self._binding.bind_ortvalue_output(present, value)
            self._ort = ort
        else:
            self._past: list[Any] = decoder.empty_past(self.batch)

    def rewind(self, length: int) -> None:
        """Keep the first ``length`` tokens' keys / values (``0 <= length <= self.length``)."""
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 0 <= length <= self.length:
            raise ConfigError(f"rewind length must be an integer in [0, {self.length}]; got {length!r}")
        if not self.in_place:
            self._past = ([np.ascontiguousarray((p if isinstance(p, np.ndarray) else p.numpy())[:, :, :length])
                           for p in self._past] if length else self.decoder.empty_past(self.batch))
        self.length = int(length)

    def step(self, ids: np.ndarray) -> np.ndarray:
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise ConfigError(f"ids must be ({self.batch}, tokens) for this cache; got shape {tuple(ids.shape)}")
        tokens = ids.shape[1]
        if self.length + tokens > self.capacity:
            raise ConfigError(f"the decode cache holds {self.capacity} tokens; {self.length} are in it and {tokens} more "
                              "were fed: start() a larger one")
        mask = np.ones((self.batch, self.length + tokens), np.int64)
        if not self.in_place:
            logits, self._past = self.decoder.step_numpy(ids, self._past, mask)
            self.length += tokens
            return logits
        logits = np.empty((self.batch, tokens, self._vocab), np.float32)
        self._binding.bind_cpu_input("input_ids", ids)
        self._binding.bind_cpu_input("attention_mask", mask)
        self._binding.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(logits))
        self.decoder.session.run_with_iobinding(self._binding)
        self.length += tokens
        return logits
