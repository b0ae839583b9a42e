"""Decode speed of SmolLM2-135M as an ONNX decoder with a KV cache: fp32 vs int4, against HF eager.

Rows (batch 1, the same intra-op threads everywhere, 2 by default):

* ``HF eager fp32``: ``pretrained:smollm2-135m`` (transformers 5, float32) timed by
  ``ts.lm_speed`` (its ``DynamicCache``);
* ``ONNX fp32``: ``export_onnx_decoder`` of the float model (fused graph: GroupQueryAttention,
  SkipSimplifiedLayerNormalization; the tied head reads the embedding table, stored once);
* ``ONNX fp32 (reference graph)``: the same model through the TorchScript exporter
  (``fused=False``: plain ops, attention written out) - what the fusion buys;
* ``ONNX int4 g32 (acc 4)`` / ``(acc 0)``: ``ts.quantize_`` weight-only int4, groups of 32
  (round to nearest; the method does not change the speed), every Linear incl. the untied
  ``lm_head`` as ``MatMulNBits`` (q/k/v and gate/up fused), the embedding table as int8
  groups of 32 (``QuantizedEmbedding`` bits 8 -> ``GatherBlockQuantized`` bits=8). ``acc 4``:
  the default ``compute="int8"`` model (each layer rounds its input to int8 per group of 32, as
  MatMulNBits does at ``accuracy_level`` 4, ONNX Runtime's integer kernels); ``acc 0``: the same
  integers with ``compute="float"`` (float32 activations, ``accuracy_level`` 0); ``acc 0, head 4``:
  float activations in the decoder layers and int8 ones in ``lm_head`` only (nothing follows the
  head, so its rounding cannot grow through later layers or the KV cache). Each file's
  greedy agreement is measured against the torch model it came from;
* ``llama.cpp int4 GGUF`` (``--llamacpp``): the ``acc 4`` model written by ``ts.export`` as GGUF
  (int4 blocks as Q4_0, the int8 table as Q8_0, carried over bit for bit) and timed in llama.cpp
  itself (``llama-cpp-python``, ``ts.lm_speed`` on the ``.gguf``: llama.cpp rounds activations to
  Q8_0 for these products, as ``acc 4`` does); perplexity in llama.cpp, no greedy column.

Columns: file bytes, prefill of 128 tokens (ms), decode tokens/s (32 greedy tokens after the
128-token prompt), ratios to HF eager and to ONNX fp32, perplexity of the shipped file on the
held-out Shakespeare text (``ts.evaluate_lm`` on the ``.onnx``, 1,024 tokens, one window) and
greedy agreement with the torch model it came from (3 prompts x 16 new tokens, ``ts.generate``).
Speed rows are timed in rounds (after one warm-up round, every round times each row once with
``ts.lm_speed``, one run, the order rotating); each figure is the median over rounds. The machine is shared: the load
average is recorded.

    python benchmarks/llm_decode.py                     # table + results/llm_decode.json
    python benchmarks/llm_decode.py --rounds 3 --threads 2
    python benchmarks/llm_decode.py --rounds 5 --llamacpp  # + the GGUF file in llama.cpp
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import torchslim as ts  # noqa: E402
from torchslim.export.onnx_decoder import OnnxDecoder, export_onnx_decoder  # noqa: E402
from torchslim.profile.latency import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "llm_decode.json"
PROMPTS = ["To be, or not to be, that is the question:", "The capital of France is", "def fibonacci(n):"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _int4_model(compute: str) -> Any:
    from torchslim.quantize import QuantConfig
    from torchslim.quantize.embedding import QuantizedEmbedding
    from torchslim.quantize.primitives import QScheme

    m = ts.create_model("pretrained:smollm2-135m")
    ts.quantize_(m, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=32, compute=compute))
    emb = m.model.embed_tokens
    m.model.embed_tokens = QuantizedEmbedding.from_float(emb, QScheme(bits=8, granularity="group", group_size=32, symmetric=True))
    return m.eval()


def _agreement(ref: Any, path: str, tok: Any, threads: int) -> tuple[float, bool]:
    """Fraction of equal greedy tokens (3 prompts x 16) and whether all are equal."""
    same = total = 0
    for p in PROMPTS:
        a = ts.generate(ref, p, 16, tokenizer=tok, eos_token_id=-1, threads=threads).new_tokens
        b = ts.generate(path, p, 16, tokenizer=tok, eos_token_id=-1, threads=threads).new_tokens
        same += int((a == b).sum())
        total += a.numel()
    return same / total, same == total


def _parts(path: str) -> dict[str, int]:
    """Bytes of the file's tensors by part: embedding table, lm_head, the 30 blocks, the rest."""
    import onnx

    out = {"embedding": 0, "lm_head": 0, "blocks": 0, "other": 0}
    for t in onnx.load(path).graph.initializer:
        n = len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
        key = ("embedding" if "embed" in t.name else "lm_head" if "lm_head" in t.name
               else "blocks" if "layers." in t.name or "MatMul" in t.name else "other")
        out[key] += n
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds (each times every row once)")
    ap.add_argument("--runs", type=int, default=1, help="timed runs per row per round (lm_speed)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--llamacpp", action="store_true", help="also time the int4 model's GGUF file in llama.cpp")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torchslim.zoo.pretrained_llm import tokenizer

    tok = tokenizer("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="llm_decode_"))
    t0 = time.time()
    fp32 = ts.create_model("pretrained:smollm2-135m").eval()
    q4, q4f = _int4_model("int8"), _int4_model("float")
    q4h = copy.deepcopy(q4f)
    q4h.lm_head.act_block = 32  # float activations in the body, int8 ones in the head only
    _log(f"models built ({time.time() - t0:.0f} s)")
    rows: dict[str, dict[str, Any]] = {"HF eager fp32": {"model": fp32, "ref": None,
                                                          "bytes": sum(p.numel() * 4 for p in fp32.parameters())}}
    exports = [("ONNX fp32", fp32, {}), ("ONNX fp32 (reference graph)", fp32, {"fused": False}),
               ("ONNX int4 g32 (acc 4)", q4, {}), ("ONNX int4 g32 (acc 0)", q4f, {}),
               ("ONNX int4 g32 (acc 0, head 4)", q4h, {})]  # each at its model's compute
    for name, model, kw in exports:
        t = time.time()
        info = export_onnx_decoder(model, work / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx"), **kw)
        rows[name] = {"model": info["path"], "ref": model, "bytes": info["bytes"], "bytes_by_part": _parts(info["path"]),
                      "export_s": time.time() - t,
                      "graph": info["graph"], "embedding": info["embedding"], "matmul_nbits": len(info["matmul_nbits"]),
                      "accuracy_level": info["accuracy_level"]}
        _log(f"exported {name}: {info['bytes']:,} bytes ({time.time() - t:.0f} s)")
    if args.llamacpp:
        t = time.time()
        res = ts.export(q4, None, work / "int4.gguf", check=False)
        rows["llama.cpp int4 GGUF"] = {"model": str(work / "int4.gguf"), "ref": None, "bytes": res.size_bytes,
                                       "export_s": time.time() - t, "gguf_types": res.info["types"]}
        _log(f"exported llama.cpp int4 GGUF: {res.size_bytes:,} bytes ({time.time() - t:.0f} s)")
    decoders = {k: (OnnxDecoder(r["model"], threads=args.threads) if str(r["model"]).endswith(".onnx") else r["model"])
                for k, r in rows.items()}
    timings: dict[str, list[Any]] = {k: [] for k in rows}
    order = list(rows)
    loads = [os.getloadavg()[0]]
    for k in order:  # warm-up round, not counted
        ts.lm_speed(decoders[k], prompt_tokens=args.prompt_tokens, new_tokens=4, threads=args.threads, runs=1, warmup=0)
    for r in range(args.rounds):
        for k in order[r % len(order):] + order[: r % len(order)]:
            timings[k].append(ts.lm_speed(decoders[k], prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                          threads=args.threads, runs=args.runs, warmup=0))
        loads.append(os.getloadavg()[0])
        _log(f"round {r + 1}/{args.rounds} done (load {loads[-1]:.1f})")
    for k, row in rows.items():
        row["prefill_ms"] = statistics.median(s.prefill_ms for s in timings[k])
        row["decode_tokens_per_s"] = statistics.median(s.decode_tokens_per_s for s in timings[k])
        row["decode_tokens_per_s_rounds"] = [round(s.decode_tokens_per_s, 2) for s in timings[k]]
        row["prefill_ms_rounds"] = [round(s.prefill_ms, 1) for s in timings[k]]
    base, onnx32 = rows["HF eager fp32"], rows["ONNX fp32"]
    for k, row in rows.items():
        row["decode_vs_hf"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["decode_vs_onnx_fp32"] = row["decode_tokens_per_s"] / onnx32["decode_tokens_per_s"]
        row["prefill_vs_onnx_fp32"] = onnx32["prefill_ms"] / row["prefill_ms"]
        ppl = ts.evaluate_lm(row["model"] if isinstance(row["model"], str) else fp32, "shakespeare", tokenizer=tok,
                             max_tokens=1024, context=1024, threads=args.threads)
        row["perplexity"] = ppl.perplexity
        if row["ref"] is not None:
            row["greedy_agreement"], row["greedy_identical"] = _agreement(row["ref"], row["model"], tok, args.threads)
        _log(f"{k}: perplexity {ppl.perplexity:.2f}")
    ppl_q4, ppl_q4f = (ts.evaluate_lm(m, "shakespeare", tokenizer=tok, max_tokens=1024, context=1024, threads=args.threads).perplexity
                       for m in (q4, q4f))

    head = f"{'row':30s} {'bytes':>13s} {'prefill128 ms':>13s} {'decode tok/s':>12s} {'vs HF':>6s} {'vs ONNX32':>9s} {'ppl':>7s} {'greedy=':>7s}"
    print(f"SmolLM2-135M, batch 1, {args.threads} threads, {cpu_name()}, load avg {min(loads):.1f}-{max(loads):.1f}")
    print(head)
    for k, row in rows.items():
        agree = "" if row["ref"] is None else f"{100 * row['greedy_agreement']:.0f}%"
        print(f"{k:30s} {row['bytes']:>13,} {row['prefill_ms']:>13.1f} {row['decode_tokens_per_s']:>12.1f} "
              f"{row['decode_vs_hf']:>6.2f} {row['decode_vs_onnx_fp32']:>9.2f} {row['perplexity']:>7.2f} {agree:>7s}")
    print(f"torch int4 g32 model (int8 table) perplexity: int8 compute {ppl_q4:.2f}, float compute {ppl_q4f:.2f}")
    result = {
        "model": "pretrained:smollm2-135m", "batch": 1, "threads": args.threads, "cpu": cpu_name(),
        "load_average": loads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "runs_per_round": args.runs, "onnxruntime": __import__("onnxruntime").__version__,
        "torch": torch.__version__, "llama_cpp": __import__("llama_cpp").__version__ if args.llamacpp else None,
        "perplexity_data": "shakespeare test split, first 1024 tokens, one window",
        "torch_int4_perplexity": ppl_q4, "torch_int4_float_compute_perplexity": ppl_q4f,
        "rows": {k: {kk: v for kk, v in r.items() if kk not in ("model", "ref")} for k, r in rows.items()},
        "targets": {"int4_decode_vs_hf_ge_5": rows["ONNX int4 g32 (acc 4)"]["decode_vs_hf"] >= 5,
                    "int4_decode_vs_onnx_fp32_ge_2_5": rows["ONNX int4 g32 (acc 4)"]["decode_vs_onnx_fp32"] >= 2.5,
                    "int4_prefill_not_slower_than_fp32": rows["ONNX int4 g32 (acc 4)"]["prefill_vs_onnx_fp32"] >= 1.0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
