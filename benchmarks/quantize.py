"""Quantization benchmark: file size and ONNX Runtime latency int8 vs fp32, accuracy on real MNIST.

Side by side in one run:

1. ``torchvision:resnet18`` and ``torchvision:mobilenet_v2`` (random init, 1x3x224x224): fp32 ONNX vs
   static int8 QDQ (per-channel, calibrated on 8 random batches through ``ts.quantize_`` +
   ``export_onnx``) vs dynamic int8; ONNX file bytes and median ORT CPU latency (1 thread).
2. ``zoo:lenet5`` trained on the real MNIST subset: test accuracy fp32 vs static int8 with each
   observer (torch fake-quant), vs the int8 ONNX file run by ORT, vs weight-only int8 / int4, and
   4-bit weights / 8-bit activations PTQ vs QAT (one epoch of QAT fine-tuning), with an fp32
   model fine-tuned for the same extra epoch as the control.

Usage::

    python benchmarks/quantize.py [--quick]

Prints tables and writes benchmarks/results/quantize.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.quantize import QuantConfig, export_onnx, qat_convert_, qat_prepare_, quantize_
from torchslim.quantize._onnx import export_fp32, ort_latency


def _runtime(spec: str, tmp: Path, runs: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = ts.create_model(spec).eval()
    x = torch.randn(1, 3, 224, 224)
    calib = [torch.randn(4, 3, 224, 224) for _ in range(8)]
    row: dict[str, Any] = {"model": spec}
    fp32 = export_fp32(model, (x,), tmp / f"{spec.split(':')[1]}.plain.onnx")
    row["fp32_bytes"] = fp32.stat().st_size
    row["fp32_ms"] = ort_latency(fp32, x, runs=runs)
    static = copy.deepcopy(model)
    quantize_(static, QuantConfig(mode="static", calibration_batches=8), calibration=calib)
    files = export_onnx(static, (x,), tmp / f"{spec.split(':')[1]}.static.onnx", calibration=calib)
    row["static_bytes"] = Path(files["onnx"]).stat().st_size
    row["static_ms"] = ort_latency(files["onnx"], x, runs=runs)
    dyn = copy.deepcopy(model)
    quantize_(dyn, QuantConfig(mode="dynamic"))
    files = export_onnx(dyn, (x,), tmp / f"{spec.split(':')[1]}.dynamic.onnx")
    row["dynamic_bytes"] = Path(files["onnx"]).stat().st_size
    row["dynamic_ms"] = ort_latency(files["onnx"], x, runs=runs)
    row["static_size_ratio"] = row["fp32_bytes"] / row["static_bytes"]
    row["static_speedup"] = row["fp32_ms"] / row["static_ms"]
    row["dynamic_size_ratio"] = row["fp32_bytes"] / row["dynamic_bytes"]
    row["dynamic_speedup"] = row["fp32_ms"] / row["dynamic_ms"]
    return row


def _ort_accuracy(path: str, loader: Any) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = total = 0
    for x, y in loader:
        out = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    return correct / total


def _mnist(tmp: Path, epochs: int) -> dict[str, Any]:
    data = ts.load_data("mnist")
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet5", data=data)
    ts.fit(model, data, ts.TrainConfig(epochs=epochs, lr=2e-3, optimizer="adam", device="cpu"), progress=False)
    model.eval()
    test = data.loader("test", 256)
    calib = data.loader("train", 64, shuffle=False)
    acc = {"fp32": ts.evaluate(model, test)["accuracy"]}
    for obs in ("minmax", "percentile", "entropy", "mse"):
        m = copy.deepcopy(model)
        quantize_(m, QuantConfig(mode="static", observer=obs), calibration=calib)
        acc[f"static_int8_{obs}"] = ts.evaluate(m, test)["accuracy"]
        if obs == "minmax":
            files = export_onnx(m, ts.example_inputs(m), tmp / "lenet5.onnx", calibration=calib)
            acc["ort_fp32"] = _ort_accuracy(files["onnx_fp32"], test)
            acc["ort_int8_qdq"] = _ort_accuracy(files["onnx"], test)
    for bits, gran in ((8, "channel"), (4, "channel")):
        m = copy.deepcopy(model)
        quantize_(m, QuantConfig(mode="weight-only", bits=bits, granularity=gran))
        acc[f"weight_only_int{bits}"] = ts.evaluate(m, test)["accuracy"]
    m = copy.deepcopy(model)
    quantize_(m, QuantConfig(mode="static", bits=4, observer="mse", weight_observer="mse"), calibration=calib)
    acc["ptq_w4a8"] = ts.evaluate(m, test)["accuracy"]
    m = copy.deepcopy(model)
    qat_prepare_(m, QuantConfig(mode="qat", bits=4, observer="moving_average", weight_observer="mse"), calibration=calib)
    ts.fit(m, data, ts.TrainConfig(epochs=1, lr=5e-4, optimizer="adam", device="cpu"), progress=False)
    qat_convert_(m)
    acc["qat_w4a8"] = ts.evaluate(m.eval(), test)["accuracy"]
    m = copy.deepcopy(model)  # control: the same extra epoch without quantization
    m.train()
    ts.fit(m, data, ts.TrainConfig(epochs=1, lr=5e-4, optimizer="adam", device="cpu"), progress=False)
    acc["fp32_plus_1_epoch_control"] = ts.evaluate(m.eval(), test)["accuracy"]
    return acc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MobileNetV2 only, fewer timing runs")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quantize.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    specs = ["torchvision:mobilenet_v2"] if args.quick else ["torchvision:resnet18", "torchvision:mobilenet_v2"]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = [_runtime(s, tmp, 5 if args.quick else args.runs) for s in specs]
        acc = _mnist(tmp, args.epochs)
    from rich.console import Console
    from rich.table import Table

    con = Console(width=170)
    t = Table(title="ONNX Runtime CPU, 1 thread, batch 1 (median ms); file bytes")
    for c in ("model", "fp32 MB", "fp32 ms", "static MB", "static ms", "static x size", "static x speed",
              "dynamic MB", "dynamic ms", "dynamic x size", "dynamic x speed"):
        t.add_column(c)
    for r in rows:
        t.add_row(
            r["model"], f"{r['fp32_bytes'] / 1e6:.2f}", f"{r['fp32_ms']:.2f}", f"{r['static_bytes'] / 1e6:.2f}",
            f"{r['static_ms']:.2f}", f"{r['static_size_ratio']:.2f}", f"{r['static_speedup']:.2f}",
            f"{r['dynamic_bytes'] / 1e6:.2f}", f"{r['dynamic_ms']:.2f}", f"{r['dynamic_size_ratio']:.2f}", f"{r['dynamic_speedup']:.2f}",
        )
    con.print(t)
    t2 = Table(title="zoo:lenet5 on the real MNIST subset (1,000 test digits): test accuracy")
    t2.add_column("variant")
    t2.add_column("accuracy")
    for k, v in acc.items():
        t2.add_row(k, f"{100 * v:.2f}%")
    con.print(t2)
    result = {"runtime": rows, "mnist_lenet5": acc, "seconds": time.time() - t0, "torch": torch.__version__}
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp_path:
        Path(tmp_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
