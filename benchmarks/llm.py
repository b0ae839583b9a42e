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
venv on the same model, calibration windows and held-out tokens (``results/llm_peers.json``).

    python benchmarks/llm.py [--tokens N] [--rows fp32,rtn,...] [--quick]

**In llama.cpp** (``llama-cpp-python`` installed): every row named by ``--gguf`` also writes its
GGUF file (``ts.export``: Q4_0 / Q8_0 blocks carried over bit for bit), scores it as transformers
reads it back (``gguf_perplexity``) and in llama.cpp itself (``gguf_llamacpp_perplexity``, and
``gguf_llamacpp_delta_pct`` against the float model scored by torch on the same token ids). Two
rows run in llama.cpp only: ``ref-gguf``, the reference file the wheel ships
(``SmolLM2-135M-Instruct.Q4_1.gguf``, of which the float model is the dequantization: a sanity
row, the two should agree closely), and ``llamacpp-q4_0``, llama.cpp's own Q4_0: the float model
written as an F32 GGUF and quantized by ``llama_model_quantize`` (llama-quantize's code, no
importance matrix; it picks the tied ``token_embd``'s type itself). The ``same_token_ids`` of
``ref-gguf`` records whether llama.cpp's own tokenizer gives torchslim's ids on the scored text.
An ``rtn`` row with ``--gguf`` also compares its int4 blocks with llama.cpp's Q4_0 quantizer on
the same float weights (``q4_0_blocks_vs_llamacpp``: the share of equal 32-weight blocks and
the squared weight error of each): the grid is the same (Q4_0: ``d * (-8..7)``, one fp16 ``d``
per block, carried into the file bit for bit), the choice of ``d`` is not (the scale search).

    python benchmarks/llm.py --rows ref-gguf,llamacpp-q4_0,rtn,gptq+rot --gguf rtn,gptq+rot --tokens 2048 \
        --out llm_llamacpp.json

``rtn-tied`` / ``gptq-tied`` (``--rows`` only) keep ``lm_head`` tied to the one int8 table
(``tie_head=True``), so their GGUF files store it once as ``token_embd``, as llama.cpp's own Q4_0
file does (``--rows rtn-tied,gptq-tied --gguf rtn-tied,gptq-tied --out llm_llamacpp_tied.json``).

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
#: SmolLM2 rows run only when named by --rows: lm_head tied to the one int8 table (``tie_head=True``), so the GGUF
#: file stores the table once, as llama.cpp's own Q4_0 file does (the bytes of ``llamacpp-q4_0``)
SMOL_EXTRA: dict[str, dict[str, Any]] = {
    "rtn-tied": {"method": "rtn", "tie_head": True},
    "gptq-tied": {"method": "gptq", "tie_head": True},
}
#: SmolLM2 rows scored in llama.cpp only (``llama-cpp-python``; see the module doc), never in the default run
LLAMACPP_ROWS: dict[str, dict[str, Any]] = {
    "ref-gguf": {"llamacpp": "the shipped SmolLM2-135M-Instruct.Q4_1.gguf"},
    "llamacpp-q4_0": {"llamacpp": "llama_model_quantize(F32 GGUF of the float model, LLAMA_FTYPE_MOSTLY_Q4_0)"},
}
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
    transformers loads it back, and in llama.cpp when ``llama_cpp`` is importable."""
    import tempfile

    import torch

    import torchslim as ts
    import transformers

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

        tok = tokenizer(MODEL.split(":", 1)[1])
        e = ts.evaluate_lm(back, "shakespeare", tokenizer=tok, max_tokens=tokens, context=1024, stride=512, threads=2)
        out["gguf_perplexity"] = e.perplexity
        del back
        out.update(_llamacpp(Path(tmp) / f"{name}.gguf", tokens, tok))
    return out


def _llamacpp(path: Path, tokens: int, tok: Any) -> dict[str, Any]:
    """Perplexity of the GGUF file ``path`` in llama.cpp on the same token ids (empty without llama_cpp)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return {}
    import torchslim as ts
    from torchslim.export.gguf import gguf_tensor_types

    kinds = {name: kind for name, (kind, _) in gguf_tensor_types(path).items()}
    types: dict[str, int] = {}
    for t in kinds.values():
        types[t] = types.get(t, 0) + 1
    e = ts.evaluate_lm(str(path), "shakespeare", tokenizer=tok, max_tokens=tokens, context=1024, stride=512, threads=2)
    return {"gguf_llamacpp_perplexity": e.perplexity, "gguf_llamacpp_nll": e.nll, "gguf_llamacpp_seconds": round(e.seconds, 1),
            "gguf_llamacpp_tokens_scored": e.tokens, "gguf_file_bytes": path.stat().st_size, "gguf_file_types": types,
            "gguf_token_embd": kinds.get("token_embd.weight"), "llamacpp_threads": e.threads}


def run_llamacpp_row(name: str, tokens: int) -> dict[str, Any]:
    """``ref-gguf`` / ``llamacpp-q4_0``: a GGUF file made without torchslim's quantizers, scored in llama.cpp."""
    import tempfile

    import llama_cpp

    import torchslim as ts
    from torchslim.export.gguf_runtime import LlamaCppDecoder
    from torchslim.lm import text_tokens
    from torchslim.zoo.pretrained_llm import gguf_file, tokenizer

    key = MODEL.split(":", 1)[1]
    tok = tokenizer(key)
    row: dict[str, Any] = {"row": name, **LLAMACPP_ROWS[name], "runtime": "llama.cpp",
                           "llama_cpp_python": llama_cpp.__version__}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llm_llamacpp_") as tmp:
        if name == "ref-gguf":
            path = gguf_file(key)
            dec = LlamaCppDecoder(path, threads=2, context=8)
            ours, _ = text_tokens("shakespeare", tok, max_tokens=tokens)
            theirs, _ = text_tokens("shakespeare", dec.llama_tokenize, max_tokens=tokens)
            row["same_token_ids"] = bool(torch_equal(ours, theirs))
            dec.close()
        else:
            f32 = Path(tmp) / "f32.gguf"
            from torchslim.export.gguf import export_gguf

            export_gguf(ts.create_model(MODEL), f32)  # float weights: F32 (weight_type / embedding_type "auto")
            path = Path(tmp) / "q4_0.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
            params.nthread = 2
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params) != 0:
                raise RuntimeError("llama_model_quantize failed")
            f32.unlink()
        row["calibration_seconds"] = round(time.perf_counter() - start, 1)
        row.update(_llamacpp(Path(path), tokens, tok))
    row["perplexity"] = row["gguf_llamacpp_perplexity"]
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def run_row(name: str, tokens: int, gguf: bool = False) -> dict[str, Any]:
    import torch

    import torchslim as ts
    from torchslim.quantize import QuantConfig, quantize_, quantize_llm_
    from torchslim.quantize.rotate import rotate_

    torch.set_num_threads(2)
    if name in LLAMACPP_ROWS:
        return run_llamacpp_row(name, tokens)
    spec = {**ROWS, **GEMMA_EXTRA, **SMOL_EXTRA}[name]
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
    elif gguf:  # SmolLM2: the GGUF file, read back by transformers and run in llama.cpp
        if spec.get("method") == "rtn" and not spec.get("rotate"):
            row["q4_0_blocks_vs_llamacpp"] = _blocks_vs_ggml(model)
        row.update(_shipped(model, name, tokens, gguf))
    return row


def _blocks_vs_ggml(model: Any) -> dict[str, Any]:
    """How the body's int4 blocks compare with llama.cpp's own Q4_0 quantizer (``quantize_row_q4_0_ref``,
    bit-identical to ``ggml_quantize``) on the same float weights: the share of 32-weight blocks
    that are equal, and the squared weight error of each (summed over the body)."""
    import torch

    import torchslim as ts
    from torchslim.export.gguf import ggml_quantize

    ref = dict(ts.create_model(MODEL).named_modules())
    same = total = 0
    err_ours = err_ggml = 0.0
    for name, module in model.named_modules():
        if not callable(getattr(module, "dequantized_weight", None)) or name.startswith("lm_head") or "embed" in name:
            continue
        w = ref[name].weight.detach().float()
        ints, scales = ggml_quantize(w, "q4_0")
        theirs = (ints.float().reshape(w.shape[0], -1, 32) * scales.float().unsqueeze(-1)).reshape(w.shape)
        ours = module.dequantized_weight().detach().float()
        same += int((ours == theirs).reshape(w.shape[0], -1, 32).all(-1).sum())
        total += w.numel() // 32
        err_ours += float(((ours - w) ** 2).sum().double())
        err_ggml += float(((theirs - w) ** 2).sum().double())
    return {"blocks": total, "blocks_equal": same, "share_equal": same / total if total else 0.0,
            "weight_sq_error_ours": err_ours, "weight_sq_error_llamacpp_q4_0": err_ggml,
            "error_ratio": err_ours / err_ggml if err_ggml else None, "torch": torch.__version__}


def _write(args: argparse.Namespace, tokens: int, results: list[dict[str, Any]], began: float, partial: bool) -> Path:
    payload = {
        "benchmark": "llm", "model": MODEL, **({"command": " ".join(sys.argv)} if MODEL == GEMMA else {}), "tokens": tokens, "context": 1024, "stride": 512, "partial": partial,
        "calibration": "16 windows x 256 tokens of shakespeare[train], sequential=False",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 2,
                    "load_average": os.getloadavg()},
        "wall_seconds": round(time.perf_counter() - began, 1),
        "not_run": {"auto-round": "not installed", "nncf": "not installed",
                    **({} if any(r["row"] == "llamacpp-q4_0" and "error" not in r for r in results) else
                       {"llama.cpp Q4_0": "quoted from the issue (+42%), not re-measured here (row llamacpp-q4_0)"}),
                    **NOT_RUN.get(MODEL, {}),
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
    ap.add_argument("--gguf", default=None, help="comma-separated rows that also write and score a GGUF file (Gemma: default "
                    "gptq; SmolLM2: default none), in llama.cpp too when llama-cpp-python is installed")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row, in a child process
    args = ap.parse_args()
    if args.model not in (MODEL, GEMMA):
        ap.error(f"--model must be {MODEL} or {GEMMA}; got {args.model!r}")
    MODEL = args.model
    gguf_rows = (args.gguf if args.gguf is not None else "gptq" if MODEL == GEMMA else "").split(",")
    tokens = args.tokens or (512 if args.quick else 2048)
    if args.row:
        print("ROW " + json.dumps(run_row(args.row, tokens, gguf=args.row in gguf_rows)))
        return 0
    rows = args.rows.split(",") if args.rows else (GEMMA_ROWS if MODEL == GEMMA else QUICK if args.quick else list(ROWS))
    known = {**ROWS, **GEMMA_EXTRA} if MODEL == GEMMA else {**ROWS, **SMOL_EXTRA, **LLAMACPP_ROWS}
    unknown = [r for r in rows if r not in known]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(known)}")
    if "fp32" not in rows:
        rows = ["fp32", *rows]
    results: list[dict[str, Any]] = []
    began = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    for name in rows:
        extra = ["--model", MODEL, "--gguf", ",".join(gguf_rows)]
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
            for key in ("gguf_perplexity", "gguf_llamacpp_perplexity"):  # the files against torch's float model
                if key in row:
                    row[key.replace("perplexity", "delta_pct")] = 100 * (row[key] / ref_row["perplexity"] - 1)
            if MODEL == GEMMA:
                _percentages(row, ref_row)
        results.append(row)
        _write(args, tokens, results, began, partial=True)
        size = row["bytes"]["total"] if "bytes" in row else row["gguf_file_bytes"]
        print(f"{name:10s} ppl {row['perplexity']:8.3f}  calib {row['calibration_seconds']:6.1f} s  "
              f"bytes {size / 1e6:7.1f} MB  peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
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
        if r.get("runtime") == "llama.cpp":
            continue
        b = r["bytes"]
        print(f"{r['row']:10s} {r['perplexity']:10.3f} {r['delta_pct']:+7.1f}% {b['total'] / 1e6:7.1f} {b['body'] / 1e6:8.1f} "
              f"{(b['embeddings'] + b['lm_head']) / 1e6:11.1f} {r['calibration_seconds']:8.1f} {r['peak_rss_bytes'] / 2**30:8.2f}")
    _print_llamacpp(results, ref)
    out = _write(args, tokens, results, began, partial=False)
    print(f"wrote {out} ({time.perf_counter() - began:.0f} s)")
    return 0


def _print_llamacpp(results: list[dict[str, Any]], ref: float) -> None:
    """The GGUF files in llama.cpp, against the float model in torch on the same token ids."""
    rows = [r for r in results if "gguf_llamacpp_perplexity" in r]
    if not rows:
        return
    print()
    print(f"GGUF files in llama.cpp (2 threads), same token ids; delta vs the float model in torch ({ref:.3f})")
    print(f"{'row':14s} {'llama.cpp':>10s} {'delta':>8s} {'read back':>10s} {'delta':>8s} {'file MB':>8s} {'token_embd':>10s} "
          f"{'eval s':>7s} {'make s':>7s}")
    for r in rows:
        back = f"{r['gguf_perplexity']:10.3f} {r['gguf_delta_pct']:+7.1f}%" if "gguf_perplexity" in r else f"{'':10s} {'':8s}"
        print(f"{r['row']:14s} {r['gguf_llamacpp_perplexity']:10.3f} {r['gguf_llamacpp_delta_pct']:+7.1f}% {back} "
              f"{r['gguf_file_bytes'] / 1e6:8.1f} {str(r.get('gguf_token_embd')):>10s} {r['gguf_llamacpp_seconds']:7.1f} "
              f"{r['calibration_seconds']:7.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
