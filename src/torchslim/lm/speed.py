"""Tokens per second of a causal LM on the CPU: prefill and decode, batch 1, threads stated.

:func:`lm_speed` times two phases with the one timer (``profile.latency.measure``: warm-up, then
the median of timed runs):

* **prefill**: one forward of a ``prompt_tokens``-token prompt that fills the KV cache;
* **decode**: ``new_tokens`` greedy steps of one token each, reading and extending that cache
  (a manual loop over transformers' ``DynamicCache``; after each timed run the cache is cropped
  back to the prompt, so every run decodes the same tokens from the same state).

An exported ONNX decoder (the path of the ``.onnx`` file written by
:func:`~torchslim.export.onnx_decoder.export_onnx_decoder`, or an ``OnnxDecoder``) is timed the
same way on ONNX Runtime (CPU, ``threads`` intra-op threads, inter-op 1) through one
:class:`~torchslim.export.onnx_decoder_run.DecodeState` of ``prompt_tokens + new_tokens``
positions, as ``ts.generate`` runs it: the prefill fills it from empty, and each decode run
rewinds it to the prompt and appends the same greedy tokens (a fused file's cache is updated in
place by GroupQueryAttention; a reference file's grows).

A GGUF file (``.gguf`` path or a ``LlamaCppDecoder``) is timed in llama.cpp itself
(``llama-cpp-python``, CPU, ``threads`` threads), opened with the last position's logits only
(``logits_all=False``, as llama.cpp generates): the prefill evaluates the prompt from an empty
sequence, and each decode run rewinds the sequence to the prompt and appends greedy tokens one
by one.

Prefill tokens/s = ``prompt_tokens / median prefill time``; decode tokens/s = ``new_tokens /
median decode time``. The prompt is fixed token ids (seeded), batch 1. Compare two models only
when measured in one run, side by side, on the same machine and threads.

Example:
    >>> import torchslim as ts
    >>> from torchslim.lm.speed import lm_speed
    >>> model = ts.create_model("pretrained:smollm2-135m")  # doctest: +SKIP
    >>> print(lm_speed(model, prompt_tokens=32, new_tokens=8, threads=2))  # doctest: +SKIP
    prefill ... tokens/s, decode ... tokens/s (batch 1, 2 threads, ...)
"""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from torchslim._utils import evaluating, is_int, logits_of, model_device, num_threads
from torchslim.errors import ConfigError, ModelRunError
from torchslim.profile.latency import cpu_name, measure

__all__ = ["LMSpeed", "lm_speed"]


@dataclass(frozen=True)
class LMSpeed:
    """What :func:`lm_speed` measured (medians over ``runs`` timed runs after ``warmup``)."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_ms: float  # median time of one prefill of prompt_tokens
    decode_ms_per_token: float  # median decode time / new_tokens
    prompt_tokens: int
    new_tokens: int
    batch: int
    threads: int
    runs: int
    warmup: int
    cpu: str
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"prefill {self.prefill_tokens_per_s:.1f} tokens/s ({self.prompt_tokens} tokens), decode "
                f"{self.decode_tokens_per_s:.1f} tokens/s ({self.new_tokens} tokens) (batch {self.batch}, "
                f"{self.threads} threads, {self.cpu})")


def _result(t_prefill: Any, t_decode: Any, prompt_tokens: int, new_tokens: int, threads: int, runs: int, warmup: int,
            method: str) -> LMSpeed:
    """An :class:`LMSpeed` from the two phases' timings (medians)."""
    return LMSpeed(
        prefill_tokens_per_s=prompt_tokens / (t_prefill.median_ms / 1e3),
        decode_tokens_per_s=new_tokens / (t_decode.median_ms / 1e3),
        prefill_ms=t_prefill.median_ms, decode_ms_per_token=t_decode.median_ms / new_tokens,
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch=1, threads=int(threads), runs=runs, warmup=warmup,
        cpu=cpu_name(), method=method,
    )


def _count(name: str, value: Any, lo: int) -> int:
    if not is_int(value) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}; got {value!r}")
    return int(value)


def _cache_class() -> Any:
    try:
        from transformers import DynamicCache
    except ImportError as exc:
        from torchslim.errors import MissingDependencyError

        raise MissingDependencyError(f"lm_speed keeps the KV cache in transformers' DynamicCache; "
                                     f"install it with: pip install \"torchslim[hf]\" ({exc})") from None
    return DynamicCache


@torch.no_grad()
def lm_speed(
    model: nn.Module | str | os.PathLike[str] | Any,
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    threads: int | None = None,
    runs: int = 5,
    warmup: int = 1,
    vocab: int | None = None,
    seed: int = 0,
) -> LMSpeed:
    """Prefill and decode tokens/s of a transformers causal LM (batch 1; see the module doc).

    The model is run in eval mode under ``no_grad`` and left as it was.

    Args:
        model: an ONNX decoder (``.onnx`` path or ``OnnxDecoder``), a GGUF file (``.gguf`` path
            or ``LlamaCppDecoder``: timed in llama.cpp), or a causal LM taking ``input_ids``, ``past_key_values`` (``cache`` in newer transformers) and
            ``use_cache`` (transformers).
        prompt_tokens: prompt length of the prefill.
        new_tokens: greedy decode steps timed after the prefill.
        threads: torch threads, or ONNX Runtime intra-op threads (default: torch's current
            count); stated in the result.
        runs, warmup: timed and untimed runs of each phase.
        vocab: draw the prompt ids below this (default: the model's ``config.vocab_size``).
        seed: seed of the prompt ids.

    Raises:
        ConfigError: bad counts.
        ModelRunError: the model does not take a KV cache.
    """
    prompt_tokens = _count("prompt_tokens", prompt_tokens, 1)
    new_tokens = _count("new_tokens", new_tokens, 1)
    runs, warmup = _count("runs", runs, 1), _count("warmup", warmup, 0)
    from torchslim.export.gguf_runtime import LlamaCppDecoder, is_gguf_file
    from torchslim.export.onnx_decoder import OnnxDecoder, is_onnx_decoder

    if is_onnx_decoder(model) or isinstance(model, OnnxDecoder):
        return _onnx_speed(model, prompt_tokens, new_tokens, threads, runs, warmup, vocab, seed)
    if is_gguf_file(model) or isinstance(model, LlamaCppDecoder):
        return _llamacpp_speed(model, prompt_tokens, new_tokens, threads, runs, warmup, vocab, seed)
    vocab = vocab or getattr(getattr(model, "config", None), "vocab_size", None)
    if not is_int(vocab) or vocab < 2:
        raise ConfigError(f"vocab must be an integer >= 2 (the model has no config.vocab_size); got {vocab!r}")
    device = model_device(model)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, int(vocab), (1, prompt_tokens), generator=g).to(device)
    DynamicCache = _cache_class()
    # transformers 5.x renames past_key_values= to cache= (the old name warns until 5.40)
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    crop_removes = "tokens_to_remove" in inspect.signature(DynamicCache.crop).parameters

    def prefill() -> tuple[Any, torch.Tensor]:
        cache = DynamicCache()
        out = model(input_ids=prompt, use_cache=True, **{cache_arg: cache})
        return cache, logits_of(out)[:, -1:].argmax(-1)

    with evaluating(model), num_threads(threads) as used:
        try:
            cache, first = prefill()
            if cache.get_seq_length() != prompt_tokens:
                raise ModelRunError("the model did not fill the KV cache it was given")
        except Exception as exc:  # noqa: BLE001 - one line for the user
            raise ModelRunError(f"lm_speed needs a transformers causal LM that takes past_key_values; the model "
                                f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from exc

        def decode() -> None:
            token = first
            for _ in range(new_tokens):
                out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
                token = logits_of(out)[:, -1:].argmax(-1)
            extra = cache.get_seq_length() - prompt_tokens  # back to the prompt: the same state for the next run
            cache.crop(-extra if crop_removes else prompt_tokens)

        t_prefill = measure(prefill, runs=runs, warmup=warmup, runtime="eager")
        t_decode = measure(decode, runs=runs, warmup=warmup, runtime="eager")
    return _result(t_prefill, t_decode, prompt_tokens, new_tokens, used, runs, warmup,
                   "eager, manual greedy loop over a transformers DynamicCache")


def _onnx_speed(model: Any, prompt_tokens: int, new_tokens: int, threads: int | None, runs: int, warmup: int,
                vocab: int | None, seed: int) -> LMSpeed:
    """:func:`lm_speed` of an ONNX decoder on ONNX Runtime (see the module doc)."""
    import numpy as np

    from torchslim.export.onnx_decoder import OnnxDecoder

    dec = model if isinstance(model, OnnxDecoder) else OnnxDecoder(model, threads=threads)
    vocab = vocab or dec.metadata.get("vocab")
    if not is_int(vocab) or vocab < 2:
        raise ConfigError(f"vocab must be an integer >= 2 (the ONNX file records none); got {vocab!r}")
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, int(vocab), (1, prompt_tokens), generator=g).numpy()
    state = dec.start(1, prompt_tokens + new_tokens)

    def prefill() -> Any:
        state.rewind(0)
        return state.step(prompt)

    try:
        logits = prefill()
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise ModelRunError(f"the ONNX decoder {dec.path} failed on a {prompt_tokens}-token prompt: "
                            f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from exc
    first = np.array([[int(logits[0, -1].argmax())]], np.int64)

    def decode() -> None:
        state.rewind(prompt_tokens)  # the prompt's keys / values stay; each run decodes from them
        token = first
        for _ in range(new_tokens):
            out = state.step(token)
            token = np.array([[int(out[0, -1].argmax())]], np.int64)

    t_prefill = measure(prefill, runs=runs, warmup=warmup, runtime="onnxruntime")  # each leaves the prompt's cache
    t_decode = measure(decode, runs=runs, warmup=warmup, runtime="onnxruntime")
    how = ("a fixed cache updated in place (past and present share one buffer)" if state.in_place
           else "present.* fed back as past_key_values.*")
    return _result(t_prefill, t_decode, prompt_tokens, new_tokens, dec.threads, runs, warmup,
                   f"onnxruntime CPU, greedy loop, IO binding, {how}")


def _llamacpp_speed(model: Any, prompt_tokens: int, new_tokens: int, threads: int | None, runs: int, warmup: int,
                    vocab: int | None, seed: int) -> LMSpeed:
    """:func:`lm_speed` of a GGUF file in llama.cpp (see the module doc)."""
    from torchslim.export.gguf_runtime import LlamaCppDecoder

    path = model.path if isinstance(model, LlamaCppDecoder) else model
    if threads is None and isinstance(model, LlamaCppDecoder):
        threads = model.threads
    dec = LlamaCppDecoder(path, threads=threads, context=prompt_tokens + new_tokens, logits_all=False)
    try:
        vocab = vocab or dec.vocab
        if not is_int(vocab) or not 2 <= vocab <= dec.vocab:
            raise ConfigError(f"vocab must be an integer in [2, {dec.vocab}]; got {vocab!r}")
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, int(vocab), (1, prompt_tokens), generator=g)

        def prefill() -> int:
            dec.reset()
            return dec.greedy(prompt)

        first = prefill()

        def decode() -> None:
            dec.rewind(prompt_tokens)
            token = first
            for _ in range(new_tokens):
                token = dec.greedy([[token]])

        t_prefill = measure(prefill, runs=runs, warmup=warmup, runtime="llama.cpp")
        t_decode = measure(decode, runs=runs, warmup=warmup, runtime="llama.cpp")
    finally:
        dec.close()
    return _result(t_prefill, t_decode, prompt_tokens, new_tokens, dec.threads, runs, warmup,
                   "llama.cpp CPU (llama-cpp-python), greedy loop over its KV cache, last-position logits only")
