"""Compressing all-MiniLM-L6-v2 (pretrained:minilm) every way torchslim can, measured side by side.

For each method: parameters, bytes (the ONNX file that ships), ONNX Runtime latency at batch 1
and 32 (1 thread, ratios to the original fp32 ONNX in this same run), mean cosine of the
sentence embeddings to the original's and paraphrase recall@1 on the bundled eval pairs.
Unstructured sparsity gives no ORT speed-up (dense kernels) and is exported dense, so its
bytes/latency equal the original's; its column shows what each method keeps of the embeddings.

Run: python benchmarks/compress_bert.py  (writes benchmarks/results/compress_bert.json)
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import torchslim as ts
from torchslim.data.sentences import calibration_batches, evaluate_encoder, train_sentences
from torchslim.prune.heads import drop_layers_, prune_ffn_by_importance_, prune_heads_by_importance_
from torchslim.prune.sparsegpt import sparsegpt_
from torchslim.prune.wanda import wanda_
from torchslim.quantize import QuantConfig, quantize_
from torchslim.quantize._onnx import export_fp32, float_twin, ort_latency
from torchslim.quantize.gptq import gptq_
from torchslim.zoo.pretrained import SentenceEncoder, tokenize

torch.set_num_threads(1)
OUT = Path(__file__).parent / "results" / "compress_bert.json"
ENC = "encoder.encoder.*"


def onnx_files(model: torch.nn.Module, tmp: Path, name: str, int8: bool) -> Path:
    """fp32 ONNX of the (float twin of the) model; with int8, ORT dynamic int8 of MatMul and Gather."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ex = ts.example_inputs(model)
    fp32 = export_fp32(float_twin(model), ex, tmp / f"{name}.fp32.onnx")
    if not int8:
        return fp32
    q = tmp / f"{name}.onnx"
    quantize_dynamic(str(fp32), str(q), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Gather"])
    return q


def ort_evaluate(path: Path, ref: dict) -> dict:
    """Cosine / recall@1 of the embeddings ONNX Runtime computes from the file (what ships)."""
    import onnxruntime as ort

    from torchslim.data.sentences import paraphrase_pairs, recall_at_1

    a, b = paraphrase_pairs()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embs = []
    for i in range(0, len(a + b), 64):
        batch = tokenize("minilm", (a + b)[i : i + 64])
        embs.append(torch.from_numpy(sess.run(None, {k: batch[k].numpy() for k in SentenceEncoder.input_names})[0]))
    emb = torch.cat(embs)
    cos = F.cosine_similarity(emb, ref["embeddings"], dim=-1)
    return {"mean_cosine": float(cos.mean()), "recall_at_1": recall_at_1(emb[: len(a)], emb[len(a) :])}


def distill_(student: torch.nn.Module, teacher: torch.nn.Module, epochs: int, lr: float = 1e-4) -> float:
    """Hidden-state + embedding distillation from the original on the train sentences; returns seconds."""
    t0 = time.time()
    text = train_sentences()
    batches = calibration_batches(text, batch_size=32)
    targets = []
    with torch.no_grad():
        for b in batches:
            targets.append((teacher.hidden_states(**b), teacher(**b)))
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    student.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for i in torch.randperm(len(batches), generator=gen).tolist():
            b, (h_t, e_t) = batches[i], targets[i]
            h = student.hidden_states(**b)
            m = b["attention_mask"].unsqueeze(-1).float()
            e = student(**b)
            loss = (((h - h_t) ** 2) * m).sum() / m.sum() / h.shape[-1] + (1 - F.cosine_similarity(e, e_t)).mean() * 10
            opt.zero_grad()
            loss.backward()
            opt.step()
    student.eval()
    return time.time() - t0


def main() -> None:
    base = ts.create_model("pretrained:minilm")
    ref = evaluate_encoder(base)
    cal = calibration_batches()
    rows: list[dict] = []
    one = tokenize("minilm", ["The doctor repaired the old bicycle yesterday morning."], max_length=32)
    many = tokenize("minilm", train_sentences(32), max_length=32)
    x1 = tuple(one[k] for k in SentenceEncoder.input_names)
    x32 = tuple(many[k] for k in SentenceEncoder.input_names)

    def variant(name: str, build, int8: bool = False, speed: bool = True) -> None:
        m = copy.deepcopy(base)
        t0 = time.time()
        extra = build(m) or {}
        secs = time.time() - t0
        r = evaluate_encoder(m, ref)
        row = {"method": name, "params": sum(p.numel() for p in m.parameters()) if not int8 else None,
               "mean_cosine": r["mean_cosine"], "recall_at_1": r["recall_at_1"], "compress_s": round(secs, 1), **extra}
        if any(isinstance(mod, ts.quantize.QuantizedLinear) for mod in m.modules()):
            row["params"] = sum(p.numel() for p in m.parameters()) + sum(
                mod.in_features * mod.out_features for mod in m.modules() if isinstance(mod, ts.quantize.QuantizedLinear))
        if row["params"] is None:
            row["params"] = sum(p.numel() for p in m.parameters())
        if speed:
            with tempfile.TemporaryDirectory() as d:
                path = onnx_files(m, Path(d), "m", int8)
                row["bytes"] = path.stat().st_size
                row.update(ort_evaluate(path, ref))  # measured on the ONNX Runtime outputs
                row["lat1_ms"] = ort_latency(path, x1, runs=30)
                row["lat32_ms"] = ort_latency(path, x32, runs=10)
        rows.append(row)
        print(f"{name:60s} cos={row['mean_cosine']:.4f} r@1={row['recall_at_1']:.4f} ({secs:.0f}s)", flush=True)

    variant("original (fp32)", lambda m: None)
    variant("ORT dynamic int8", lambda m: None, int8=True)
    for label, fn in [
        ("magnitude 50% (unstructured)", lambda m: ts.sparsify_(m, 0.5, modules=ENC) and None),
        ("Wanda 50% (unstructured)", lambda m: wanda_(m, 0.5, calibration=cal, modules=ENC) and None),
        ("SparseGPT 50% (unstructured)", lambda m: sparsegpt_(m, 0.5, calibration=cal, modules=ENC) and None),
        ("magnitude 2:4", lambda m: ts.sparsify_(m, pattern="2:4", modules=ENC) and None),
        ("Wanda 2:4", lambda m: wanda_(m, pattern="2:4", calibration=cal, modules=ENC) and None),
        ("SparseGPT 2:4", lambda m: sparsegpt_(m, pattern="2:4", calibration=cal, modules=ENC) and None),
        ("int4 g64 round-to-nearest (weight-only)", lambda m: quantize_(m, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=64)) and None),
        ("GPTQ int4 g64 (weight-only)", lambda m: gptq_(m, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=64), calibration=cal) and None),
    ]:
        variant(label, fn, speed=False)
    variant("heads -50% (Michel importance)", lambda m: prune_heads_by_importance_(m, cal, 0.5) and None)
    variant("FFN neurons -50% (Taylor importance)", lambda m: prune_ffn_by_importance_(m, cal, 0.5, round_to=8) and None)
    variant("drop layers 1,3", lambda m: drop_layers_(m, [1, 3]) and None)

    def combo(m: torch.nn.Module) -> dict:
        prune_heads_by_importance_(m, cal, 0.5)
        prune_ffn_by_importance_(m, cal, 0.5, round_to=8)
        drop_layers_(m, [1, 3])
        return {"distill_s": round(distill_(m, base, epochs=4), 1)}

    variant("combo: heads-50% + FFN-50% + drop 2 layers + distill + int8", combo, int8=True)

    o = rows[0]
    for r in rows:
        r["size_ratio"] = o["bytes"] / r["bytes"] if "bytes" in r else None
        r["speedup_b1"] = o["lat1_ms"] / r["lat1_ms"] if "lat1_ms" in r else None
        r["speedup_b32"] = o["lat32_ms"] / r["lat32_ms"] if "lat32_ms" in r else None
    print(f"\n{'method':62s} {'params':>10s} {'MB':>6s} {'smaller':>7s} {'b1':>6s} {'b32':>6s} {'cosine':>7s} {'R@1':>6s}")
    for r in rows:
        mb = f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else "-"
        f = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        print(f"{r['method']:62s} {r['params']:>10,} {mb:>6s} {f(r['size_ratio']):>7s} {f(r['speedup_b1']):>6s} "
              f"{f(r['speedup_b32']):>6s} {r['mean_cosine']:7.4f} {r['recall_at_1']:6.4f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"threads": 1, "reference_recall_at_1": ref["recall_at_1"], "rows": rows,
                               "torch": torch.__version__}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
