"""Running an ONNX decoder written by :func:`torchslim.export.onnx_decoder.export_onnx_decoder`:
its metadata, and :class:`OnnxDecoder` (ONNX Runtime on the CPU, the KV cache kept in ONNX
Runtime's memory between steps by IO binding), which ``ts.generate``, ``ts.evaluate_lm`` and
``ts.lm_speed`` use for an ``.onnx`` file.
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

__all__ = ["META_KEY", "OnnxDecoder", "decoder_metadata", "is_onnx_decoder"]

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

    def __repr__(self) -> str:
        return f"OnnxDecoder({self.path!r}, layers={self.layers}, kv_heads={self.kv_heads}, head_dim={self.head_dim})"
