"""ONNX Runtime's ``MatMulNBits`` per call, by bits and ``accuracy_level``, at one decode step.

A single-node ONNX model (random codes and scales, block 32) multiplies one token's activations
(M = 1) by a weight of ``--n`` x ``--k``: by default SmolLM2-135M's output head, 49,152 x 576.
It is timed at bits 4 and 8 and at every ``accuracy_level`` 0-4 (the median of ``--runs`` calls
after 3 warm-up calls, ``--threads`` intra-op threads). Level 4 rounds the activations to int8 per
block and runs integer kernels; levels 0-3 keep them float.

Why it matters: ``quantize_llm_(tie_head=True)`` makes the head multiply by the 8-bit token table,
which the ONNX decoder writes as a bits=8 ``MatMulNBits``. In onnxruntime 1.32 that op is slow at
levels 0-3, so the tied head rounds its inputs like the body's layers (``compute="int8"``) and
exports at level 4.

    python benchmarks/matmulnbits_levels.py                 # table + results/matmulnbits_levels.json
    python benchmarks/matmulnbits_levels.py --n 4096 --k 4096 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "matmulnbits_levels.json"
BLOCK = 32


def _session(n: int, k: int, bits: int, level: int, threads: int) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    blocks = k // BLOCK
    codes = rng.integers(0, 256, size=(n, blocks, BLOCK * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.01).astype(np.float32)
    inits = [helper.make_tensor("w", TensorProto.UINT8, codes.shape, codes.tobytes(), raw=True),
             helper.make_tensor("s", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True)]
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=BLOCK, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=49152, help="output features (rows of the weight)")
    ap.add_argument("--k", type=int, default=576, help="input features (a multiple of 32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.k % BLOCK or args.n < 1:
        ap.error(f"--k must be a multiple of {BLOCK} and --n positive; got k={args.k}, n={args.n}")
    import onnxruntime

    from torchslim._fs import atomic_path
    from torchslim.profile.latency import cpu_name

    x = np.random.default_rng(1).standard_normal((1, 1, args.k)).astype(np.float32)
    rows = []
    for bits in (4, 8):
        for level in range(5):
            sess = _session(args.n, args.k, bits, level, args.threads)
            for _ in range(3):
                sess.run(None, {"x": x})
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                sess.run(None, {"x": x})
                times.append(time.perf_counter() - t)
            rows.append({"bits": bits, "accuracy_level": level, "ms": 1e3 * statistics.median(times)})
    lines = [f"MatMulNBits {args.n} x {args.k}, block {BLOCK}, M=1, {args.threads} thread(s), onnxruntime "
             f"{onnxruntime.__version__}, {cpu_name()}", f"{'bits':>4s} {'level':>5s} {'ms':>9s}"]
    lines += [f"{r['bits']:>4d} {r['accuracy_level']:>5d} {r['ms']:>9.2f}" for r in rows]
    table = "\n".join(lines)
    print(table)
    res = {"n": args.n, "k": args.k, "block": BLOCK, "threads": args.threads, "runs": args.runs, "cpu": cpu_name(),
           "onnxruntime": onnxruntime.__version__, "load_average": os.getloadavg()[0], "rows": rows, "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:  # never a half-written file
        tmp.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
