"""all-MiniLM-L6-v2 (``pretrained:minilm``) quantized for ONNX Runtime: torchslim against ONNX
Runtime's own ``quantize_dynamic``, side by side in one run.

Rows:

* the fp32 ONNX file (the reference of every ratio);
* ONNX Runtime ``quantize_dynamic`` of that file, per tensor and per channel (int8 MatMul and
  embedding tables) -- the line to beat;
* the per-channel file again after torchslim's ``avoid_skip_layernorm_fusion`` graph pass (which
  every torchslim integer file gets): the same graph as torchslim's int8 file less the smoothing,
  to show how much of the speed comes from that pass alone;
* torchslim dynamic int8 (``ts.quantize_(mode="dynamic")`` + ``export_integer_onnx``), without and with
  SmoothQuant scale migration (alpha 0.75, calibrated on 128 training sentences that are not
  among the evaluation pairs), on the layers where it divides the simulated int8 error by 3 (the
  default ``smoothquant_min_gain``) or by 1.25 (more layers, more multiplies);
* torchslim weight-only int4, groups of 32 (round-to-nearest and GPTQ), embedding tables int4
  too, shipped as ONNX Runtime's ``MatMulNBits`` / ``GatherBlockQuantized`` kernels.

For each: bytes of the ONNX file, mean and minimum cosine of the sentence embeddings ONNX Runtime
computes from the file to the fp32 model's (800 sentences of the 400 bundled paraphrase pairs),
paraphrase recall@1, and ONNX Runtime latency at batch 1 and 32 (one intra-op thread; every file
timed in the same process, interleaved round by round; medians). A probe also times ONNX
Runtime's fused ``SkipLayerNormalization`` against the ``Add`` + ``LayerNormalization`` it
replaces at the two batch shapes, and each row records how many such fused nodes ONNX Runtime
made of the file.

    python benchmarks/quantize_minilm.py [--quick]

Prints a table and writes benchmarks/results/quantize_minilm.json (``--quick``: 100 pairs,
few timing rounds, quantize_minilm_quick.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.data.sentences import calibration_batches, evaluate_encoder, paraphrase_pairs, recall_at_1
from torchslim.export.onnx import export_fp32
from torchslim.export.onnx_int import export_integer_onnx, float_twin
from torchslim.export.onnx_passes import avoid_skip_layernorm_fusion
from torchslim.quantize import QuantConfig, quantize_
from torchslim.zoo.pretrained import SentenceEncoder, tokenize

RESULTS = Path(__file__).parent / "results"


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feed(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: batch[k].numpy() for k in SentenceEncoder.input_names}


def ort_quality(path: Path, ref: torch.Tensor, n_pairs: int | None) -> dict[str, float]:
    """Cosine of ONNX Runtime's embeddings (what ships) to the fp32 model's, and recall@1."""
    a, b = paraphrase_pairs(n_pairs)
    sess = _session(path)
    embs = [torch.from_numpy(sess.run(None, _feed(tokenize("minilm", (a + b)[i : i + 64])))[0]) for i in range(0, len(a + b), 64)]
    emb = torch.cat(embs)
    cos = F.cosine_similarity(emb, ref, dim=-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "recall_at_1": recall_at_1(emb[: len(a)], emb[len(a) :])}


def fused_skip_layernorms(path: Path) -> int:
    """How many ``SkipLayerNormalization`` nodes ONNX Runtime's graph optimizer makes of a file."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(d) / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return sum(n.op_type == "SkipLayerNormalization" for n in onnx.load(opts.optimized_model_filepath).graph.node)


def skip_layernorm_probe(shapes: list[tuple[int, ...]], rounds: int = 200) -> list[dict[str, Any]]:
    """ONNX Runtime's fused SkipLayerNormalization vs the Add + LayerNormalization it replaces
    (the same one-Add graph run with and without the fusion), microseconds per call."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    out = []
    for shape in shapes:
        c = shape[-1]
        dims = [f"d{i}" for i in range(len(shape) - 1)] + [c]
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("x", "r", "y")]
        rng = np.random.default_rng(0)
        inits = [numpy_helper.from_array(rng.random(c, dtype=np.float32), n) for n in ("g", "b")]
        nodes = [helper.make_node("Add", ["x", "r"], ["s"]),
                 helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1, epsilon=1e-12)]
        model = helper.make_model(helper.make_graph(nodes, "probe", io[:2], io[2:], inits), opset_imports=[helper.make_opsetid("", 17)])
        feed = {"x": rng.standard_normal(shape, dtype=np.float32), "r": rng.standard_normal(shape, dtype=np.float32)}
        row: dict[str, Any] = {"shape": list(shape)}
        for key, disabled in (("fused_us", []), ("unfused_us", ["SkipLayerNormFusion"])):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
            for _ in range(10):
                sess.run(None, feed)
            ts_ = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                sess.run(None, feed)
                ts_.append((time.perf_counter() - t0) * 1e6)
            row[key] = statistics.median(ts_)
        out.append(row)
    return out


def time_interleaved(files: dict[str, Path], feeds: dict[int, dict[str, Any]], rounds: int) -> dict[str, dict[int, float]]:
    """Median latency (ms) of every file at every batch size, timed round by round in turn."""
    sessions = {k: _session(p) for k, p in files.items()}
    for s in sessions.values():
        for f in feeds.values():
            s.run(None, f)
            s.run(None, f)
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in feeds} for k in files}
    for _ in range(rounds):
        for k, s in sessions.items():
            for b, f in feeds.items():
                t0 = time.perf_counter()
                s.run(None, f)
                times[k][b].append((time.perf_counter() - t0) * 1000)
    return {k: {b: statistics.median(v) for b, v in per.items()} for k, per in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 pairs, 5 timing rounds")
    ap.add_argument("--rounds", type=int, default=40, help="interleaved timing rounds")
    ap.add_argument("--alpha", type=float, default=0.75, help="SmoothQuant migration strength")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.ERROR)  # ONNX Runtime's quantizer is chatty
    n_pairs = 100 if args.quick else None
    rounds = 5 if args.quick else args.rounds
    out = RESULTS / ("quantize_minilm_quick.json" if args.quick else "quantize_minilm.json")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t_start = time.time()
    load = os.getloadavg()[0]
    base = ts.create_model("pretrained:minilm")
    ref = evaluate_encoder(base, n_pairs=n_pairs)
    cal = calibration_batches()
    tmp = Path(tempfile.mkdtemp(prefix="quantize_minilm_"))
    example = ts.example_inputs(base)
    fp32 = export_fp32(float_twin(base), example, tmp / "fp32.onnx")

    rows: list[dict[str, Any]] = []
    files: dict[str, Path] = {}

    def add(name: str, path: Path, extra: dict[str, Any] | None = None) -> None:
        row = {"method": name, "bytes": path.stat().st_size, **(extra or {}), **ort_quality(path, ref["embeddings"], n_pairs),
               "fused_skip_layernorms": fused_skip_layernorms(path)}
        rows.append(row)
        files[name] = path
        print(f"{name:62s} {row['bytes'] / 1e6:7.2f} MB  cos={row['mean_cosine']:.4f} min={row['min_cosine']:.4f}", flush=True)

    add("fp32", fp32)
    for per_channel in (False, True):
        q = tmp / f"ort_{per_channel}.onnx"
        quantize_dynamic(str(fp32), str(q), per_channel=per_channel, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm", "Gather"])
        add(f"ONNX Runtime quantize_dynamic int8 (per {'channel' if per_channel else 'tensor'})", q)
    q = tmp / "ort_sum.onnx"
    q.write_bytes((tmp / "ort_True.onnx").read_bytes())
    avoid_skip_layernorm_fusion(q)
    add("ONNX Runtime quantize_dynamic int8 (per channel) + torchslim's Add->Sum pass", q)

    def ours(name: str, build: Callable[[torch.nn.Module], Any]) -> None:
        m = copy.deepcopy(base)
        t0 = time.time()
        plan = build(m)
        secs = time.time() - t0
        torch_cos = evaluate_encoder(m, ref, n_pairs=n_pairs)["mean_cosine"]
        paths = export_integer_onnx(m, example, tmp / f"ts{len(rows)}.onnx")
        add(name, Path(paths["onnx"]), {"quantize_s": round(secs, 1), "torch_mean_cosine": torch_cos,
                                        "smoothed_layers": len(getattr(plan, "smoothed", []) or [])})

    ours("torchslim dynamic int8", lambda m: quantize_(m, QuantConfig(mode="dynamic")))
    ours(f"torchslim dynamic int8 + SmoothQuant (alpha {args.alpha})",
         lambda m: quantize_(m, QuantConfig(mode="dynamic", smoothquant_alpha=args.alpha), calibration=cal))
    ours(f"torchslim dynamic int8 + SmoothQuant (alpha {args.alpha}, layers gaining >= 1.25x)",
         lambda m: quantize_(m, QuantConfig(mode="dynamic", smoothquant_alpha=args.alpha, smoothquant_min_gain=1.25),
                             calibration=cal))
    int4 = dict(mode="weight-only", bits=4, granularity="group", group_size=32, embeddings=True)
    ours("torchslim weight-only int4 g32 (round-to-nearest), int4 embeddings", lambda m: quantize_(m, QuantConfig(**int4)))
    ours("torchslim weight-only int4 g32 (GPTQ), int4 embeddings",
         lambda m: ts.quantize.gptq_(m, QuantConfig(**int4), calibration=cal))

    a, b = paraphrase_pairs(n_pairs)
    feeds = {bs: _feed(tokenize("minilm", (a + b)[:bs])) for bs in (1, 32)}
    lat = time_interleaved(files, feeds, rounds)
    probe = skip_layernorm_probe([tuple(f["input_ids"].shape) + (384,) for f in feeds.values()], rounds=50 if args.quick else 300)
    base_row = rows[0]
    for r in rows:
        r["lat1_ms"], r["lat32_ms"] = lat[r["method"]][1], lat[r["method"]][32]
        r["size_ratio"] = base_row["bytes"] / r["bytes"]
        r["speedup_b1"] = lat["fp32"][1] / r["lat1_ms"]
        r["speedup_b32"] = lat["fp32"][32] / r["lat32_ms"]

    from rich.console import Console
    from rich.table import Table

    table = Table(title="all-MiniLM-L6-v2 on ONNX Runtime (1 thread; ratios to the fp32 file, same run)")
    for col in ("method", "MB", "smaller", "mean cos", "min cos", "recall@1", "faster b1", "faster b32", "SkipLN"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['bytes'] / 1e6:.1f}", f"{r['size_ratio']:.2f}x", f"{r['mean_cosine']:.4f}",
                      f"{r['min_cosine']:.4f}", f"{r['recall_at_1']:.4f}", f"{r['speedup_b1']:.2f}x", f"{r['speedup_b32']:.2f}x",
                      str(r["fused_skip_layernorms"]))
    Console(width=160).print(table)
    for p in probe:
        print(f"ORT SkipLayerNormalization at {p['shape']}: {p['fused_us']:.0f} us fused vs {p['unfused_us']:.0f} us as Add + LayerNormalization")
    payload = {"benchmark": "quantize_minilm", "pairs": len(a), "reference_recall_at_1": ref["recall_at_1"],
               "threads": 1, "timing_rounds": rounds, "batch_sizes": {bs: list(f["input_ids"].shape) for bs, f in feeds.items()},
               "load_average_at_start": load, "seconds": round(time.time() - t_start, 1), "torch": torch.__version__,
               "skip_layernorm_probe": probe, "rows": rows}
    import onnxruntime

    payload["onnxruntime"] = onnxruntime.__version__
    with atomic_path(out) as p:
        p.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
