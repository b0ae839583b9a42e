"""SmolLM2-135M (``pretrained:smollm2-135m``) quantized weight-only to int4 on a CPU: perplexity on
held-out Shakespeare of every torchslim method, in one run.

Rows (each in its own process, so its peak RSS is its own):

* ``fp32``: the float model (dequantized from the shipped GGUF): the reference of every delta;
* ``rtn``: round to nearest, symmetric int4, groups of 32 (torchslim's own RTN), no data; every
  symmetric int4 row's group scales are searched (``scale_rule="search"``, the default: ggml's Q4_0
  rule, clipped steps, least-squares refits; :mod:`torchslim.quantize.scale_search`);
* ``rtn+data``: the same search weighted by the calibration inputs' energy per column (llama.cpp's
  importance-matrix idea), still round to nearest;
* ``gptq``: GPTQ (second-order error compensation);
* ``awq``: activation-aware scaling (alpha grid of 10, scales folded into the RMSNorms and
  ``v_proj`` / ``up_proj``) and per-group clip search;
* ``hqq``: half-quadratic zero-point optimization, no data (asymmetric int4 with fp16 zero points:
  0.5 bit per weight more than the symmetric rows at groups of 32; ``hqq-g64`` has the bytes of
  the others);
* ``awq-gptq``: AWQ's scales, then GPTQ rounding of the scaled weights (instead of clip + nearest);
* each ``+rot``: the same after a randomized-Hadamard rotation of the residual stream;
* ``w8a8`` / ``w8a8+rot``: dynamic int8 (per-channel weights, per-tensor activations at run
  time), where rotation matters most.

The body's Linears are int4 (groups of 32); the embedding table and ``lm_head`` are int8 (groups
of 32; SmolLM2 ties them, so both copies are stored); ``bytes`` is every tensor of the state
dict (tied tensors once). Calibration (gptq, awq): 16 windows of 256 tokens from the ``train``
split of ``shakespeare`` (plays that are never evaluated), every layer measured once on the float
model (``sequential=False``). Perplexity: the first ``--tokens`` tokens (default 2,048) of the
held-out plays (the ``test`` split: First Folio Hamlet first), windows of 1,024 tokens every 512.
``calib s`` is the wall time of the quantization call (tokenizing the calibration windows
included); ``peak RSS`` is the row process's maximum resident set (model load included).

Read the ``hqq`` row with the model's origin in mind: the float reference is dequantized from
``SmolLM2-135M-Instruct.Q4_1.gguf``, so its body weights already lie on asymmetric 4-bit grids of
32 consecutive weights (llama.cpp's Q4_1: a scale and a float minimum per block). An asymmetric
g32 quantizer whose zero point may be fractional (HQQ's, stored in fp16) can find those grids
again (a down_proj's relative weight error: 0.2% for HQQ, 8.1% for min-max asymmetric, 9.7% for
symmetric), so ``hqq`` at g32 is close to lossless *on this model* for that reason; ``hqq-g64``
(two Q4_1 blocks per group) and the rotated rows do not get that gift.

The peers (``auto-round`` 0.16.1, NNCF 3.4.0) are measured by ``benchmarks/llm_peers.py`` in their own
venv on the same model, calibration windows and held-out tokens (``results/llm_peers.json``). Not run:
llama.cpp's Q4_0 (the issue's +42% is quoted, not re-measured).

    python benchmarks/llm.py [--tokens N] [--rows fp32,rtn,...] [--quick]

Prints a table and writes benchmarks/results/llm.json (``--quick``: 512 tokens, fp32 / rtn / awq /
hqq only, llm_quick.json).

**Gemma-3-270M** (``--model pretrained:gemma3-270m``; results in ``llm_gemma3.json``): rows ``fp32``,
``rtn``, ``hqq``, ``gptq``, ``awq`` with the library's defaults for a tied 262k-token table that is
63% of the parameters: the table int8 g32 stored once and ``lm_head`` multiplying by it
(``quantize_llm_``'s ``tie_head="auto"``; ``tie_head=False`` would store a second int8 copy).
Each row also reports ``bytes_pct`` (of the fp32 state dict), the bytes of the ``ts.save``
directory (``save_bytes``), and, for the rows named by ``--gguf`` (default ``gptq``), the GGUF
file of ``ts.export`` (``gguf_bytes``, the tied table written once as ``token_embd``) and the
perplexity of that file as transformers reads it back (dequantized): the shipped file scored.
Rotation is not run (it refuses Gemma-3's sandwich norms), nor ``awq-gptq`` / ``w8a8``.

More Gemma rows (``--rows``): ``gptq+mixed4`` / ``gptq+mixed9`` (the 4 / 9 decoder layers whose
int4 rounding moves the next-token distributions most, measured on calibration text, kept int8),
``rtn-w8`` (int8 body) and ``rtn-untied`` (``tie_head=False``: the second int8 copy of the table).

    python benchmarks/llm.py --model pretrained:gemma3-270m [--tokens N] [--gguf gptq]
    python benchmarks/llm.py --model pretrained:gemma3-270m --rows rtn-untied,gptq+mixed4,gptq+mixed9,rtn-w8 \
        --gguf gptq+mixed4,gptq+mixed9 --out llm_gemma3_mixed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
MODEL = "pretrained:smollm2-135m"
ROWS: dict[str, dict[str, Any]] = {  # in the order they run (most telling first)
    "fp32": {},
    "rtn": {"method": "rtn"},
    "rtn+data": {"method": "rtn", "data": True},
    "awq": {"method": "awq"},
    "hqq": {"method": "hqq"},
    "gptq": {"method": "gptq"},
    "rtn+rot": {"method": "rtn", "rotate": True},
    "awq+rot": {"method": "awq", "rotate": True},
    "hqq+rot": {"method": "hqq", "rotate": True},
    "gptq+rot": {"method": "gptq", "rotate": True},
    "hqq-g64": {"method": "hqq", "group_size": 64},
    "awq-gptq": {"method": "awq-gptq"},
    "awq-gptq+rot": {"method": "awq-gptq", "rotate": True},
    "w8a8": {"w8a8": True},
    "w8a8+rot": {"w8a8": True, "rotate": True},
}
QUICK = ["fp32", "rtn", "awq", "hqq"]
GEMMA = "pretrained:gemma3-270m"
GEMMA_ROWS = ["fp32", "rtn", "hqq", "gptq", "awq"]
#: Gemma only: mixed precision (the ``mixed`` most sensitive decoder layers in int8, measured by
#: :func:`~torchslim.quantize.llm_sensitivity.decoder_sensitivity` on 4 calibration windows of 128
#: tokens, included in ``calib s``) and the int8 body (its bytes still under 30% of fp32)
GEMMA_EXTRA: dict[str, dict[str, Any]] = {
    "gptq+mixed4": {"method": "gptq", "mixed": 4},
    "gptq+mixed9": {"method": "gptq", "mixed": 9},
    "rtn-w8": {"method": "rtn", "bits": 8},
    "rtn-untied": {"method": "rtn", "tie_head": False},  # lm_head quantized apart: a second int8 copy of the table
}
#: rows of other models that are not run, and why
NOT_RUN = {GEMMA: {"+rot rows": "rotate_ refuses Gemma-3 (sandwich norms: the residual stream is normalized after "
                                "each block, so a rotation cannot be folded into the weights)",
                   "awq-gptq, w8a8, rtn+data, hqq-g64": "not part of the Gemma-3 target (int4 g32 at <= 30% of the "
                                                         "fp32 bytes); run them with --rows"}}


def role(name: str) -> str:
    """The part of the model a state-dict entry belongs to: ``embeddings``, ``lm_head`` or ``body``."""
    return "embeddings" if "embed_tokens" in name else "lm_head" if name.startswith("lm_head") else "body"


def state_bytes(state: dict[str, Any]) -> dict[str, int]:
    """Bytes of every tensor of a state dict (shared storage once), split by :func:`role`."""
    seen: set[int] = set()
    out = {"total": 0, "embeddings": 0, "lm_head": 0, "body": 0}
    for name, t in state.items():
        if not hasattr(t, "untyped_storage"):
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        n = t.numel() * t.element_size()
        out["total"] += n
        out[role(name)] += n
    return out


def _state_bytes(model: Any) -> dict[str, int]:
    return state_bytes(model.state_dict(keep_vars=True))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _shipped(model: Any, name: str, tokens: int, gguf: bool) -> dict[str, Any]:
    """Bytes of the ``ts.save`` directory; with ``gguf``, of the GGUF file and its perplexity as
    transformers loads it back (Gemma rows only)."""
    import tempfile

    import torch
    import transformers

    import torchslim as ts

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llm_bench_") as tmp:
        out["save_bytes"] = _dir_bytes(ts.save(model, Path(tmp) / "saved"))
        if not gguf:
            return out
        start = time.perf_counter()
        r = ts.export(model, None, Path(tmp) / f"{name}.gguf", check=False)
        out["gguf_bytes"] = r.size_bytes
        out["gguf_seconds"] = round(time.perf_counter() - start, 1)
        out["gguf_types"] = r.info["types"]
        out["gguf_tied_embeddings"] = r.info["tied_embeddings"]
        out["gguf_snapped"] = sorted(r.info["snapped"])
        out["gguf_tensors"] = {k: v for k, v in r.info["tensor_types"].items() if k in ("token_embd.weight", "output.weight")}
        del model
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=f"{name}.gguf", dtype=torch.float32).eval()
        from torchslim.zoo.pretrained_llm import tokenizer

        e = ts.evaluate_lm(back, "shakespeare", tokenizer=tokenizer(MODEL.split(":", 1)[1]), max_tokens=tokens,
                           context=1024, stride=512, threads=2)
        out["gguf_perplexity"] = e.perplexity
    return out


def run_row(name: str, tokens: int, gguf: bool = False) -> dict[str, Any]:
    import torch

    import torchslim as ts
    from torchslim.quantize import QuantConfig, quantize_, quantize_llm_
    from torchslim.quantize.rotate import rotate_

    torch.set_num_threads(2)
    spec = {**ROWS, **GEMMA_EXTRA}[name]
    model = ts.create_model(MODEL)
    plan = None
    layer_bits = None
    start = time.perf_counter()
    if spec.get("w8a8"):
        if spec.get("rotate"):
            rotate_(model)
        quantize_(model, QuantConfig(mode="dynamic", bits=8))
    elif spec.get("method"):
        if spec.get("mixed"):
            from torchslim.quantize.llm_sensitivity import decoder_sensitivity, mixed_layer_bits

            sens = decoder_sensitivity(model, "shakespeare", windows=4, length=128)
            layer_bits = mixed_layer_bits(model, sens, spec["mixed"])
            spec = {**spec, "int8_layers": sorted({int(k.split(".")[2]) for k in layer_bits}),
                    "sensitivity": [round(v, 5) for v in sens]}
        plan = quantize_llm_(model, bits=spec.get("bits", 4), group_size=spec.get("group_size", 32), method=spec["method"],
                             layer_bits=layer_bits, rotate=spec.get("rotate", False), embedding_bits=8, lm_head_bits=8,
                             tie_head=spec.get("tie_head", "auto"),
                             data="shakespeare" if spec["method"] in ("gptq", "awq", "awq-gptq") or spec.get("data") else None)
    calib = time.perf_counter() - start
    r = ts.evaluate_lm(model, "shakespeare", max_tokens=tokens, context=1024, stride=512, threads=2)
    row = {
        "row": name, **{k: v for k, v in spec.items()}, "perplexity": r.perplexity, "nll": r.nll,
        "tokens_scored": r.tokens, "eval_seconds": round(r.seconds, 1), "calibration_seconds": round(calib, 1),
        "bytes": _state_bytes(model), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "data": r.data, "context": r.context, "stride": r.stride,
    }
    if MODEL == GEMMA:  # the shipped files and the head's layout (tied to the quantized table or apart)
        row["lm_head"] = type(model.lm_head).__name__
        row["tied_heads"] = dict(plan.tied_heads) if plan is not None else {}
        row.update(_shipped(model, name, tokens, gguf))
        row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def _write(args: argparse.Namespace, tokens: int, results: list[dict[str, Any]], began: float, partial: bool) -> Path:
    payload = {
        "benchmark": "llm", "model": MODEL, **({"command": " ".join(sys.argv)} if MODEL == GEMMA else {}), "tokens": tokens, "context": 1024, "stride": 512, "partial": partial,
        "calibration": "16 windows x 256 tokens of shakespeare[train], sequential=False",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 2,
                    "load_average": os.getloadavg()},
        "wall_seconds": round(time.perf_counter() - began, 1),
        "not_run": {"auto-round": "not installed", "nncf": "not installed",
                    "llama.cpp Q4_0": "quoted from the issue (+42%), not re-measured", **NOT_RUN.get(MODEL, {}),
                    **{r["row"]: r["error"] for r in results if "error" in r and MODEL == GEMMA}},
        "rows": results,
    }
    RESULTS.mkdir(exist_ok=True)
    default = "llm_gemma3.json" if MODEL == GEMMA else "llm_quick.json" if args.quick else "llm.json"
    out = RESULTS / (args.out or default)
    from torchslim._fs import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    return out


def _percentages(row: dict[str, Any], ref: dict[str, Any]) -> None:
    """Gemma rows: bytes as % of the fp32 state dict, the GGUF file's too, and its perplexity delta."""
    fp32 = ref["bytes"]["total"]
    row["bytes_pct"] = 100 * row["bytes"]["total"] / fp32
    row["save_bytes_pct"] = 100 * row["save_bytes"] / fp32
    if "gguf_bytes" in row:
        row["gguf_bytes_pct"] = 100 * row["gguf_bytes"] / fp32
        row["gguf_delta_pct"] = 100 * (row["gguf_perplexity"] / ref["perplexity"] - 1)


def _print_gemma(results: list[dict[str, Any]], tokens: int) -> None:
    print()
    print(f"Gemma-3-270M, {tokens} held-out tokens of shakespeare[test] (context 1024, stride 512); body int4 g32, "
          "token table int8 g32 stored once, lm_head tied to it")
    print(f"{'row':12s} {'perplexity':>10s} {'delta':>8s} {'MB':>7s} {'% fp32':>7s} {'body MB':>8s} {'table MB':>8s} "
          f"{'head MB':>7s} {'save MB':>7s} {'calib s':>8s} {'peak GiB':>8s}")
    for r in results:
        if "error" in r:
            print(f"{r['row']:12s} failed: {r['error']}")
            continue
        b = r["bytes"]
        print(f"{r['row']:12s} {r['perplexity']:10.3f} {r.get('delta_pct', 0.0):+7.1f}% {b['total'] / 1e6:7.1f} "
              f"{r.get('bytes_pct', 100.0):6.1f}% {b['body'] / 1e6:8.1f} {b['embeddings'] / 1e6:8.1f} {b['lm_head'] / 1e6:7.1f} "
              f"{r['save_bytes'] / 1e6:7.1f} {r['calibration_seconds']:8.1f} {r['peak_rss_bytes'] / 2**30:8.2f}")
        if "gguf_bytes" in r:
            print(f"{'':12s} GGUF {r['gguf_bytes'] / 1e6:.1f} MB ({r.get('gguf_bytes_pct', 0.0):.1f}% of fp32), "
                  f"read back: perplexity {r['gguf_perplexity']:.3f} ({r.get('gguf_delta_pct', 0.0):+.1f}%)")


def main() -> int:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=None, help="held-out tokens scored (default 2048; --quick 512)")
    ap.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="results file name under benchmarks/results (default llm.json)")
    ap.add_argument("--model", default=MODEL, help=f"{MODEL} (default) or {GEMMA}")
    ap.add_argument("--gguf", default=None, help="Gemma: comma-separated rows that also write and score a GGUF file (default gptq)")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row, in a child process
    args = ap.parse_args()
    if args.model not in (MODEL, GEMMA):
        ap.error(f"--model must be {MODEL} or {GEMMA}; got {args.model!r}")
    MODEL = args.model
    gguf_rows = (args.gguf if args.gguf is not None else "gptq").split(",") if MODEL == GEMMA else []
    tokens = args.tokens or (512 if args.quick else 2048)
    if args.row:
        print("ROW " + json.dumps(run_row(args.row, tokens, gguf=args.row in gguf_rows)))
        return 0
    rows = args.rows.split(",") if args.rows else (GEMMA_ROWS if MODEL == GEMMA else QUICK if args.quick else list(ROWS))
    known = {**ROWS, **GEMMA_EXTRA} if MODEL == GEMMA else ROWS
    unknown = [r for r in rows if r not in known]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(known)}")
    if "fp32" not in rows:
        rows = ["fp32", *rows]
    results: list[dict[str, Any]] = []
    began = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    for name in rows:
        extra = ["--model", MODEL, "--gguf", ",".join(gguf_rows)] if MODEL == GEMMA else []
        proc = subprocess.run([sys.executable, __file__, "--row", name, "--tokens", str(tokens), *extra],
                              capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if proc.returncode or line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{name}: failed: {tail}")
            results.append({"row": name, "error": tail})
            continue
        row = json.loads(line[4:])
        ref_row = next((r for r in results if r["row"] == "fp32" and "perplexity" in r), row if name == "fp32" else None)
        if ref_row is not None:
            row["delta_pct"] = 100 * (row["perplexity"] / ref_row["perplexity"] - 1)
            if MODEL == GEMMA:
                _percentages(row, ref_row)
        results.append(row)
        _write(args, tokens, results, began, partial=True)
        print(f"{name:10s} ppl {row['perplexity']:8.3f}  calib {row['calibration_seconds']:6.1f} s  "
              f"bytes {row['bytes']['total'] / 1e6:7.1f} MB  peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    ref = next(r["perplexity"] for r in results if r["row"] == "fp32" and "perplexity" in r)
    if MODEL == GEMMA:
        _print_gemma(results, tokens)
        out = _write(args, tokens, results, began, partial=False)
        print(f"wrote {out} ({time.perf_counter() - began:.0f} s)")
        return 0
    print()
    print(f"SmolLM2-135M, {tokens} held-out tokens of shakespeare[test] (context 1024, stride 512); body int4 g32, "
          "embeddings + lm_head int8 g32 (w8a8 rows: int8 per channel)")
    print(f"{'row':10s} {'perplexity':>10s} {'delta':>8s} {'MB':>7s} {'body MB':>8s} {'emb+head MB':>11s} {'calib s':>8s} {'peak GiB':>8s}")
    for r in results:
        if "error" in r:
            print(f"{r['row']:10s} failed: {r['error']}")
            continue
        r["delta_pct"] = 100 * (r["perplexity"] / ref - 1)
        b = r["bytes"]
        print(f"{r['row']:10s} {r['perplexity']:10.3f} {r['delta_pct']:+7.1f}% {b['total'] / 1e6:7.1f} {b['body'] / 1e6:8.1f} "
              f"{(b['embeddings'] + b['lm_head']) / 1e6:11.1f} {r['calibration_seconds']:8.1f} {r['peak_rss_bytes'] / 2**30:8.2f}")
    out = _write(args, tokens, results, began, partial=False)
    print(f"wrote {out} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
