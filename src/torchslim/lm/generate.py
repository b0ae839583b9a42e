"""Text generation with a KV cache: one loop for a torch causal LM and for an ONNX decoder.

:func:`generate` prefills the prompt once, then adds one token per step, each step reading and
extending the key/value cache:

* a torch model (transformers ``...ForCausalLM``, float or compressed) keeps its cache in
  transformers' ``DynamicCache``; a torch model that takes no cache is run on the whole
  sequence at every step (same tokens, slower);
* an ONNX decoder written by :func:`torchslim.export.onnx_decoder.export_onnx_decoder` (a path
  to the ``.onnx`` file, or an :class:`~torchslim.export.onnx_decoder.OnnxDecoder`) runs on ONNX
  Runtime through an :class:`~torchslim.export.onnx_decoder_run.DecodeState` of prompt +
  ``max_new_tokens`` positions (a fused file's cache is updated in place; a reference file's
  ``present.*`` outputs are fed back as the next step's ``past_key_values.*``).

Greedy decoding (the default) takes the arg-max token; ``greedy=False`` samples from
``softmax(logits / temperature)`` (optionally the ``top_k`` best) with a seeded generator. So
greedy generations of a torch model and of the ONNX file exported from it can be compared token
for token (the parity check of issue 22).

Example:
    >>> import torch, transformers
    >>> from torchslim.lm.generate import generate
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> out = generate(model, [1, 2, 3], max_new_tokens=4)
    >>> out.new_tokens.shape, out.runtime
    (torch.Size([1, 4]), 'torch')
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim._utils import evaluating, is_int, logits_of, model_device, num_threads
from torchslim.errors import ConfigError, ModelRunError

__all__ = ["Generation", "generate"]


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` produced.

    Attributes:
        tokens: ``(batch, prompt + new)`` int64: the prompt followed by the generated ids.
        new_tokens: ``(batch, new)`` int64: the generated ids only (rows that reached
            ``eos_token_id`` are padded with it).
        text: the decoded new tokens (one string per prompt; a single string for a single
            prompt), or ``None`` without a tokenizer.
        prompt_tokens: prompt length.
        seconds: wall time of the loop (prefill and every step).
        runtime: ``"torch"`` or ``"onnxruntime"``.
    """

    tokens: torch.Tensor
    new_tokens: torch.Tensor
    text: str | list[str] | None
    prompt_tokens: int
    seconds: float
    runtime: str

    def __str__(self) -> str:
        return str(self.text) if self.text is not None else str(self.new_tokens.tolist())


def _encode(prompt: Any, tokenizer: Any) -> tuple[torch.Tensor, bool]:
    """``(ids (batch, tokens) int64, single)`` of ``prompt``: text, a list of ids or a tensor."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt)):
        if tokenizer is None:
            raise ConfigError("a text prompt needs tokenizer= (or a model built from a pretrained: LLM spec)")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = []
        for t in texts:
            enc = tokenizer(t)
            rows.append(list(enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc))
        if len({len(r) for r in rows}) != 1:
            raise ConfigError(f"prompts of a batch must have equal token counts (no padding); got {[len(r) for r in rows]}: "
                              "call generate once per prompt")
        return torch.tensor(rows, dtype=torch.long), isinstance(prompt, str)
    if isinstance(prompt, torch.Tensor):
        ids = prompt
    elif isinstance(prompt, (list, tuple)) and prompt and all(is_int(p) for p in prompt):
        ids = torch.tensor(list(prompt), dtype=torch.long)
    elif isinstance(prompt, np.ndarray):
        ids = torch.from_numpy(prompt)
    else:
        raise ConfigError("prompt must be text (with a tokenizer), a list of token ids, or a (batch, tokens) / 1-D "
                          f"tensor of ids; got {type(prompt).__name__}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] < 1 or ids.is_floating_point():
        raise ConfigError(f"prompt ids must be integers of shape (tokens,) or (batch, tokens); got {tuple(ids.shape)} {ids.dtype}")
    return ids.long().cpu(), False


def _decode(tokenizer: Any, rows: torch.Tensor, eos: int | None) -> list[str]:
    out = []
    for r in rows.tolist():
        if eos is not None and eos in r:
            r = r[: r.index(eos)]
        out.append(tokenizer.decode(r, skip_special_tokens=True) if hasattr(tokenizer, "decode") else str(r))
    return out


class _Picker:
    """Greedy arg-max, or seeded sampling from the (top-k) softmax."""

    def __init__(self, greedy: bool, temperature: float, top_k: int | None, seed: int) -> None:
        self.greedy, self.temperature, self.top_k = greedy, temperature, top_k
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # (batch, vocab) -> (batch,)
        if self.greedy:
            return logits.argmax(-1)
        z = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < z.shape[-1]:
            kth = torch.topk(z, self.top_k, dim=-1).values[..., -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        return torch.multinomial(torch.softmax(z, -1), 1, generator=self.gen)[:, 0]


def _torch_stepper(model: nn.Module) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """``step(ids, first) -> last logits (batch, vocab)``: a cached forward (transformers) or a full one."""
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else ("past_key_values" if "past_key_values" in params else None)
    device = model_device(model)
    state: dict[str, Any] = {}
    if cache_arg is not None:
        from transformers import DynamicCache

        def step(ids: torch.Tensor, first: bool) -> torch.Tensor:
            if first:
                state["cache"] = DynamicCache()
            out = model(input_ids=ids.to(device), use_cache=True, **{cache_arg: state["cache"]})
            return logits_of(out)[:, -1].float().cpu()
        return step

    def full(ids: torch.Tensor, first: bool) -> torch.Tensor:  # no cache: the whole sequence each step
        state["seq"] = ids if first else torch.cat([state["seq"], ids], 1)
        return logits_of(model(state["seq"].to(device)))[:, -1].float().cpu()
    return full


def _onnx_stepper(dec: Any, capacity: int) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    state: dict[str, Any] = {}

    def step(ids: torch.Tensor, first: bool) -> torch.Tensor:
        if first:
            state["cache"] = dec.start(ids.shape[0], capacity)
        logits = state["cache"].step(ids.numpy().astype(np.int64))
        return torch.from_numpy(np.ascontiguousarray(logits[:, -1]))
    return step


def _tokenizer_of(model: Any, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    from torchslim.lm.evaluate import resolve_tokenizer

    try:
        return resolve_tokenizer(model)
    except ConfigError:
        return None


def generate(
    model: nn.Module | str | os.PathLike[str] | Any,
    prompt: str | Sequence[str] | Sequence[int] | torch.Tensor,
    max_new_tokens: int = 32,
    *,
    tokenizer: Any = None,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_token_id: int | None = None,
    threads: int | None = None,
) -> Generation:
    """Generate ``max_new_tokens`` tokens after ``prompt`` with a KV cache (see the module doc).

    The model is run in eval mode under ``no_grad`` and left as it was.

    Args:
        model: a torch causal LM, or an ONNX decoder (path to the ``.onnx`` file written by
            ``export_onnx_decoder``, or an ``OnnxDecoder``).
        prompt: text (needs a tokenizer: ``tokenizer=`` or the one of the ``pretrained:`` LLM the
            model or file came from), a list of token ids, or ids ``(tokens,)`` / ``(batch, tokens)``.
        max_new_tokens: tokens to add (fewer when every row reached ``eos_token_id``).
        tokenizer: a Hugging Face tokenizer (or a function text -> ids); with one, the result
            holds the decoded text.
        greedy: arg-max decoding; ``False`` samples (``temperature``, ``top_k``, ``seed``).
        eos_token_id: stop a row at this token (default: the tokenizer's EOS when a tokenizer
            is given, else never: exactly ``max_new_tokens`` tokens).
        threads: torch intra-op threads, or the ONNX Runtime session's (default: as set /
            torch's current count).

    Raises:
        ConfigError: bad prompt or counts; a text prompt with no tokenizer known.
        ModelRunError: the model does not run on token ids.
    """
    from torchslim.export.onnx_decoder import OnnxDecoder, is_onnx_decoder

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    if not greedy and (not isinstance(temperature, (int, float)) or temperature <= 0):
        raise ConfigError(f"temperature must be > 0; got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ConfigError(f"top_k must be an integer >= 1 or None; got {top_k!r}")
    onnx = is_onnx_decoder(model) or isinstance(model, OnnxDecoder)
    if is_onnx_decoder(model):
        model = OnnxDecoder(model, threads=threads if threads is not None else torch.get_num_threads())
    elif not onnx and not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch causal LM or an ONNX decoder path (.onnx); got {type(model).__name__}")
    needs_text = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str))
    tok = _tokenizer_of(model, tokenizer) if (tokenizer is not None or needs_text) else None
    ids, single = _encode(prompt, tok)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    pick = _Picker(greedy, float(temperature), top_k, seed)
    step = _onnx_stepper(model, ids.shape[1] + max_new_tokens) if onnx else _torch_stepper(model)
    new: list[torch.Tensor] = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    start = time.perf_counter()
    ctx = evaluating(model) if not onnx else contextlib.nullcontext()
    with torch.no_grad(), ctx, num_threads(None if onnx else threads):
        try:
            logits = step(ids, True)
            for i in range(max_new_tokens):
                token = pick(logits)
                if eos_token_id is not None:
                    token = torch.where(done, torch.full_like(token, eos_token_id), token)
                    done |= token == eos_token_id
                new.append(token)
                if bool(done.all()) or i == max_new_tokens - 1:
                    break
                logits = step(token[:, None], False)
        except (ConfigError, ModelRunError):
            raise
        except Exception as exc:  # noqa: BLE001 - one line for the user
            raise ModelRunError(f"generation failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from exc
    seconds = time.perf_counter() - start
    new_ids = torch.stack(new, 1)
    text: str | list[str] | None = None
    if tok is not None and hasattr(tok, "decode"):
        decoded = _decode(tok, new_ids, eos_token_id)
        text = decoded[0] if single else decoded
    return Generation(tokens=torch.cat([ids, new_ids], 1), new_tokens=new_ids, text=text, prompt_tokens=ids.shape[1],
                      seconds=seconds, runtime="onnxruntime" if onnx else "torch")

