"""The command line's defaults against the settings a user had to know: measured, same run.

Two parts (``--part minilm`` / ``--part deep-compression``, both by default):

**minilm** -- ``torchslim quantize pretrained:minilm --mode dynamic`` now calibrates SmoothQuant on
the bundled training sentences by default. Rows: the command with ``--no-smoothquant`` (what it
did before), the command as it is (the default), and the Python API with other SmoothQuant alphas
(the same 128 calibration sentences), to show which alpha is best. Each quantized model is scored
on the 800 sentences of the 400 held-out paraphrase pairs (disjoint from the calibration
sentences; the script checks it): mean and minimum cosine of its embeddings to the fp32 model's,
in PyTorch, and for the two CLI rows also in ONNX Runtime from the int8 file the command wrote.

**deep-compression** -- ``torchslim compress MODEL --recipe deep-compression --data mnist`` on a
LeNet-300-100 trained by ``torchslim train zoo:lenet300 --data mnist --epochs 20`` (or ``--model
DIR``), with the recipe as it was (one-shot 90% per layer, 5-bit codebooks; kept below as
``OLD_RECIPE``) and the built-in one; size = the ``.tslim`` file against the original
``model.safetensors``, accuracy on the 1,000 test digits.

    python benchmarks/defaults.py [--part minilm|deep-compression] [--model DIR] [--threads 1]

Prints the tables and writes benchmarks/results/defaults.json (the parts run are replaced).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "defaults.json"

OLD_RECIPE = """\
version: 1
name: deep-compression-before
description: the built-in deep-compression recipe before benchmarks/defaults.py (one shot, 5 bits)
finetune: {epochs: 4, lr: 0.001, optimizer: adam, batch_size: 64}
stages:
  - sparsify: {sparsity: 0.9, method: magnitude, scope: layer}
  - finetune: {}
  - cluster: {bits: 5, init: linear}
  - finetune: {epochs: 2, lr: 0.0005}
  - pack: {coder: ans}
"""


def _cli(argv: list[str]) -> dict[str, Any]:
    """Run ``torchslim ARGV --json`` in this process; its JSON object."""
    from torchslim.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([*argv, "--json"])
    if code != 0:
        raise SystemExit(f"torchslim {' '.join(argv)} exited with {code}")
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def _ort_cosine(path: str, ref: torch.Tensor) -> dict[str, float]:
    import onnxruntime as ort

    from torchslim.data.sentences import paraphrase_pairs
    from torchslim.zoo.pretrained import SentenceEncoder, tokenize

    a, b = paraphrase_pairs()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    text = a + b
    embs = []
    for i in range(0, len(text), 64):
        batch = tokenize("minilm", text[i : i + 64])
        embs.append(torch.from_numpy(sess.run(None, {k: batch[k].numpy() for k in SentenceEncoder.input_names})[0]))
    cos = torch.nn.functional.cosine_similarity(torch.cat(embs), ref, dim=-1)
    return {"ort_mean_cosine": float(cos.mean()), "ort_min_cosine": float(cos.min())}


def _torch_cosine(model: torch.nn.Module, ref: dict[str, Any]) -> dict[str, float]:
    from torchslim.data.sentences import evaluate_encoder

    got = evaluate_encoder(model, ref)
    return {"torch_mean_cosine": got["mean_cosine"], "torch_min_cosine": got["min_cosine"], "recall_at_1": got["recall_at_1"]}


def part_minilm(alphas: list[float]) -> dict[str, Any]:
    import torchslim as ts
    from torchslim.data.sentences import (
        calibration_batches,
        calibration_sentences,
        evaluate_encoder,
        paraphrase_pairs,
    )
    from torchslim.quantize import QuantConfig, quantize_

    a, b = paraphrase_pairs()
    held_out = set(calibration_sentences(128)).isdisjoint(a + b)
    if not held_out:
        raise SystemExit("the calibration sentences overlap the evaluation pairs")
    base = ts.create_model("pretrained:minilm")
    ref = evaluate_encoder(base)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("CLI --mode dynamic --no-smoothquant (the old default)", ["--no-smoothquant"]),
                            ("CLI --mode dynamic (the default now)", [])):
            out = Path(tmp) / f"q{len(rows)}"
            t0 = time.time()
            payload = _cli(["quantize", "pretrained:minilm", "--mode", "dynamic", *extra, "--out", str(out),
                            "--no-latency", "--no-progress"])
            row = {"method": name, "command": "torchslim quantize pretrained:minilm --mode dynamic " + " ".join(extra),
                   "seconds": round(time.time() - t0, 1), "data": payload["data"], "defaults": payload.get("defaults"),
                   "smoothed_layers": len(payload["quantize"].get("smoothed") or []),
                   "onnx_bytes": payload["onnx_bytes"]["onnx"]}
            row.update(_torch_cosine(ts.load(out), ref))
            row.update(_ort_cosine(payload["files"]["onnx"], ref["embeddings"]))
            rows.append(row)
            print(row, flush=True)
        cal = calibration_batches()
        for alpha in alphas:
            m = copy.deepcopy(base)
            plan = quantize_(m, QuantConfig(mode="dynamic", smoothquant_alpha=alpha), calibration=cal)
            row = {"method": f"API dynamic + SmoothQuant alpha {alpha}", "alpha": alpha,
                   "smoothed_layers": len(plan.smoothed or [])}
            row.update(_torch_cosine(m, ref))
            rows.append(row)
            print(row, flush=True)
    return {"calibration": "the first 128 bundled training sentences", "evaluation": f"{len(a)} held-out paraphrase pairs",
            "disjoint": held_out, "rows": rows}


def _compress(model_dir: str, recipe: str, out: Path) -> dict[str, Any]:
    t0 = time.time()
    report = _cli(["compress", model_dir, "--recipe", recipe, "--data", "mnist", "--out", str(out), "--quiet",
                   "--no-latency"])
    tslim = report["deployed"]["tslim"]["size_bytes"]
    acc0, acc1 = report["accuracy_before"], report["accuracy_after"]
    return {"recipe": recipe, "seconds": round(time.time() - t0, 1), "accuracy_before": acc0, "accuracy_after": acc1,
            "points_lost": round(100 * (acc0 - acc1), 2), "tslim_bytes": tslim,
            "original_bytes": report["before"]["size_bytes"], "x_smaller": report["before"]["size_bytes"] / tslim,
            "goals": report["goals"], "stages": [(s["label"], s["accuracy"]) for s in report["stages"]]}


def part_deep_compression(model_dir: str | None) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            model_dir = str(Path(tmp) / "lenet")
            _cli(["train", "zoo:lenet300", "--data", "mnist", "--epochs", "20", "--no-progress", "--out", model_dir])
        old = Path(tmp) / "old.yaml"
        old.write_text(OLD_RECIPE)
        for name, recipe in (("before", str(old)), ("now", "deep-compression")):
            row = {"which": name, **_compress(model_dir, recipe, Path(tmp) / name)}
            rows.append(row)
            print({k: v for k, v in row.items() if k not in ("goals", "stages")}, flush=True)
    return {"model": "zoo:lenet300 trained by `torchslim train zoo:lenet300 --data mnist --epochs 20`",
            "data": "mnist (3,500 train / 500 val / 1,000 test real digits)", "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("minilm", "deep-compression", "all"), default="all")
    ap.add_argument("--model", help="deep-compression: a trained LeNet-300-100 folder (default: train one, 20 epochs)")
    ap.add_argument("--alphas", default="0.5,0.6,0.75,0.85", help="minilm: SmoothQuant alphas for the API rows")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    payload: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    payload.update({"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
                    "load_average_at_start": os.getloadavg()[0]})
    if args.part in ("minilm", "all"):
        payload["minilm"] = part_minilm([float(x) for x in args.alphas.split(",") if x])
    if args.part in ("deep-compression", "all"):
        payload["deep_compression"] = part_deep_compression(args.model)
    from torchslim._utils import atomic_path

    with atomic_path(RESULTS) as p:
        p.write_text(json.dumps(payload, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
