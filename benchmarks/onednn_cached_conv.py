"""Would int8 convs with cached oneDNN primitives close issue 21's gap? A probe, not a product path.

``benchmarks/onednn_split.py`` showed that a compiled int8 MobileNetV2 spends 3.05 ms in
oneDNN's kernels and 2.92 ms around them, which we first took for PyTorch's per-call work in
``onednn::qconv_pointwise``. PyTorch does not export its oneDNN, so this probe builds a small C++
extension (``benchmarks/cpp/onednn_cached_conv.cpp``) against a separate oneDNN: each conv's
primitive and reordered weights are created once, and a call only points the primitive at the
input / output tensors and executes it.

The answer was no. Alone, the convs cost about 2 us per call outside the kernels; but when commit
8a45e4a ran every int8 conv of ``ts.quantize.compile`` on such an operator, a compiled MobileNetV2
took the same time as with PyTorch's kernels (5.82 vs 5.78 ms, 200 alternating calls, 1 thread):
PyTorch's per-call cost is small, and the time outside the kernels lies elsewhere (see the
README). The integration was reverted (71b559b); this probe stays as the record.

For every conv of torchvision's MobileNetV2 and ResNet-18 (224 px, batch 1; random int8 weights,
per-channel scales, uint8 NHWC inputs of the shapes each conv sees; ReLU6 / ReLU post-op), it
times the 52 / 20 calls from Python and sums the time spent inside ``dnnl_primitive_execute`` (C++
clock) in each of ``--runs`` passes: the median difference is the per-call cost this path leaves.
It also checks two convs against a float reference (dequantize, conv, ReLU6, requantize): the
share of identical uint8 codes and the largest difference.

Needs (not in ``make setup``: this is a probe)::

    pip install --no-deps onednn-cpu-gomp==2023.2.0 onednn-devel==2024.2.0

``onednn-cpu-gomp`` is oneDNN 3.2 for CPUs with GNU OpenMP (PyPI's ``onednn`` 2024+ wheels are
SYCL builds needing the DPC++ runtime); ``onednn-devel`` brings the 3.5 headers, whose
``dnnl_config.h`` names the SYCL runtime, so the build includes a copy with the CPU / OpenMP
runtime set (written to the build folder). Only C API calls that 3.2 has are used.

    python benchmarks/onednn_cached_conv.py --threads 1   # table + results/onednn_cached_conv.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from torchslim._fs import atomic_path
from torchslim.profile.latency import cpu_name

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "onednn_cached_conv.json"


def _build() -> object:
    from torch.utils.cpp_extension import load

    prefix = Path(sys.prefix)
    header = prefix / "include" / "oneapi" / "dnnl" / "dnnl_config.h"
    lib = prefix / "lib" / "libdnnl.so.3"
    if not header.is_file() or not lib.exists():
        raise SystemExit("needs oneDNN: pip install --no-deps onednn-cpu-gomp==2023.2.0 onednn-devel==2024.2.0 "
                         f"(looked for {header} and {lib})")
    build = Path(tempfile.gettempdir()) / "torchslim_onednn_probe"
    (build / "include" / "oneapi" / "dnnl").mkdir(parents=True, exist_ok=True)
    text = header.read_text()
    for macro in ("DNNL_CPU_THREADING_RUNTIME", "DNNL_CPU_RUNTIME"):
        text = re.sub(rf"#define {macro} \w+", f"#define {macro} DNNL_RUNTIME_OMP", text)
    text = re.sub(r"#define DNNL_GPU_RUNTIME \w+", "#define DNNL_GPU_RUNTIME DNNL_RUNTIME_NONE", text)
    (build / "include" / "oneapi" / "dnnl" / "dnnl_config.h").write_text(text)
    return load("torchslim_onednn_probe", [str(HERE / "cpp" / "onednn_cached_conv.cpp")],
                extra_include_paths=[str(build / "include"), str(prefix / "include")],
                extra_cflags=["-O2", "-fopenmp"], extra_ldflags=[f"-L{prefix / 'lib'}", "-l:libdnnl.so.3",
                                                                   f"-Wl,-rpath,{prefix / 'lib'}", "-lgomp"])


def _convs(name: str) -> list[tuple[torch.nn.Conv2d, tuple[int, ...], int]]:
    """(conv, input shape, post-op: 2 = ReLU6, 1 = ReLU, 0 = none) for every conv of the model."""
    import torchvision

    model = getattr(torchvision.models, name)().eval()
    seen: list[tuple[torch.nn.Conv2d, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, tuple(i[0].shape))))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    act = 2 if name == "mobilenet_v2" else 1
    return [(conv, shape, act) for conv, shape in seen]


def _reference(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, conv: torch.nn.Conv2d, s_in: float, z_in: int,
               s_out: float, z_out: int) -> torch.Tensor:
    xf = (x.permute(0, 3, 1, 2).float() - z_in) * s_in
    y = F.conv2d(xf, w.float() * ws[:, None, None, None], None, conv.stride, conv.padding, 1, conv.groups)
    y = y.clamp(0, 6)
    return (torch.round(y / s_out) + z_out).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.time()
    ext = _build()
    print(f"extension built / loaded in {time.time() - t0:.1f} s", file=sys.stderr)
    ext.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    s_in, z_in, s_out, z_out = 0.05, 128, 0.1, 128
    rows, checks = {}, {}
    for name in ("mobilenet_v2", "resnet18"):
        handles, inputs = [], []
        for k, (conv, (n, c, h, w), act) in enumerate(_convs(name)):
            weight = torch.randint(-127, 128, conv.weight.shape, dtype=torch.int8, generator=g)
            ws = torch.rand(conv.out_channels, generator=g) * 0.01
            handle = ext.make([n, h, w, c], weight, torch.zeros(conv.out_channels), ws, conv.stride[0], conv.padding[0],
                              conv.groups, s_in, z_in, s_out, z_out, act)
            x = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g)
            handles.append(handle)
            inputs.append(x)
            if name == "mobilenet_v2" and k in (1, 2):  # a depthwise 3x3 and a pointwise 1x1, both ReLU6
                got = ext.run(handle, x)
                ref = _reference(x, weight, ws, conv, s_in, z_in, s_out, z_out)
                diff = (got.int() - ref.int()).abs()
                checks[f"mobilenet_v2 conv {k} (groups {conv.groups}, {conv.kernel_size[0]}x{conv.kernel_size[1]})"] = {
                    "codes": diff.numel(), "different_codes": int((diff != 0).sum()), "max_code_difference": int(diff.max())}

        def calls(handles: list[int] = handles, inputs: list[torch.Tensor] = inputs) -> None:
            for hnd, x in zip(handles, inputs):
                ext.run(hnd, x)

        for _ in range(5):
            calls()
        walls, insides = [], []
        for _ in range(args.runs):  # each pass: its wall time and the time inside execute, paired
            ext.reset_timers()
            t = time.perf_counter()
            calls()
            walls.append(time.perf_counter() - t)
            insides.append(sum(ext.kernel_seconds(hnd) for hnd in handles))
        wall, inside = statistics.median(walls), statistics.median(insides)
        outside = statistics.median(w - i for w, i in zip(walls, insides))
        rows[name] = {"convs": len(handles), "wall_ms": wall * 1e3, "inside_execute_ms": inside * 1e3,
                      "outside_us_per_conv": outside * 1e6 / len(handles)}
    print(f"int8 convs with cached oneDNN primitives, batch 1, {args.threads} thread(s), {cpu_name()}")
    print(f"{'model':14s} {'convs':>5s} {'wall ms':>8s} {'in execute ms':>13s} {'outside us/conv':>15s}")
    for name, r in rows.items():
        print(f"{name:14s} {r['convs']:>5d} {r['wall_ms']:>8.2f} {r['inside_execute_ms']:>13.2f} {r['outside_us_per_conv']:>15.1f}")
    for name, c in checks.items():
        print(f"check {name}: {c['different_codes']} of {c['codes']:,} uint8 codes differ from the float reference, "
              f"by at most {c['max_code_difference']}")
    result = {"cpu": cpu_name(), "threads": args.threads, "runs": args.runs, "torch": torch.__version__,
              "onednn": "3.2 (onednn-cpu-gomp 2023.2.0), headers onednn-devel 2024.2.0", "rows": rows, "checks": checks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
