"""Decoder language models: perplexity on held-out text and tokens per second.

``evaluate_lm(model, "shakespeare")`` scores a causal LM (a ``pretrained:`` LLM, compressed or
not) by sliding window on the held-out plays; ``lm_speed(model)`` times prefill and decode with
a KV cache, batch 1; ``generate(model, prompt, n)`` generates text with a KV cache. Each takes a
torch model or an exported ONNX decoder (``export_onnx_decoder``; run on ONNX Runtime).
``torchslim eval MODEL --perplexity --data SPEC`` runs the first from the command line.
"""

from torchslim.lm.evaluate import (
    SMOLLM2_HAMLET_1024,
    PerplexityResult,
    evaluate_lm,
    resolve_tokenizer,
    text_tokens,
)
from torchslim.lm.generate import Generation, generate
from torchslim.lm.speed import LMSpeed, lm_speed

__all__ = [
    "Generation",
    "LMSpeed",
    "PerplexityResult",
    "SMOLLM2_HAMLET_1024",
    "evaluate_lm",
    "generate",
    "lm_speed",
    "resolve_tokenizer",
    "text_tokens",
]

from torchslim.lm import _cli  # noqa: E402,F401  (registers the `eval` CLI verb)
