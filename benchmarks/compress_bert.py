"""Compressing all-MiniLM-L6-v2 (pretrained:minilm) every way torchslim can, measured side by side.

For each method: parameters, bytes of the ONNX file that ships, ONNX Runtime latency at batch 1
and 32, mean cosine of the sentence embeddings to the original's and paraphrase recall@1 on the
bundled eval pairs (400 pairs, 800 sentences). Rows with an ONNX file are evaluated on ONNX
Runtime's outputs (what ships). Latency: every ONNX file of the table is timed in the same
process, interleaved round by round (each round runs every file once at batch 1 and once at
batch 32), one intra-op thread; the table gives ratios to the original fp32 file of this run.

The last two rows ship the same distilled student as int8 ONNX Runtime files: first straight
through ONNX Runtime's ``quantize_dynamic``, then through torchslim's dynamic int8 with
SmoothQuant (alpha 0.75, the default minimum gain) and the ``avoid_skip_layernorm_fusion`` graph
pass; the goal is judged on the last row.

Unstructured / 2:4 sparsity and int4 weight-only rows have no ONNX file: ONNX Runtime has no
sparse or int4-weight kernel for these shapes on CPU, so their file and speed would equal the
original's; those rows show what each method keeps of the embeddings.

Run: python benchmarks/compress_bert.py  (about 15 min of one CPU thread; writes
benchmarks/results/compress_bert.json). ``--quick`` runs a small subset (100 pairs, 1 epoch,
few timing rounds) for development and writes compress_bert_quick.json instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from quantize_minilm import ort_quality, time_interleaved  # ONNX Runtime helpers shared by both benchmarks

import torchslim as ts
from torchslim.data.sentences import (
    calibration_batches,
    evaluate_encoder,
    train_sentences,
)
from torchslim.distill.tinybert import distill_hidden_
from torchslim.export.onnx import export_fp32
from torchslim.export.onnx_int import float_twin
from torchslim.export.onnx_passes import avoid_skip_layernorm_fusion
from torchslim.lowrank.api import FactorizeConfig, factorize_
from torchslim.prune.heads import drop_layers_, prune_ffn_by_importance_, prune_heads_by_importance_
from torchslim.prune.sparsegpt import sparsegpt_
from torchslim.prune.wanda import wanda_
from torchslim.quantize import QuantConfig, quantize_
from torchslim.quantize.gptq import gptq_
from torchslim.zoo.pretrained import tokenize

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results"
ENC = "encoder.encoder.*"
EMBEDDING_TABLES = ("*embeddings.word_embeddings*", "*embeddings.position_embeddings*", "*embeddings.token_type_embeddings*")
INT4_BLOCK = 32


# --------------------------------------------------------------------------- ONNX


@torch.no_grad()
def int4_embeddings_(model: torch.nn.Module, block: int = INT4_BLOCK) -> None:
    """Round every embedding table to int4 in blocks of ``block`` along the hidden axis, with
    the exact rounding of ONNX Runtime's ``GatherBlockQuantized`` quantizer (symmetric, the
    signed absolute maximum of a block maps to -8), so the later ONNX pass reproduces the values."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Embedding):
            w = mod.weight.double()
            rows, cols = w.shape
            v = w.reshape(rows, cols // block, block)
            hi, lo = v.amax(-1, keepdim=True), v.amin(-1, keepdim=True)
            scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -8.0
            q = torch.where(scale == 0, torch.zeros_like(v), v / scale).round().clamp(-8, 7)
            mod.weight.copy_((q * scale).reshape(rows, cols).to(mod.weight.dtype))


def onnx_file(model: torch.nn.Module, tmp: Path, name: str, quant: str, graph_pass: bool = False) -> Path:
    """The shipped ONNX file of ``model``.

    ``quant``: ``"fp32"``; ``"int8"``: ONNX Runtime dynamic int8, per channel, of MatMul and
    Gather (embedding tables); ``"int8+int4emb"``: int8 MatMul, and the embedding tables as int4
    blocks of 32 (``GatherBlockQuantized``). ``graph_pass``: then torchslim's
    ``avoid_skip_layernorm_fusion`` (what every torchslim integer file gets).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    fp32 = export_fp32(float_twin(model), ts.example_inputs(model), tmp / f"{name}.fp32.onnx")
    if quant == "fp32":
        return fp32
    q = tmp / f"{name}.onnx"
    ops = ["MatMul", "Gemm", "Gather"] if quant == "int8" else ["MatMul", "Gemm"]
    quantize_dynamic(str(fp32), str(q), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=ops)
    if quant == "int8+int4emb":
        cfg = DefaultWeightOnlyQuantConfig(
            block_size=INT4_BLOCK, is_symmetric=True, op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),)
        )
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        nbits = MatMulNBitsQuantizer(onnx.load(str(q)), algo_config=cfg)
        nbits.process()
        nbits.model.save_model_to_file(str(q), False)
    if graph_pass:
        avoid_skip_layernorm_fusion(q)
    return q


def ort_evaluate(path: Path, ref: dict[str, Any], n_pairs: int | None) -> dict[str, float]:
    """Mean cosine / recall@1 of the embeddings ONNX Runtime computes from the file (what ships)."""
    return ort_quality(path, ref["embeddings"], n_pairs)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subset for development")
    args = parser.parse_args()
    n_pairs = 100 if args.quick else None
    epochs = 1 if args.quick else 10
    lowrank_epochs = 1 if args.quick else 5
    rounds = 5 if args.quick else 40
    out_path = RESULTS / ("compress_bert_quick.json" if args.quick else "compress_bert.json")
    load = os.getloadavg()[0]
    t_start = time.time()

    base = ts.create_model("pretrained:minilm")
    ref = evaluate_encoder(base, n_pairs=n_pairs)
    cal = calibration_batches()
    train = train_sentences()
    rows: list[dict[str, Any]] = []
    files: dict[str, Path] = {}
    tmp = Path(tempfile.mkdtemp(prefix="compress_bert_"))

    def variant(name: str, build: Callable[[torch.nn.Module], dict[str, Any] | None], quant: str | None = None,
                start: torch.nn.Module | None = None, graph_pass: bool = False) -> torch.nn.Module:
        m = copy.deepcopy(start if start is not None else base)
        t0 = time.time()
        extra = build(m) or {}
        row: dict[str, Any] = {"method": name, "params": sum(p.numel() for p in m.parameters()),
                               "compress_s": round(time.time() - t0, 1), **extra}
        for mod in m.modules():  # packed int4 weights count as the weights they stand for
            if isinstance(mod, ts.quantize.QuantizedLinear):
                row["params"] += mod.in_features * mod.out_features
        r = evaluate_encoder(m, ref, n_pairs=n_pairs)
        row.update(torch_mean_cosine=r["mean_cosine"], mean_cosine=r["mean_cosine"], min_cosine=r["min_cosine"],
                   recall_at_1=r["recall_at_1"], onnx=quant)
        if quant is not None:
            path = onnx_file(m, tmp, f"m{len(rows)}", quant, graph_pass)
            files[name] = path
            row["bytes"] = path.stat().st_size
            row.update(ort_evaluate(path, ref, n_pairs))  # the shipped file's own outputs
        rows.append(row)
        print(f"{name:72s} cos={row['mean_cosine']:.4f} r@1={row['recall_at_1']:.4f} ({row['compress_s']:.0f}s)", flush=True)
        return m

    variant("original (fp32)", lambda m: None, "fp32")
    variant("ONNX Runtime dynamic int8 (MatMul + embeddings, per channel)", lambda m: None, "int8")
    variant("ONNX Runtime int8 MatMul + int4 embeddings (block 32)", lambda m: None, "int8+int4emb")
    for label, fn in [
        ("magnitude 50% (unstructured)", lambda m: ts.sparsify_(m, 0.5, modules=ENC)),
        ("Wanda 50% (unstructured)", lambda m: wanda_(m, 0.5, calibration=cal, modules=ENC)),
        ("SparseGPT 50% (unstructured)", lambda m: sparsegpt_(m, 0.5, calibration=cal, modules=ENC)),
        ("magnitude 2:4", lambda m: ts.sparsify_(m, pattern="2:4", modules=ENC)),
        ("Wanda 2:4", lambda m: wanda_(m, pattern="2:4", calibration=cal, modules=ENC)),
        ("SparseGPT 2:4", lambda m: sparsegpt_(m, pattern="2:4", calibration=cal, modules=ENC)),
        ("int4 g64 round-to-nearest (weight-only)",
         lambda m: quantize_(m, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=64))),
        ("GPTQ int4 g64 (weight-only)",
         lambda m: gptq_(m, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=64), calibration=cal)),
    ]:
        variant(label, lambda m, fn=fn: fn(m) and None)
    variant("heads -50% (Michel importance), no retraining", lambda m: prune_heads_by_importance_(m, cal, 0.5) and None, "fp32")
    variant("FFN neurons -50% (Taylor importance), no retraining",
            lambda m: prune_ffn_by_importance_(m, cal, 0.5, round_to=8) and None, "fp32")
    variant("drop layers 1 and 3, no retraining", lambda m: drop_layers_(m, [1, 3]) and None, "fp32")
    svd = FactorizeConfig(method="svd", target_params=0.5, modules=(ENC,))
    lowrank = variant("low-rank SVD (each Linear -50% params), no retraining", lambda m: factorize_(m, svd) and None, "fp32")

    def distill(m: torch.nn.Module, n: int) -> dict[str, Any]:
        res = distill_hidden_(m, base, train, epochs=n, lr=5e-4, freeze=EMBEDDING_TABLES)
        return {"distill_epochs": n, "distill_s": round(res.seconds, 1)}

    variant(f"low-rank SVD -50% + distill ({lowrank_epochs} epochs)", lambda m: distill(m, lowrank_epochs), "fp32", start=lowrank)

    def pruned(m: torch.nn.Module) -> dict[str, Any]:
        prune_heads_by_importance_(m, cal, 0.25)
        prune_ffn_by_importance_(m, cal, 0.5, round_to=8)
        int4_embeddings_(m)  # the tables the int4 ONNX file will hold, frozen while distilling
        return distill(m, epochs)

    student = variant(f"heads -25% + FFN -50% + int4 embeddings + distill ({epochs} epochs), fp32 ONNX", pruned, "fp32")
    variant(f"heads -25% + FFN -50% + int4 embeddings + distill ({epochs} epochs) + int8", lambda m: None, "int8+int4emb",
            start=student)
    # the same student through torchslim's int8: SmoothQuant where it pays, and the graph pass
    smooth = QuantConfig(mode="dynamic", smoothquant_alpha=0.75)
    variant(f"heads -25% + FFN -50% + int4 embeddings + distill ({epochs} epochs) + int8 SmoothQuant, Add->Sum pass",
            lambda m: {"smoothed_layers": len(quantize_(m, smooth, calibration=cal).smoothed)}, "int8+int4emb",
            start=student, graph_pass=True)

    one = tokenize("minilm", ["The doctor repaired the old bicycle yesterday morning."])
    many = tokenize("minilm", train[:32])
    feeds = {1: {k: v.numpy() for k, v in one.items()}, 32: {k: v.numpy() for k, v in many.items()}}
    lat = time_interleaved(files, feeds, rounds)
    o = rows[0]
    for r in rows:
        r["size_ratio"] = o["bytes"] / r["bytes"] if "bytes" in r else None
        if r["method"] in lat:
            r["lat1_ms"], r["lat32_ms"] = lat[r["method"]][1], lat[r["method"]][32]
        r["speedup_b1"] = lat[o["method"]][1] / r["lat1_ms"] if "lat1_ms" in r else None
        r["speedup_b32"] = lat[o["method"]][32] / r["lat32_ms"] if "lat32_ms" in r else None
    final = rows[-1]
    goal = {
        "size_ratio>=6": final["size_ratio"] >= 6, "speedup_b1>=2.5": final["speedup_b1"] >= 2.5,
        "speedup_b32>=2.5": final["speedup_b32"] >= 2.5, "mean_cosine>=0.98": final["mean_cosine"] >= 0.98,
        "recall_at_1_within_1_point": ref["recall_at_1"] - final["recall_at_1"] <= 0.01 + 1e-9,
    }

    def fmt(v: float | None, spec: str) -> str:
        return format(v, spec) if v is not None else "-"

    print(f"\n{'method':84s} {'params':>10s} {'MB':>6s} {'smaller':>7s} {'b1':>6s} {'b32':>6s} {'cosine':>7s} {'R@1':>6s}")
    for r in rows:
        mb = f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else "-"
        print(f"{r['method']:84s} {r['params']:>10,} {mb:>6s} {fmt(r['size_ratio'], '.2f'):>7s} "
              f"{fmt(r['speedup_b1'], '.2f'):>6s} {fmt(r['speedup_b32'], '.2f'):>6s} {r['mean_cosine']:7.4f} {r['recall_at_1']:6.4f}")
    print(f"goal (last row): {goal} -> {'met' if all(goal.values()) else 'NOT met'}")
    import onnxruntime

    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "threads": 1, "timing_rounds": rounds, "batch_sizes": {"1": list(one["input_ids"].shape), "32": list(many["input_ids"].shape)},
        "eval_pairs": ref["pairs"], "reference_recall_at_1": ref["recall_at_1"], "goal": goal, "goal_met": all(goal.values()),
        "load_average_at_start": load, "total_s": round(time.time() - t_start, 1), "rows": rows,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
    }, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
