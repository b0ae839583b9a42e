"""Static int8 that is real in PyTorch: torch.compile int8 vs fp32, ONNX Runtime int8 vs fp32, torchao's PT2E.

For ResNet-18 and MobileNetV2 (torchvision, random weights with BN statistics re-estimated on
random images, 224x224) and the demo's CNN
(``zoo:conv2``, briefly trained on the bundled MNIST digits, 28x28), in one run:

* ``ts int8``: ``ts.quantize_(mode="static")`` calibrated on a few batches, compiled with
  ``torchslim.quantize.compile`` (torch.compile, inductor freezing, torchslim's graph rewrite
  that fuses residual adds into the int8 convs, torchao's x86 passes -> oneDNN int8 kernels);
  ``fp32``: the float model compiled the same way;
* ``ORT``: ``ts.export`` to ``.onnx`` (the int8 model routes to the QDQ writer) run by ONNX
  Runtime (CPU provider);
* ``torchao PT2E``: ``torch.export`` (strict) -> ``prepare_pt2e`` with ``X86InductorQuantizer``
  (its default config) -> the same calibration batches -> ``convert_pt2e`` -> compiled like ours.

The kernels each int8 flow runs are counted in inductor's generated code (``int8_kernels``:
int8 convs, of which with a residual add fused in, int8 linears).

Latency at batch 1, every runtime timed round by round (``measure_interleaved``, rotating order;
half the rounds with the two int8 flows' places swapped, so neither always follows the fp32 model),
all at the same intra-op threads (2 by default); speedups are ratios of medians from that one
run. Sizes are the ``model.safetensors`` files ``ts.save`` writes. Top-1 agreement with the
fp32 eager model on the same evaluation inputs (random normal images for the torchvision
models, held-out MNIST test digits for the demo CNN).

    python benchmarks/torch_int8.py                 # all three models, table + results/torch_int8.json
    python benchmarks/torch_int8.py --models conv2 --runs 20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# idle threads must not spin: the runtimes are timed in turn on a few shared cores, and threads
# spinning after one runtime's call (OpenMP's active wait, ONNX Runtime's spinning) steal the
# cores of the next. Set before torch loads OpenMP; ONNX Runtime's sessions are told below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import torchslim as ts  # noqa: E402
from torchslim.export.ort import ort_feed  # noqa: E402
from torchslim.profile.latency import cpu_name, measure_interleaved  # noqa: E402
from torchslim.quantize import QuantConfig, quantize_, sqnr  # noqa: E402
from torchslim.quantize import compile as compile_int8  # noqa: E402
from torchslim.quantize.int8_compile import int8_kernels  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "torch_int8.json"
SPECS = {"resnet18": "torchvision:resnet18", "mobilenet_v2": "torchvision:mobilenet_v2", "conv2": "zoo:conv2"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _model_and_data(name: str, seed: int, eval_n: int) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
    """The fp32 model (eval), calibration batches and evaluation inputs (one per row)."""
    g = torch.Generator().manual_seed(seed)
    if name == "conv2":
        data = ts.load_data("mnist", seed=seed)
        model = ts.create_model(SPECS[name], data=data, seed=seed)
        ts.fit(model, data, ts.TrainConfig(epochs=1, lr=0.02, optimizer="sgd", batch_size=64, seed=seed, device="cpu",
                                           max_steps_per_epoch=150), progress=False)
        model.to("cpu").eval()
        calib = [x for x, _ in data.loader("train", 32, shuffle=False)][:4]
        test = torch.cat([x for x, _ in data.loader("test", 64, shuffle=False)])[:eval_n]
        return model, calib, list(test.split(1))
    torch.manual_seed(seed)
    model = ts.create_model(SPECS[name])
    # random init leaves BN at identity statistics, and MobileNetV2's activations then shrink to
    # ~1e-10 deep in the net (torchao's observers clamp such ranges to their eps: 0 dB SQNR);
    # re-estimate the BN statistics on random images so activations have a trained net's scale
    with torch.no_grad():
        model.train()
        for _ in range(4):
            model(torch.randn(8, 3, 224, 224, generator=g))
    model.eval()
    calib = [torch.randn(8, 3, 224, 224, generator=g) for _ in range(4)]
    test = torch.randn(eval_n, 3, 224, 224, generator=g)
    return model, calib, list(test.split(1))


def _torchao_pt2e(model: Any, calib: list[torch.Tensor], example: torch.Tensor) -> Any:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    # strict export: the non-strict one merges the two calls of a block's shared ReLU into one
    # source partition, which X86InductorQuantizer refuses ("more than one output node")
    exported = torch.export.export(copy.deepcopy(model), (example,), strict=True).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calib:  # exported at batch 1: calibrate row by row
            for row in batch.split(1):
                prepared(row)
    return convert_pt2e(prepared)


def ort_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads that do not spin when idle."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _pct(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q / 100))


def _top1(outs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([o.reshape(o.shape[0], -1) for o in outs]).argmax(dim=1)


def _agree(ref: torch.Tensor, outs: list[torch.Tensor]) -> float:
    return float((_top1(outs) == ref).float().mean())


def _sqnr(ref: list[torch.Tensor], outs: list[torch.Tensor]) -> float:
    return sqnr(torch.cat([r.reshape(r.shape[0], -1) for r in ref]), torch.cat([o.reshape(o.shape[0], -1) for o in outs]))


def bench_model(name: str, *, runs: int, threads: int, seed: int, eval_n: int, tmp: Path) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model, calib, evals = _model_and_data(name, seed, eval_n)
    x = evals[0]
    row: dict[str, Any] = {"model": name, "spec": SPECS[name], "input": list(x.shape)}

    t0 = time.perf_counter()
    int8 = copy.deepcopy(model)
    plan = quantize_(int8, QuantConfig(mode="static"), calibration=calib)
    row["integer_layers"], row["fake_quant_layers"] = len(plan.integer), len(plan.fake_quant)
    _log(f"[{name}] quantized {len(plan.integer)} layers in {time.perf_counter() - t0:.1f}s")

    # saved file sizes
    ts.save(model, tmp / f"{name}-fp32")
    ts.save(int8, tmp / f"{name}-int8")
    fp32_bytes = (tmp / f"{name}-fp32" / "model.safetensors").stat().st_size
    int8_bytes = (tmp / f"{name}-int8" / "model.safetensors").stat().st_size
    row.update(fp32_file_bytes=fp32_bytes, int8_file_bytes=int8_bytes, file_ratio=fp32_bytes / int8_bytes)

    # the int8 kernels are really used: count them in inductor's generated code
    row["kernels"] = int8_kernels(int8, x)
    _log(f"[{name}] compiled int8 kernels: {row['kernels']}")

    # ONNX Runtime: fp32 and int8 (QDQ) files through ts.export
    ts.export(model, x, tmp / f"{name}-fp32.onnx", random_inputs=0)
    res = ts.export(int8, x, tmp / f"{name}-int8.onnx", calibration=calib, random_inputs=0)
    row["ort_int8_format"] = res.format
    ort32, ort8 = ort_session(tmp / f"{name}-fp32.onnx", threads), ort_session(tmp / f"{name}-int8.onnx", threads)
    feed32, feed8 = ort_feed(ort32, x), ort_feed(ort8, x)  # the int8 writer names its input "input"

    # torchao's own PT2E flow
    t0 = time.perf_counter()
    ao = _torchao_pt2e(model, calib, x)
    _log(f"[{name}] torchao PT2E prepared/converted in {time.perf_counter() - t0:.1f}s")
    row["torchao_kernels"] = int8_kernels(ao, x)
    _log(f"[{name}] torchao compiled int8 kernels: {row['torchao_kernels']}")

    torch._dynamo.reset()
    c32, c8, cao = compile_int8(model), compile_int8(int8), compile_int8(ao)
    t0 = time.perf_counter()
    with torch.no_grad():
        for f in (c32, c8, cao):
            f(x)
    _log(f"[{name}] compiled fp32 / ts int8 / torchao int8 in {time.perf_counter() - t0:.1f}s")

    fns = {
        "compile_fp32": lambda: c32(x),
        "compile_int8": lambda: c8(x),
        "torchao_pt2e_int8": lambda: cao(x),
        "ort_fp32": lambda: ort32.run(None, feed32),
        "ort_int8": lambda: ort8.run(None, feed8),
    }
    load_before = os.getloadavg()[0]
    # the rotation keeps each runtime's predecessor fixed (a cache-cold follower pays for it):
    # half the rounds with ours right after fp32, half with torchao's there, samples pooled
    order_b = ["compile_fp32", "torchao_pt2e_int8", "compile_int8", "ort_fp32", "ort_int8"]
    halves = [measure_interleaved(fns, runs=(runs + 1) // 2, warmup=3, threads=threads),
              measure_interleaved({k: fns[k] for k in order_b}, runs=runs // 2 or 1, warmup=3, threads=threads)]
    samples = {k: [t for h in halves for t in h[k].times_ms] for k in fns}
    row["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before / after timing
    row["latency_ms"] = {k: {"median": _pct(v, 50), "p25": _pct(v, 25), "p75": _pct(v, 75)} for k, v in samples.items()}
    med = {k: v["median"] for k, v in row["latency_ms"].items()}
    row["speedup"] = {
        "torchslim_compile_int8_over_compile_fp32": med["compile_fp32"] / med["compile_int8"],
        "ort_int8_over_ort_fp32": med["ort_fp32"] / med["ort_int8"],
        "torchao_pt2e_int8_over_compile_fp32": med["compile_fp32"] / med["torchao_pt2e_int8"],
    }

    # top-1 agreement with fp32 eager on the same inputs, and the SQNR of the logits
    with torch.no_grad():
        ref_out = [model(e) for e in evals]
        ref = _top1(ref_out)
        outs = {
            "torchslim_compile_int8": [c8(e) for e in evals],
            "torchslim_eager_int8": [int8(e) for e in evals],
            "ort_int8": [torch.from_numpy(ort8.run(None, ort_feed(ort8, e))[0]) for e in evals],
            "torchao_pt2e_int8": [cao(e) for e in evals],
        }
        row["top1_agreement_with_fp32"] = {k: _agree(ref, v) for k, v in outs.items()}
        row["sqnr_db_vs_fp32"] = {k: _sqnr(ref_out, v) for k, v in outs.items()}
        row["top1_agreement_inputs"] = len(evals)
        # random weights often give one class for every input: then agreement says little (see the SQNR)
        row["fp32_distinct_top1_classes"] = int(ref.unique().numel())
    torch._dynamo.reset()
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("model", "compile fp32 ms", "ts int8 ms", "ts x", "torchao x", "ORT fp32 ms", "ORT int8 ms", "ORT x",
            "file x", "agree ts", "agree ORT", "SQNR ts dB", "SQNR ORT dB", "SQNR torchao dB", "qconv (+add)/qlinear ts", "torchao")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lat, sp, ag = r["latency_ms"], r["speedup"], r["top1_agreement_with_fp32"]
        lines.append(" | ".join([
            r["model"], f"{lat['compile_fp32']['median']:.2f}", f"{lat['compile_int8']['median']:.2f}",
            f"{sp['torchslim_compile_int8_over_compile_fp32']:.2f}", f"{sp['torchao_pt2e_int8_over_compile_fp32']:.2f}",
            f"{lat['ort_fp32']['median']:.2f}", f"{lat['ort_int8']['median']:.2f}", f"{sp['ort_int8_over_ort_fp32']:.2f}",
            f"{r['file_ratio']:.2f}", f"{ag['torchslim_compile_int8']:.3f}", f"{ag['ort_int8']:.3f}",
            *(f"{r['sqnr_db_vs_fp32'][k]:.1f}" for k in ("torchslim_compile_int8", "ort_int8", "torchao_pt2e_int8")),
            *(f"{k['qconv']} ({k.get('qconv_add', 0)})/{k['qlinear']}" for k in (r["kernels"], r["torchao_kernels"])),
        ]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--runs", type=int, default=30, help="timed rounds (each times every runtime once)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", type=int, default=64, help="inputs for the top-1 agreement")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="torch-int8-") as d:
        for name in args.models:
            rows.append(bench_model(name, runs=args.runs, threads=args.threads, seed=args.seed, eval_n=args.eval, tmp=Path(d)))
    result = {
        "cpu": cpu_name(), "threads": args.threads, "batch": 1, "runs": args.runs, "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "ort_allow_spinning": 0,
        "note": "latency medians of one interleaved run per model; speedups are ratios within that run; "
                "load_average_1min: the machine's load before / after each model's timing (it is shared)",
        "models": rows,
    }
    try:
        import onnxruntime
        import torchao

        result["onnxruntime"], result["torchao"] = onnxruntime.__version__, torchao.__version__
    except ImportError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"CPU: {result['cpu']}, {args.threads} threads, batch 1, {args.runs} interleaved rounds")
    print(_table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
