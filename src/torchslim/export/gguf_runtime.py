"""Running a GGUF file in llama.cpp itself (``llama-cpp-python``): the file a llama.cpp / ollama user runs.

:class:`LlamaCppDecoder` opens a ``.gguf`` file with ``llama_cpp.Llama`` (CPU, ``logits_all``)
and is a callable ``decoder(ids) -> logits``: token ids ``(batch, tokens)`` in, float32 logits
``(batch, tokens, vocab)`` out, as a torch causal LM would give, so ``ts.evaluate_lm("model.gguf",
data)`` scores the shipped file with the same windows and the same token ids as the torch model
(each row is a fresh sequence: ``reset()`` then ``eval(ids)``; the logits of every position are
read from ``scores``). ``step(ids)`` appends tokens to the sequence held in llama.cpp's KV cache;
opened with ``logits_all=False`` (the last position's logits only, as llama.cpp generates),
``greedy(ids)`` appends and returns the argmax and ``rewind(n)`` cuts the sequence back:
``ts.lm_speed("model.gguf")`` times prefill and decode that way.

**Token ids.** The ids are the ones torchslim computes with the Hugging Face tokenizer, never
llama.cpp's own tokenizer: :meth:`LlamaCppDecoder.hf_tokenizer` is the tokenizer of the
``pretrained:`` LLM whose GGUF file holds the same ``tokenizer.*`` keys (a file exported from it,
or that file itself: the very tokenizer the torch model is scored with), else the one
transformers reads from the file (``AutoTokenizer.from_pretrained(folder, gguf_file=)``, the same
reading that builds the tokenizer of a ``pretrained:`` LLM); or pass ``tokenizer=``. llama.cpp's tokenizer (``tokenize(text)``, no BOS) gives the same ids as
torchslim's on the first 2,048 tokens of ``shakespeare``'s held-out text for SmolLM2 (checked by
``benchmarks/llm.py --llamacpp``, which records it as ``same_token_ids``). A file written without
tokenizer keys (``tokenizer_from=False``, or a model not built from a ``pretrained:`` spec) runs
with llama.cpp's vocabulary type ``none`` (a key override): the ids then come from ``tokenizer=``.

**Numbers.** llama.cpp's CPU kernels do not compute what the dequantized float model in torch
computes: a Q4_0 / Q8_0 weight is multiplied with the activations rounded to Q8_0 blocks (32
int8 values and one scale), and an F16 weight with activations rounded to fp16. On a tiny random
Llama (``tests/lm/test_gguf_llamacpp.py``) the perplexity of the file in llama.cpp and in torch
(the dequantized weights) differ by 9e-6 relative for F32, 2e-5 for F16, 4e-4 for Q8_0 and
1.3e-4 for Q4_0. On SmolLM2's shipped Q4_1 file (Q8_1 activations) llama.cpp gives 63.40 on
the reference 1,024 tokens where torch gives 63.27 on the dequantized float model (+0.2%).

Missing ``llama_cpp``: a :class:`~torchslim.errors.MissingDependencyError` naming
``pip install llama-cpp-python`` (it builds llama.cpp from source: a few minutes).

Example:
    >>> from torchslim.export.gguf_runtime import is_gguf_file
    >>> is_gguf_file("runs/smol/model.gguf"), is_gguf_file("model.onnx")
    (True, False)
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchslim.errors import CheckpointError, ConfigError, MissingDependencyError, ModelRunError

__all__ = ["PIP", "LlamaCppDecoder", "is_gguf_file", "llama_cpp_module"]

#: how to install the llama.cpp bindings
PIP = "pip install llama-cpp-python"


def llama_cpp_module() -> Any:
    """``import llama_cpp``, or a one-line :class:`MissingDependencyError` naming :data:`PIP`."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingDependencyError(f"running a GGUF file in llama.cpp needs the package llama-cpp-python, which is "
                                     f"not importable ({exc}); install it with: {PIP}") from exc
    return llama_cpp


def is_gguf_file(model: Any) -> bool:
    """Whether ``model`` is a path to a ``.gguf`` file (the file itself is checked when opened)."""
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".gguf"


class LlamaCppDecoder:
    """A GGUF file run by llama.cpp on the CPU (see the module doc).

    Args:
        path: the ``.gguf`` file.
        threads: llama.cpp threads (prompt and decode; default torch's current count).
        context: llama.cpp's context (KV cache) length; grown (the file reopened) when a call needs
            more tokens.
        logits_all: compute the logits of every position (perplexity); ``False``: of the last one
            only, as llama.cpp does when it generates (:meth:`greedy`; ``ts.lm_speed``).

    Raises:
        MissingDependencyError: ``llama_cpp`` is not installed.
        CheckpointError: the file is missing or llama.cpp cannot load it.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None, context: int = 512,
                 logits_all: bool = True) -> None:
        self.path = str(path)
        self.logits_all = bool(logits_all)
        if not Path(self.path).is_file():
            raise CheckpointError(f"no GGUF file at {self.path}")
        self.threads = int(threads) if threads is not None else torch.get_num_threads()
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1; got {threads!r}")
        from torchslim.export.gguf_read import gguf_metadata

        self.metadata = gguf_metadata(self.path)
        self.has_vocab = "tokenizer.ggml.model" in self.metadata
        self._llm: Any = None
        self._context = 0
        self._open(max(int(context), 2))

    def _open(self, context: int) -> None:
        llama_cpp = llama_cpp_module()
        if self._llm is not None:
            self._llm.close()
            self._llm = None
        overrides = None if self.has_vocab else {"tokenizer.ggml.model": "none"}  # ids come from tokenizer=
        try:  # one batch per call: a whole window is one llama_decode
            self._llm = llama_cpp.Llama(self.path, n_ctx=context, n_batch=context, n_ubatch=context, logits_all=self.logits_all,
                                        n_threads=self.threads, n_threads_batch=self.threads, kv_overrides=overrides,
                                        verbose=False)
        except Exception as exc:  # noqa: BLE001 - one line for the user
            raise CheckpointError(f"llama.cpp could not load {self.path}: {type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0]}") from exc
        self._context = context

    @property
    def vocab(self) -> int:
        return int(self._llm.n_vocab())

    @property
    def context(self) -> int:
        return self._context

    @property
    def tokens(self) -> int:
        """Tokens held in llama.cpp's KV cache (the sequence :meth:`step` extends)."""
        return int(self._llm.n_tokens)

    def reset(self) -> None:
        """Start a new sequence (the KV cache is overwritten from position 0)."""
        self._llm.reset()

    def _check(self, ids: Any) -> np.ndarray:
        arr = np.asarray(torch.as_tensor(ids).cpu(), dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] < 1:
            raise ModelRunError(f"token ids must be (batch, tokens) with tokens >= 1; got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab):
            raise ModelRunError(f"token ids must lie in [0, {self.vocab}) (the vocabulary of {self.path}); "
                                f"got {int(arr.min())}..{int(arr.max())}")
        return arr

    def step(self, ids: Any) -> torch.Tensor:
        """Append ``ids`` ``(1, tokens)`` to the current sequence; the logits of those positions ``(1, tokens, vocab)``."""
        if not self.logits_all:
            raise ModelRunError(f"{self!r} computes the last position's logits only (logits_all=False); use greedy()")
        start, n = self._eval(ids)
        return torch.from_numpy(np.array(self._llm.scores[start:start + n], dtype=np.float32))[None]

    def _eval(self, ids: Any) -> tuple[int, int]:
        arr = self._check(ids)
        if arr.shape[0] != 1:
            raise ModelRunError(f"llama.cpp runs one sequence here (batch 1); got batch {arr.shape[0]}")
        start, n = self.tokens, arr.shape[1]
        if start + n > self._context:
            raise ModelRunError(f"{start + n} tokens exceed llama.cpp's context of {self._context} for {self.path}; "
                                "open it with a larger context=")
        try:
            self._llm.eval(arr[0].tolist())
        except Exception as exc:  # noqa: BLE001 - one line for the user
            raise ModelRunError(f"llama.cpp failed on {self.path} ({n} tokens after {start}): {type(exc).__name__}: "
                                f"{(str(exc).splitlines() or [''])[0]}") from exc
        return start, n

    def greedy(self, ids: Any) -> int:
        """Append ``ids`` ``(1, tokens)`` to the sequence; the most likely next token (argmax of the last logits)."""
        self._eval(ids)
        last = np.ctypeslib.as_array(self._llm._ctx.get_logits_ith(-1), shape=(self.vocab,))
        return int(last.argmax())

    def rewind(self, tokens: int) -> None:
        """Keep the first ``tokens`` of the sequence (the next call overwrites the KV cache after them)."""
        if not 0 <= tokens <= self.tokens:
            raise ConfigError(f"rewind: tokens must lie in [0, {self.tokens}]; got {tokens!r}")
        self._llm.n_tokens = int(tokens)

    def __call__(self, input_ids: Any) -> torch.Tensor:
        """The logits ``(batch, tokens, vocab)`` of every position, each row a fresh sequence."""
        arr = self._check(input_ids)
        if arr.shape[1] > self._context:
            self._open(arr.shape[1])
        rows = []
        for row in arr:
            self.reset()
            rows.append(self.step(row[None])[0])
        return torch.stack(rows)

    def llama_tokenize(self, text: str) -> list[int]:
        """``text`` as llama.cpp's own tokenizer reads it (no BOS, special tokens as text)."""
        if not self.has_vocab:
            raise ConfigError(f"{self.path} holds no tokenizer (no tokenizer.* keys)")
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def hf_tokenizer(self) -> Any:
        """The Hugging Face tokenizer transformers reads from the file's ``tokenizer.*`` keys.

        Raises:
            ConfigError: the file holds no tokenizer, or transformers cannot read it.
        """
        if not self.has_vocab:
            raise ConfigError(f"no tokenizer known for {self.path} (the file has no tokenizer.* keys): pass tokenizer= "
                              "(a Hugging Face tokenizer or a function str -> token ids)")
        name = self.pretrained()
        if name is not None:  # the very tokenizer object torchslim reads text with for the torch model
            from torchslim.zoo.pretrained_llm import tokenizer

            return tokenizer(name)
        from torchslim._optional import require

        transformers = require("transformers", "the tokenizer of a GGUF file")
        path = Path(self.path).resolve()
        try:
            return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as exc:  # noqa: BLE001 - one line for the user
            raise ConfigError(f"transformers could not read the tokenizer of {self.path} ({type(exc).__name__}: "
                              f"{(str(exc).splitlines() or [''])[0]}): pass tokenizer=") from exc

    def pretrained(self) -> str | None:
        """The ``pretrained:`` LLM whose source GGUF file holds the same ``tokenizer.*`` keys as this
        file (a file torchslim exported from it, or that file itself), or None."""
        from torchslim.export.gguf_read import gguf_metadata
        from torchslim.zoo import pretrained_llm

        for name in pretrained_llm.list_llms():
            try:
                source = pretrained_llm.gguf_file(name) if self._same_name(name) else None
            except Exception:  # noqa: BLE001 - its wheel is not installed: not this one
                source = None
            if source is None:
                continue
            ours, theirs = gguf_metadata(self.path, arrays=True), gguf_metadata(source, arrays=True)
            keys = {k for k in (*ours, *theirs) if k.startswith("tokenizer.")}
            if all(ours.get(k) == theirs.get(k) for k in keys):
                return name
        return None

    def _same_name(self, name: str) -> bool:
        """Whether the file's ``general.basename`` (copied by the exporter) is the one of ``pretrained:name``
        (checked before the source file is located: the Gemma file is reassembled on first use)."""
        def squash(text: str) -> str:
            return "".join(c for c in text.lower() if c.isalnum())

        base = squash(str(self.metadata.get("general.basename") or ""))
        return bool(base) and squash(name).startswith(base)

    def describe(self) -> str:
        """llama.cpp, the threads and the CPU, for reports."""
        return f"llama.cpp (llama-cpp-python {getattr(llama_cpp_module(), '__version__', '?')}) CPU, " \
               f"{self.threads} threads, {platform.processor() or platform.machine()}"

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __repr__(self) -> str:
        return f"LlamaCppDecoder({self.path!r}, threads={self.threads}, context={self._context})"
