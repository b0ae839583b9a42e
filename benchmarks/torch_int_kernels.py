"""Integer kernels in eager PyTorch on CPU: which are real and fast, and what torchslim's
QuantizedLinear gains from them on all-MiniLM-L6-v2 (``pretrained:minilm``), beside torchao.

Two tables, every figure timed in one process, interleaved round by round (medians of paired
per-round ratios to the fp32 reference of the same round), torch intra-op threads fixed:

1. **Layers** (``--skip-layers`` to leave out): one Linear at MiniLM's shapes (384 <-> 1536, 16
   rows = batch 1 x 16 tokens, 4096 rows = batch 32 x 128 tokens) and LeNet-300-100's; each
   candidate kernel against ``F.linear`` fp32: ``quantized::linear_dynamic`` (what torchslim's
   dynamic int8 runs), ``torch._int_mm`` with per-row int8 activations quantized in Python,
   ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` with fp32 inputs (the raw ops)
   and torchslim's weight-only layers with fp32 and bf16 inputs (bf16 ``F.linear`` beside
   them), and the dequantize-then-``F.linear`` reference path of dynamic int8.
2. **MiniLM**: fp32 eager against torchslim dynamic int8 (with and without SmoothQuant alpha
   0.75 calibrated on 128 training sentences; kernel path and the reference path it replaces),
   weight-only int8 per channel and int4 groups of 32 (fp32 model and bf16 model, bf16 eager
   beside them; the kernel each picks is in the table), and torchao 0.18's
   ``Int8DynamicActivationInt8WeightConfig`` / ``Int8WeightOnlyConfig`` / ``Int4WeightOnlyConfig``
   where they run on CPU. Columns: the kernels QuantizedLinear picked at each batch size, bytes
   of the weights file (``ts.save``'s safetensors for torchslim; ``torch.save`` of the state
   dict for torchao's tensor subclasses) and of the quantized Linear layers alone against their
   fp32 state (the embedding tables stay fp32 in every row),
   mean / min cosine of sentence embeddings to fp32 on the 800 held-out sentences of the 400
   paraphrase pairs, speedup over fp32 eager at batch 1 and 32 (real sentences, padded to the
   longest of the batch).

    python benchmarks/torch_int_kernels.py [--quick] [--threads 1]

Writes benchmarks/results/torch_int_kernels.json (``--quick``: 100 pairs, few rounds,
torch_int_kernels_quick.json).
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.data.sentences import calibration_batches, evaluate_encoder, paraphrase_pairs
from torchslim.profile.api import serialized_bytes
from torchslim.profile.latency import cpu_name, measure_interleaved
from torchslim.quantize import QuantConfig, quantize_
from torchslim.quantize.kernels import choose_kernel, reference_kernels
from torchslim.quantize.primitives import QScheme
from torchslim.quantize.weight_only import QuantizedLinear
from torchslim.zoo.pretrained import tokenize

RESULTS = Path(__file__).parent / "results"
LAYER_SHAPES = [  # (rows, in, out)
    (16, 384, 384), (16, 384, 1536), (16, 1536, 384),
    (4096, 384, 384), (4096, 384, 1536), (4096, 1536, 384),
    (1, 784, 300), (64, 784, 300), (64, 300, 100),
]


def paired(times: dict[str, Any], base: str) -> dict[str, float]:
    """Median over rounds of ``base``'s time / each entry's time in the same round."""
    ref = times[base].times_ms
    return {k: statistics.median(r / t for r, t in zip(ref, v.times_ms)) for k, v in times.items()}


# --- 1. layers ------------------------------------------------------------------------------


def _int_mm_dynamic(x: torch.Tensor, wt: torch.Tensor, w_scale: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 activations, ``torch._int_mm``, rescale (the Python-side recipe)."""
    sx = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    xq = torch.round(x / sx).to(torch.int8)
    return torch.addcmul(b, torch._int_mm(xq, wt).float(), sx * w_scale)


def layer_table(runs: int, slow_rows: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    return [_layer_row(m_rows, k, n, runs, slow_rows) for m_rows, k, n in LAYER_SHAPES]


def _layer_row(m_rows: int, k: int, n: int, runs: int, slow_rows: int) -> dict[str, Any]:
    """One shape: every candidate timed against fp32 ``F.linear``, interleaved."""
    lin = torch.nn.Linear(k, n)
    x = torch.randn(m_rows, k)
    xb = x.bfloat16()
    dyn = QuantizedLinear.from_float(lin, QScheme(bits=8, granularity="channel"), dynamic_act=True)
    w8 = QuantizedLinear.from_float(lin, QScheme(bits=8, granularity="channel"))
    w8b = copy.deepcopy(w8).to(torch.bfloat16)
    g = next(d for d in (32, 16, 4, 2, 1) if k % d == 0)
    w4 = QuantizedLinear.from_float(lin, QScheme(bits=4, granularity="group", group_size=g))
    w4b = copy.deepcopy(w4).to(torch.bfloat16)
    w, b = lin.weight.detach(), lin.bias.detach()
    wb, bb = w.bfloat16(), b.bfloat16()
    q8 = w8.qweight
    s8 = w8.scale.float().reshape(-1)
    wt = q8.t()
    fns: dict[str, Callable[[], Any]] = {
        "fp32 F.linear": lambda: F.linear(x, w, b),
        "bf16 F.linear": lambda: F.linear(xb, wb, bb),
        "torchslim dynamic int8 (quantized::linear_dynamic)": lambda: dyn(x),
        "torchslim dynamic int8, reference path": lambda: dyn.reference_forward(x),
        "torch._int_mm + per-row int8 in Python": lambda: _int_mm_dynamic(x, wt, s8, b),
        "torchslim weight-only int8, fp32 (int8_float_mm)": lambda: w8(x),
        "torchslim weight-only int8, bf16 (int8pack where it takes the shape)": lambda: w8b(xb),
        "torchslim weight-only int4 g32 (a smaller group where 32 does not divide), fp32 (unpacked_int4)": lambda: w4(x),
        "torchslim weight-only int4 g32, bf16 (int4pack where it takes the shape, else unpacked_int4)": lambda: w4b(xb),
    }
    kernels = {"dynamic": choose_kernel(dyn, x), "int8 fp32": choose_kernel(w8, x), "int8 bf16": choose_kernel(w8b, xb),
               "int4 fp32": choose_kernel(w4, x), "int4 bf16": choose_kernel(w4b, xb)}
    if m_rows <= slow_rows:  # 10-100x slower than fp32: timed only at small shapes
        fns["_weight_int8pack_mm, fp32 input"] = lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8)
        if kernels["int4 bf16"] == "int4pack":
            from torchslim.quantize.kernels import _layout

            packed, sz = _layout(w4b, "int4pack", torch.bfloat16)
            szf = sz.float()
            fns["_weight_int4pack_mm_for_cpu, fp32 input"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, szf)
    with torch.no_grad():
        t = measure_interleaved(fns, runs=runs if m_rows < 1000 else max(3, runs // 5), warmup=2, threads=torch.get_num_threads())
    ratios = paired(t, "fp32 F.linear")
    row = {"rows": m_rows, "in": k, "out": n, "kernels": kernels, "fp32_ms": t["fp32 F.linear"].median_ms,
           "speedup": {name: ratios[name] for name in fns}}
    print(f"{m_rows:5d} x {k:4d} -> {n:4d}  fp32 {row['fp32_ms']:.3f} ms  " + "  ".join(
        f"{name.split(' (')[0]}: {r:.2f}x" for name, r in ratios.items() if name != "fp32 F.linear"), flush=True)
    return row


# --- 2. MiniLM ------------------------------------------------------------------------------


def kernels_used(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """How many QuantizedLinear calls went to each kernel in one forward."""
    seen: collections.Counter[str] = collections.Counter()
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.update([choose_kernel(mod, args[0])]))
             for m in model.modules() if isinstance(m, QuantizedLinear)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return dict(seen)


def linear_bytes(model: torch.nn.Module, names: set[str] | None = None) -> tuple[int, set[str]]:
    """Bytes of the state of the (Quantized)Linear layers (``names``: those layers), and their names."""
    kinds = (torch.nn.Linear, QuantizedLinear)
    found = {n for n, m in model.named_modules() if isinstance(m, kinds) and (names is None or n in names)}
    total = sum(t.numel() * t.element_size() for n in found for t in model.get_submodule(n).state_dict().values())
    return total, found


def state_dict_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 pairs, few rounds")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds of the MiniLM table")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--alpha", type=float, default=0.75, help="SmoothQuant migration strength")
    ap.add_argument("--skip-layers", action="store_true", help="only the MiniLM table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    n_pairs = 100 if args.quick else None
    rounds = 4 if args.quick else args.rounds
    out = RESULTS / ("torch_int_kernels_quick.json" if args.quick else "torch_int_kernels.json")
    t_start, load = time.time(), os.getloadavg()[0]
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), quantized engine {torch.backends.quantized.engine}")

    layers = [] if args.skip_layers else layer_table(runs=6 if args.quick else 30, slow_rows=64)

    base = ts.create_model("pretrained:minilm").eval()
    ref = evaluate_encoder(base, n_pairs=n_pairs)
    cal = calibration_batches()
    a, b = paraphrase_pairs(n_pairs)
    feeds = {bs: tokenize("minilm", (a + b)[:bs]) for bs in (1, 32)}
    models: dict[str, torch.nn.Module] = {"fp32 eager": base}
    rows: dict[str, dict[str, Any]] = {"fp32 eager": {"bytes": serialized_bytes(base), "mean_cosine": 1.0, "min_cosine": 1.0}}
    forced_reference: set[str] = set()

    def add(name: str, model: torch.nn.Module, *, reference: bool = False, torchao: bool = False, note: str = "") -> None:
        models[name] = model
        if reference:
            forced_reference.add(name)
        with reference_kernels(reference), torch.no_grad():
            q = evaluate_encoder(model, ref, n_pairs=n_pairs)
            used = {f"b{bs}": kernels_used(model, feed) for bs, feed in feeds.items()}
        size = state_dict_bytes(model) if torchao else serialized_bytes(model)
        rows[name] = {"bytes": size, "mean_cosine": q["mean_cosine"], "min_cosine": q["min_cosine"], "kernels": used, "note": note}
        if not torchao:
            qlin = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
            if qlin:
                rows[name]["linear_size_ratio"] = linear_bytes(base, qlin)[0] / linear_bytes(model, qlin)[0]
        print(f"{name:70s} {size / 1e6:6.1f} MB  cos={q['mean_cosine']:.4f} min={q['min_cosine']:.4f}  {used}", flush=True)

    plans: dict[int, Any] = {}

    def ours(config: QuantConfig, calibration: Any = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
        m = copy.deepcopy(base)
        plans[id(m)] = quantize_(m, config, calibration=calibration)
        return m.to(dtype) if dtype is not None else m

    add("bf16 eager", copy.deepcopy(base).to(torch.bfloat16))
    dyn_sq = ours(QuantConfig(mode="dynamic", smoothquant_alpha=args.alpha), cal)
    plan = plans[id(dyn_sq)]
    sq_note = f"{len(plan.smoothed)} layers multiply their input by 1/s, {len(plan.smoothed_into_norm)} divide in the norm"
    add(f"torchslim dynamic int8 + SmoothQuant {args.alpha}", dyn_sq, note=sq_note)
    add(f"torchslim dynamic int8 + SmoothQuant {args.alpha}, reference path (before)", dyn_sq, reference=True)
    add("torchslim dynamic int8 (no smoothing)", ours(QuantConfig(mode="dynamic")))
    w8 = QuantConfig(mode="weight-only", bits=8, granularity="channel")
    w4 = QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=32)
    add("torchslim weight-only int8, fp32 model", ours(w8))
    add("torchslim weight-only int8, bf16 model", ours(w8, dtype=torch.bfloat16))
    add("torchslim weight-only int4 g32, fp32 model", ours(w4))
    add("torchslim weight-only int4 g32, bf16 model", ours(w4, dtype=torch.bfloat16))

    failed: dict[str, str] = {}
    try:
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )
        from torchao.quantization import quantize_ as ao_quantize_

        for name, cfg, dtype in (
            ("torchao Int8DynamicActivationInt8WeightConfig", Int8DynamicActivationInt8WeightConfig(), torch.float32),
            ("torchao Int8WeightOnlyConfig, fp32 model", Int8WeightOnlyConfig(), torch.float32),
            ("torchao Int8WeightOnlyConfig, bf16 model", Int8WeightOnlyConfig(), torch.bfloat16),
            ("torchao Int4WeightOnlyConfig(group_size=32), bf16 model", Int4WeightOnlyConfig(group_size=32), torch.bfloat16),
        ):
            m = copy.deepcopy(base).to(dtype)
            try:
                ao_quantize_(m, cfg)
                with torch.no_grad():
                    m(**feeds[1])
            except Exception as exc:  # noqa: BLE001 -- recorded in the table: it does not run here
                failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                print(f"{name:70s} does not run on this CPU: {failed[name]}")
                continue
            add(name, m, torchao=True)
    except ImportError as exc:
        failed["torchao"] = f"not installed: {exc}"

    # ts.save -> ts.load round trip of the kernel-path dynamic model: integer storage, same outputs
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = ts.save(dyn_sq, Path(d) / "dyn")
        back = ts.load(path)
        with torch.no_grad():
            diff = float((back(**feeds[32]) - dyn_sq(**feeds[32])).abs().max())
        int_buffers = sorted({str(m.qweight.dtype) for m in back.modules() if isinstance(m, QuantizedLinear)})
        saved = (Path(path) / "model.safetensors").stat().st_size
    roundtrip = {"max_abs_diff": diff, "qweight_dtypes": int_buffers, "model_safetensors_bytes": saved}
    print(f"ts.save/ts.load round trip (dynamic + SmoothQuant): max |diff| {diff:.2e}, qweight {int_buffers}, {saved / 1e6:.1f} MB")

    fns: dict[str, Callable[[], Any]] = {}
    for name, m in models.items():
        for bs, feed in feeds.items():
            def call(m: torch.nn.Module = m, feed: dict[str, torch.Tensor] = feed, forced: bool = name in forced_reference) -> Any:
                with reference_kernels(forced):
                    return m(**feed)
            fns[f"{name}|{bs}"] = call
    with torch.no_grad():
        timing = {}
        for bs in feeds:  # one batch size at a time: every round times each model once
            timing.update(measure_interleaved({k: v for k, v in fns.items() if k.endswith(f"|{bs}")}, runs=rounds, warmup=2,
                                              threads=args.threads))
    for bs in feeds:
        ratios = paired({k: v for k, v in timing.items() if k.endswith(f"|{bs}")}, f"fp32 eager|{bs}")
        for name in models:
            rows[name][f"lat{bs}_ms"] = timing[f"{name}|{bs}"].median_ms
            rows[name][f"speedup_b{bs}"] = ratios[f"{name}|{bs}"]
    base_bytes = rows["fp32 eager"]["bytes"]
    for r in rows.values():
        r["size_ratio"] = base_bytes / r["bytes"]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"all-MiniLM-L6-v2, eager PyTorch on CPU ({args.threads} thread; speedups are paired ratios to fp32 eager, same run)")
    for col in ("model", "MB", "smaller", "Linear smaller", "mean cos", "min cos", "faster b1", "faster b32", "kernels"):
        table.add_column(col, justify="left" if col in ("model", "kernels") else "right")
    for name, r in rows.items():
        used = "; ".join(f"{b}: " + ", ".join(f"{k} {v}" for k, v in per.items()) for b, per in r.get("kernels", {}).items() if per)
        table.add_row(name, f"{r['bytes'] / 1e6:.1f}", f"{r['size_ratio']:.2f}x",
                      f"{r['linear_size_ratio']:.2f}x" if "linear_size_ratio" in r else "", f"{r['mean_cosine']:.4f}", f"{r['min_cosine']:.4f}",
                      f"{r['speedup_b1']:.2f}x", f"{r['speedup_b32']:.2f}x", used)
    Console(width=240).print(table)
    for name, r in rows.items():
        if r.get("note"):
            print(f"{name}: {r['note']}")
    for name, why in failed.items():
        print(f"{name}: does not run here ({why})")
    payload = {
        "benchmark": "torch_int_kernels", "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine, "pairs": len(a), "timing_rounds": rounds,
        "batch_shapes": {bs: list(f["input_ids"].shape) for bs, f in feeds.items()}, "load_average_at_start": load,
        "layers": layers, "rows": [{"model": k, **v} for k, v in rows.items()], "not_run": failed, "save_load_roundtrip": roundtrip,
        "seconds": round(time.time() - t_start, 1),
    }
    try:
        import torchao

        payload["torchao"] = torchao.__version__
    except ImportError:
        pass
    with atomic_path(out) as p:
        p.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
