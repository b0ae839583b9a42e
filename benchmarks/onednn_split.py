"""Where a compiled int8 CNN's time goes: inside oneDNN's kernels, or around them.

Issue 21 asks ``torch.compile`` int8 to speed a model up at least as much as ONNX Runtime's int8
does. On ResNet-18 and MobileNetV2 it falls short, with the same oneDNN kernels torchao's flow
gets. This script measures why: for each model (same models, weights and calibration as
``benchmarks/torch_int8.py``), the fp32 and the torchslim static-int8 model are compiled by
``ts.quantize.compile``; each is timed at batch 1 (median of ``--runs`` calls, the two
interleaved), then called once more with oneDNN's verbose mode on, which reports every
primitive it executes and that primitive's execution time. Columns:

* ``wall ms``: median latency of the compiled model (verbose off);
* ``oneDNN ms``: the sum of the execution times oneDNN reports for one call (convolutions,
  matmuls, reorders...), and how many primitives ran;
* ``outside ms``: ``wall - oneDNN``: PyTorch's per-call work around the kernels (operator
  dispatch, building each primitive's descriptor, the inductor-generated elementwise code), and
  that time per primitive.

Verbose mode slows the call it reports on a little; the primitive times it prints are the
kernels' own. One thread by default, as in ``torch_int8.py``'s table.

    python benchmarks/onednn_split.py                 # table + results/onednn_split.json
    python benchmarks/onednn_split.py --models mobilenet_v2 --runs 50
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from torch_int8 import SPECS, _model_and_data  # noqa: E402

from torchslim._fs import atomic_path  # noqa: E402
from torchslim.profile.latency import cpu_name  # noqa: E402
from torchslim.quantize import QuantConfig, quantize_  # noqa: E402
from torchslim.quantize import compile as compile_int8  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "onednn_split.json"


def _primitives(fn: Any, x: torch.Tensor) -> list[tuple[str, str, float]]:
    """(kind, implementation, ms) of every oneDNN primitive one call of ``fn`` executes.

    oneDNN writes its verbose lines from C++ to the process's stdout, so fd 1 is redirected to a
    temporary file for the call."""
    import tempfile

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON), torch.no_grad():
                fn(x)
            sys.stdout.flush()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    out = []
    for line in io.StringIO(text):
        parts = line.rstrip("\n").split(",")
        if len(parts) > 8 and parts[0] == "onednn_verbose" and "exec" in parts[:4]:
            i = parts.index("exec")
            with contextlib.suppress(ValueError):
                out.append((parts[i + 2], parts[i + 3], float(parts[-1])))
    return out


def _median_ms(fns: dict[str, Any], x: torch.Tensor, runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(3):
            for f in fns.values():
                f(x)
        for r in range(runs):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for k in order:
                t = time.perf_counter()
                fns[k](x)
                times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench(name: str, runs: int) -> dict[str, Any]:
    model, calib, evals = _model_and_data(name, 0, 4)
    x = evals[0]
    int8 = copy.deepcopy(model)
    quantize_(int8, QuantConfig(mode="static"), calibration=calib)
    torch._dynamo.reset()
    fns = {"fp32": compile_int8(model), "int8": compile_int8(int8)}
    wall = _median_ms(fns, x, runs)
    row: dict[str, Any] = {"model": name, "spec": SPECS[name], "input": list(x.shape)}
    for k, fn in fns.items():
        prims = _primitives(fn, x)
        if not prims:
            raise RuntimeError(f"{name} {k}: oneDNN reported no primitives (verbose mode not available in this torch build?)")
        kernel = sum(ms for _, _, ms in prims)
        kinds: dict[str, float] = {}
        for kind, _, ms in prims:
            kinds[kind] = kinds.get(kind, 0.0) + ms
        row[k] = {"wall_ms": wall[k], "onednn_ms": kernel, "primitives": len(prims), "outside_ms": wall[k] - kernel,
                  "outside_us_per_primitive": 1e3 * (wall[k] - kernel) / max(len(prims), 1),
                  "onednn_ms_by_kind": kinds, "implementations": sorted({impl for _, impl, _ in prims})}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,conv2", help=f"comma-separated subset of {', '.join(SPECS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in SPECS]
    if bad:
        ap.error(f"unknown models {bad}; choose from {', '.join(SPECS)}")
    torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    rows = [bench(n, args.runs) for n in names]
    load.append(os.getloadavg()[0])
    lines = [f"{cpu_name()}, {args.threads} thread(s), batch 1, load {min(load):.1f}-{max(load):.1f}",
             f"{'model':14s} {'':5s} {'wall ms':>8s} {'oneDNN ms':>9s} {'prims':>5s} {'outside ms':>10s} {'us/prim':>7s}"]
    for r in rows:
        for k in ("fp32", "int8"):
            s = r[k]
            lines.append(f"{r['model']:14s} {k:5s} {s['wall_ms']:8.2f} {s['onednn_ms']:9.2f} {s['primitives']:5d} "
                         f"{s['outside_ms']:10.2f} {s['outside_us_per_primitive']:7.1f}")
    table = "\n".join(lines)
    print(table)
    res = {"cpu": cpu_name(), "threads": args.threads, "runs": args.runs, "load_average": load,
           "torch": torch.__version__, "rows": rows, "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:  # never a half-written file
        tmp.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
