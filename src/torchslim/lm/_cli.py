"""CLI verb ``eval``: score a model on held-out data without changing it.

``torchslim eval MODEL --perplexity --data SPEC [--context N] [--stride N] [--max-tokens N]
[--speed] [--threads N] [--json]``

* a text data spec (``shakespeare``, ``text:path.txt``): perplexity of a causal LM on the
  ``test`` split by sliding window (``ts.evaluate_lm``); ``--perplexity`` asks for it explicitly
  and refuses data that holds no text;
* a labeled data spec (``mnist``, ``digits``, ...): accuracy of a classifier on the test split;
* ``--speed``: prefill and decode tokens/s of the LM (``ts.lm_speed``, batch 1, threads stated).

MODEL is a model spec, a directory written by ``ts.save``, an ONNX decoder with a KV cache
(``model.onnx`` written by ``export_onnx_decoder``): the shipped file itself is scored on ONNX
Runtime (perplexity, ``--speed``), or a GGUF file (``model.gguf``), scored in llama.cpp itself
(``pip install llama-cpp-python``; perplexity, ``--speed``). Other exported files (``.pte``,
``.pt2``, ``.tslim``) are refused with exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torchslim._registry import register as _register_entry

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``eval`` verb to the ``torchslim`` parser."""
    from torchslim._cli_common import Number

    p = sub.add_parser("eval", help="perplexity of an LM on held-out text (or accuracy of a classifier); tokens/s")
    p.add_argument("model", metavar="MODEL", help="model spec (e.g. pretrained:smollm2-135m), a directory written by ts.save, "
                   "an ONNX decoder file (model.onnx) or a GGUF file (model.gguf, run in llama.cpp)")
    p.add_argument("--data", required=True,
                   help="data spec: shakespeare or text:path.txt for perplexity; a labeled set (digits, mnist...) for accuracy")
    p.add_argument("--perplexity", action="store_true", help="perplexity on the test split (needs a text data spec)")
    p.add_argument("--context", type=Number(int, 2), default=1024, help="tokens per window (default 1024)")
    p.add_argument("--stride", type=Number(int, 1), help="tokens between window starts, < context (default context/2)")
    p.add_argument("--max-tokens", type=Number(int, 2), default=1024,
                   help="score the first N tokens of the test text (default 1024)")
    p.add_argument("--all-tokens", action="store_true", help="score the whole test text (overrides --max-tokens)")
    p.add_argument("--speed", action="store_true", help="also measure prefill and decode tokens/s (batch 1)")
    p.add_argument("--prompt-tokens", type=Number(int, 1), default=128, help="prompt length for --speed (default 128)")
    p.add_argument("--new-tokens", type=Number(int, 1), default=32, help="decode steps for --speed (default 32)")
    p.add_argument("--threads", type=int, help="torch threads (default: as set)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")
    p.set_defaults(func=_cmd_eval)


def _refuse_exported(spec: str) -> None:
    from torchslim.errors import SpecError

    if Path(spec).suffix.lower() in (".pte", ".pt2", ".tslim"):
        raise SpecError(f"MODEL {spec!r} is an exported file; eval scores a model spec, a directory written by "
                        "ts.save, an ONNX decoder (.onnx written by export_onnx_decoder) or a GGUF file (.gguf, in llama.cpp)")


def _cmd_eval(args: argparse.Namespace) -> int:
    import torchslim as ts
    from torchslim._cli_common import console_for, emit_json
    from torchslim.data.text import TextBundle
    from torchslim.errors import ConfigError
    from torchslim.lm import evaluate_lm, lm_speed

    _refuse_exported(args.model)
    if args.stride is not None and args.stride >= args.context:
        raise ConfigError(f"--stride must be less than --context ({args.context}); got {args.stride}")
    data = ts.load_data(args.data)
    is_text = isinstance(data, TextBundle)
    if args.perplexity and not is_text:
        raise ConfigError(f"--perplexity needs a text data spec (shakespeare, text:path.txt); {args.data!r} holds no text")
    if not is_text and not data.labeled:
        raise ConfigError(f"--data {args.data!r} is unlabeled: give labeled data (accuracy) or text (perplexity)")
    suffix = Path(args.model).suffix.lower()
    onnx = suffix == ".onnx"
    if suffix in (".onnx", ".gguf") and not is_text:
        kind = "an ONNX decoder" if onnx else "a GGUF file"
        raise ConfigError(f"MODEL {args.model!r} is {kind}: score it with a text data spec (shakespeare, text:path.txt)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if onnx:
        from torchslim.export.onnx_decoder import OnnxDecoder

        model: Any = OnnxDecoder(args.model, threads=args.threads)
    elif suffix == ".gguf":
        from torchslim.export.gguf_runtime import LlamaCppDecoder

        model = LlamaCppDecoder(args.model, threads=args.threads, context=args.context + 1)
    else:
        model = ts.load(args.model) if Path(args.model).is_dir() else ts.create_model(args.model)
    payload: dict[str, Any] = {"model": args.model, "data": args.data, "split": "test"}
    if is_text:
        result = evaluate_lm(model, data, context=args.context, stride=args.stride,
                             max_tokens=None if args.all_tokens else args.max_tokens)
        payload["perplexity"] = result.perplexity
        payload["evaluation"] = result.to_dict()
        payload["split_rule"] = data.rule
    else:
        payload["accuracy"] = ts.evaluate(model, data.loader("test", batch_size=256))["accuracy"]
    if args.speed:
        payload["speed"] = lm_speed(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens).to_dict()
    if args.json:
        emit_json(payload)
        return 0
    from rich.markup import escape

    con = console_for(args)
    if is_text:
        con.print(f"[bold]{escape(args.model)}[/bold]: {escape(str(result))}")
        con.print(f"split: {escape(data.rule)}")
    else:
        con.print(f"[bold]{escape(args.model)}[/bold]: accuracy {100 * payload['accuracy']:.2f}% on the test split of {args.data}")
    if args.speed:
        s = payload["speed"]
        con.print(f"speed: prefill {s['prefill_tokens_per_s']:.1f} tokens/s ({s['prompt_tokens']} tokens), decode "
                  f"{s['decode_tokens_per_s']:.1f} tokens/s ({s['new_tokens']} tokens); batch 1, {s['threads']} threads, "
                  f"{s['cpu']}")
    return 0


# found by `torchslim` through the registry (ordered by `order` in --help)
_register_entry("cli_verb", "eval", register, family="lm", order=85, verbs=("eval",))
