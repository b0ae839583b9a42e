"""What one int8 conv call costs in PyTorch beyond its oneDNN kernel, layer by layer.

``benchmarks/onednn_split.py`` finds 1.7-2.9 ms of a compiled int8 ResNet-18 / MobileNetV2 call
spent outside oneDNN's kernels at batch 1. This script measures where that goes, one layer at a
time, on the same models, weights and calibration as ``benchmarks/torch_int8.py``:

* ``qconv``: every 2-D ``Int8Conv`` of the model, called alone through the op inductor's code calls
  (``torch.ops.onednn.qconv_pointwise``, weights prepacked once, uint8 channels-last input of the
  layer's real shape). ``wall`` is the mean time of one call in a tight loop (best of 5 loops);
  ``kernel`` is what oneDNN's verbose mode reports for that call's primitive; ``outside`` is the
  difference. PyTorch builds the oneDNN primitive descriptor, attributes, memory objects,
  scratchpad and output again on every call (``_quantized_convolution_onednn``); only the
  primitive itself comes from oneDNN's cache. ``outside`` also holds the Python call itself,
  whose floor ``python_floor_us`` (one ``aten.alias`` call) is reported beside it.
* ``qlinear A/B``: every 1x1, stride-1, ungrouped conv is a matrix product on the channels-last
  input, so it also runs as ``torch.ops.onednn.qlinear_pointwise``. PyTorch keeps a
  per-weight cache of the whole oneDNN context for that op, behind the process-wide
  ``ONEDNN_CACHE_CONTEXT_UNSAFE=1`` (read once; keyed on the weight's address, so it is unsafe
  when weights are freed and their memory reused). Two child processes, with and without it,
  time the same calls: the difference is the per-call setup on the very same kernel.

One thread, as in ``torch_int8.py``'s table.

    python benchmarks/onednn_call_overhead.py            # table + results/onednn_call_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from onednn_split import _primitives  # noqa: E402
from torch_int8 import SPECS, _model_and_data  # noqa: E402

from torchslim._fs import atomic_path  # noqa: E402
from torchslim.profile.latency import cpu_name  # noqa: E402
from torchslim.quantize import QuantConfig, quantize_  # noqa: E402
from torchslim.quantize.int8 import Int8Conv  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "onednn_call_overhead.json"
_OPS = torch.ops.onednn


def _loop_us(fn: Any, target_s: float = 0.02) -> float:
    """Mean microseconds of one ``fn()`` in a tight loop, best of 5 loops of about ``target_s``."""
    for _ in range(20):
        fn()
    t = time.perf_counter()
    fn()
    n = max(20, int(target_s / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return 1e6 * best


def _layers(name: str) -> list[dict[str, Any]]:
    """The 2-D Int8Conv layers of the quantized model, with the input shape each one sees."""
    model, calib, evals = _model_and_data(name, 0, 4)
    int8 = copy.deepcopy(model)
    quantize_(int8, QuantConfig(mode="static"), calibration=calib)
    shapes: dict[str, list[int]] = {}

    def record(key: str, args: tuple[Any, ...]) -> None:  # a pre-hook's non-None return would replace args
        shapes.setdefault(key, list(args[0].shape))

    hooks = [m.register_forward_pre_hook(lambda mod, args, key=k: record(key, args))
             for k, m in int8.named_modules() if isinstance(m, Int8Conv) and m.dims == 2]
    with torch.no_grad():
        int8(evals[0])
    for h in hooks:
        h.remove()
    out = []
    for k, m in int8.named_modules():
        if k not in shapes:
            continue
        out.append({"layer": k, "input": shapes[k], "qweight": m.qweight.clone(), "weight_scale": m.weight_scale.clone(),
                    "bias": None if m.bias is None else m.bias.detach().clone(), "stride": list(m.stride),
                    "padding": list(m.padding), "dilation": list(m.dilation), "groups": m.groups,
                    "in_scale": float(m.input_scale), "in_zp": int(m.input_zero_point),
                    "out_scale": float(m.output_scale), "out_zp": int(m.output_zero_point)})
    return out


def _qconv_call(lay: dict[str, Any]) -> tuple[Any, torch.Tensor]:
    x = torch.randint(0, 256, lay["input"], dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    packed = _OPS.qconv_prepack(lay["qweight"], lay["weight_scale"], lay["in_scale"], lay["in_zp"], lay["stride"],
                                lay["padding"], lay["dilation"], lay["groups"], lay["input"])
    xs, xz = torch.tensor(lay["in_scale"]), torch.tensor(lay["in_zp"], dtype=torch.int32)
    wz = torch.zeros(lay["qweight"].shape[0], dtype=torch.long)
    args = (xs, xz, packed, lay["weight_scale"], wz, lay["bias"], lay["stride"], lay["padding"], lay["dilation"],
            lay["groups"], lay["out_scale"], lay["out_zp"], torch.uint8, "none", [], "")
    return (lambda t: _OPS.qconv_pointwise.tensor(t, *args)), x


def _is_pointwise(lay: dict[str, Any]) -> bool:
    return (lay["qweight"].shape[2:] == (1, 1) and lay["stride"] == [1, 1] and lay["padding"] == [0, 0]
            and lay["groups"] == 1)


def _qlinear_call(lay: dict[str, Any]) -> Any:
    n, c, h, w = lay["input"]
    x = torch.randint(0, 256, (n * h * w, c), dtype=torch.uint8)
    wq = lay["qweight"].reshape(lay["qweight"].shape[0], c)
    packed = _OPS.qlinear_prepack(wq, [n * h * w, c])
    wz = torch.zeros(wq.shape[0], dtype=torch.long)
    args = (lay["in_scale"], lay["in_zp"], packed, lay["weight_scale"], wz, lay["bias"], lay["out_scale"],
            lay["out_zp"], torch.uint8, "none", [], "")
    return lambda: _OPS.qlinear_pointwise.default(x, *args)


def _child(path: Path) -> int:
    """Time the qlinear form of every pointwise layer saved at ``path`` (run with and without the
    cache flag by the parent); prints one JSON list of microseconds."""
    torch.set_num_threads(1)
    layers = torch.load(path, weights_only=False)
    with torch.no_grad():
        print(json.dumps([_loop_us(_qlinear_call(lay)) for lay in layers]))
    return 0


def _qlinear_ab(layers: list[dict[str, Any]], rounds: int) -> dict[str, list[float]]:
    """Per-layer qlinear microseconds without / with PyTorch's context cache: best of ``rounds``
    alternating child processes each."""
    best: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "layers.pt"
        torch.save(layers, path)
        for r in range(rounds):
            for flag in (("default", "cached") if r % 2 == 0 else ("cached", "default")):
                env = dict(os.environ)
                env.pop("ONEDNN_CACHE_CONTEXT_UNSAFE", None)
                if flag == "cached":
                    env["ONEDNN_CACHE_CONTEXT_UNSAFE"] = "1"
                out = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env, check=True,
                                     capture_output=True, text=True).stdout
                us = json.loads(out.strip().splitlines()[-1])
                best[flag] = us if flag not in best else [min(a, b) for a, b in zip(best[flag], us, strict=True)]
    return best


def bench(name: str, rounds: int) -> dict[str, Any]:
    layers = _layers(name)
    rows = []
    with torch.no_grad():
        for lay in layers:
            fn, x = _qconv_call(lay)
            wall = _loop_us(lambda fn=fn, x=x: fn(x))
            prims = [ms for _ in range(3) for _, _, ms in _primitives(fn, x)]
            kernel = 1e3 * sorted(prims)[len(prims) // 2]
            rows.append({"layer": lay["layer"], "input": lay["input"], "weight": list(lay["qweight"].shape),
                         "groups": lay["groups"], "stride": lay["stride"], "wall_us": wall, "kernel_us": kernel,
                         "outside_us": wall - kernel})
    pointwise = [i for i, lay in enumerate(layers) if _is_pointwise(lay)]
    ab = _qlinear_ab([layers[i] for i in pointwise], rounds) if pointwise else {"default": [], "cached": []}
    for j, i in enumerate(pointwise):
        rows[i]["qlinear_us"] = ab["default"][j]
        rows[i]["qlinear_cached_us"] = ab["cached"][j]
    x = torch.zeros(8)
    floor = _loop_us(lambda: torch.ops.aten.alias.default(x))
    tot = {k: sum(r[k] for r in rows) for k in ("wall_us", "kernel_us", "outside_us")}
    return {"model": name, "spec": SPECS[name], "convs": len(rows), "pointwise_convs": len(pointwise),
            "python_floor_us": floor, "sum_us": tot,
            "qlinear_sum_us": {k: sum(v) for k, v in ab.items()}, "layers": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2", help="comma-separated subset of resnet18, mobilenet_v2")
    ap.add_argument("--rounds", type=int, default=2, help="child processes per qlinear setting (best of)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in ("resnet18", "mobilenet_v2")]
    if bad:
        ap.error(f"unknown models {bad}; choose from resnet18, mobilenet_v2")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1; got {args.rounds}")
    torch.set_num_threads(1)
    load = [os.getloadavg()[0]]
    rows = [bench(n, args.rounds) for n in names]
    load.append(os.getloadavg()[0])
    lines = [f"{cpu_name()}, 1 thread, batch 1, load {min(load):.1f}-{max(load):.1f}; per model call, summed over layers",
             f"{'model':13s} {'convs':>5s} {'wall ms':>8s} {'kernel ms':>9s} {'outside ms':>10s} {'us/conv':>7s} "
             f"{'py floor us':>11s} | {'1x1':>3s} {'qlinear ms':>10s} {'cached ms':>9s} {'saved us/call':>13s}"]
    for r in rows:
        s, q, n1 = r["sum_us"], r["qlinear_sum_us"], r["pointwise_convs"]
        saved = (q["default"] - q["cached"]) / n1 if n1 else float("nan")
        lines.append(f"{r['model']:13s} {r['convs']:5d} {s['wall_us'] / 1e3:8.2f} {s['kernel_us'] / 1e3:9.2f} "
                     f"{s['outside_us'] / 1e3:10.2f} {s['outside_us'] / r['convs']:7.1f} {r['python_floor_us']:11.1f} | "
                     f"{n1:3d} {q['default'] / 1e3:10.2f} {q['cached'] / 1e3:9.2f} {saved:13.1f}")
    table = "\n".join(lines)
    print(table)
    res = {"cpu": cpu_name(), "threads": 1, "torch": torch.__version__, "load_average": load, "rows": rows,
           "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:  # never a half-written file
        tmp.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
