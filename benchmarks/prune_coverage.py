"""Structured-pruning coverage: every torchvision classifier (and timm / transformers models).

For each model: build it (random weights), prune 50% of every channel group with
``ts.prune_channels_``, then check it still runs forward and backward with the same output shape,
and record MACs and params before/after and the time to analyse and prune. A failure is an open
bug, reported in the table, never skipped.

    python benchmarks/prune_coverage.py [--suite torchvision|timm|hf|all] [--models a,b] [--resume]

--models reruns only the named models and keeps the other rows of the JSON.

Prints a table and writes benchmarks/results/prune_coverage_<suite>.json (updated after every
model, so a long run can be watched and resumed with --resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
from rich.console import Console
from rich.table import Table

import torchslim as ts
from torchslim.graph.spaces import analyse
from torchslim.prune.channels import prune_channels_

TIMM = ["resnet50", "efficientnet_b0", "convnext_tiny", "vit_small_patch16_224", "swin_tiny_patch4_window7_224",
        "deit_small_patch16_224", "mobilevit_s"]


def _hf_models() -> list[tuple[str, torch.nn.Module, dict]]:
    import transformers as tf

    ids = torch.randint(0, 1000, (1, 32))
    out = []
    bert = tf.BertModel(tf.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=512))
    out.append(("hf:bert(small)", bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    vit = tf.ViTModel(tf.ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                                   image_size=64, patch_size=16))
    out.append(("hf:vit(small)", vit, {"pixel_values": torch.randn(1, 3, 64, 64)}))
    gpt2 = tf.GPT2Model(tf.GPT2Config(vocab_size=1000, n_embd=128, n_layer=2, n_head=4, n_positions=64))
    out.append(("hf:gpt2(small)", gpt2, {"input_ids": ids}))
    llama = tf.LlamaModel(tf.LlamaConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64))
    out.append(("hf:llama-gqa(small)", llama, {"input_ids": ids}))
    return out


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def run_one(name: str, model: torch.nn.Module, inputs) -> dict:
    row = {"model": name}
    t0 = time.perf_counter()
    try:
        model.eval()
        ts.set_example_inputs(model, inputs)
        ex = ts.example_inputs(model)
        call = (lambda m: m(**ex)) if isinstance(ex, dict) else (lambda m: m(*ex))
        with torch.no_grad():
            shape = tuple(_first_tensor(call(model)).shape)
        before = ts.profile(model, latency=False, size=False)
        ta = time.perf_counter()
        cg = analyse(model, ex)
        row["analyse_s"] = time.perf_counter() - ta
        row["groups"] = len(cg)
        tp = time.perf_counter()
        plan = prune_channels_(model, ratio=0.5)
        row["prune_s"] = time.perf_counter() - tp
        after = ts.profile(model, latency=False, size=False)
        model.train()
        out = _first_tensor(call(model))
        out.float().sum().backward()
        model.eval()
        row.update(
            ok=tuple(out.shape) == shape,
            macs_before=before.macs, macs_after=after.macs, macs_ratio=after.macs / max(before.macs, 1),
            params_before=before.params, params_after=after.params, params_ratio=after.params / max(before.params, 1),
            left_whole=len(plan.left_whole),
        )
        if not row["ok"]:
            row["error"] = f"output shape changed: {shape} -> {tuple(out.shape)}"
    except Exception as exc:  # a failure is a result
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        row["trace"] = traceback.format_exc(limit=3)[-800:]
    row["seconds"] = time.perf_counter() - t0
    return row


def models_for(suite: str, only: list[str]):
    if suite in ("torchvision", "all"):
        import torchvision

        for n in torchvision.models.list_models(module=torchvision.models):
            if only and n not in only:
                continue
            m = ts.create_model(f"torchvision:{n}")
            (x,) = ts.example_inputs(m)
            # convnets take any size: the giants (EfficientNet-V2-L at 480, RegNet-Y-128GF at 384) are
            # analysed at 224 to keep the run short; transformers need their fixed size
            if x.shape[-1] > 224 and not n.startswith(("vit_", "swin", "maxvit")):
                x = torch.randn(1, 3, 224, 224)
            yield f"torchvision:{n}", m, (x,)
    if suite in ("timm", "all"):
        for n in TIMM:
            if only and n not in only:
                continue
            m = ts.create_model(f"timm:{n}")
            yield f"timm:{n}", m, ts.example_inputs(m)
    if suite in ("hf", "all"):
        for n, m, inputs in _hf_models():
            if only and n not in only:
                continue
            yield n, m, inputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="torchvision", choices=["torchvision", "timm", "hf", "all"])
    ap.add_argument("--models", default="")
    ap.add_argument("--resume", action="store_true", help="skip models already in the JSON")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = ap.parse_args()
    path = os.path.join(os.path.dirname(__file__), "results", f"prune_coverage_{args.suite}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = []
    only = [m for m in args.models.split(",") if m]
    if (args.resume or only) and os.path.exists(path):
        rows = json.load(open(path))["rows"]
    if only and not args.resume:  # rerun the named models, keep the other rows
        rows = [r for r in rows if r["model"].split(":", 1)[-1] not in only and r["model"] not in only]
    done = {r["model"] for r in rows}
    torch.set_num_threads(max(1, args.threads))
    for name, model, inputs in models_for(args.suite, only):
        if name in done:
            continue
        row = run_one(name, model, inputs)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), file=sys.stderr, flush=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__}, f, indent=1)
        os.replace(path + ".tmp", path)
    t = Table(title=f"prune_channels_(ratio=0.5) coverage: {sum(r['ok'] for r in rows)}/{len(rows)} ok")
    for col in ("model", "ok", "MACs after/before", "params after/before", "analyse s", "prune s", "note"):
        t.add_column(col, justify="left" if col in ("model", "note") else "right")
    for r in rows:
        t.add_row(r["model"], "ok" if r["ok"] else "FAIL", f"{r.get('macs_ratio', float('nan')):.3f}",
                  f"{r.get('params_ratio', float('nan')):.3f}", f"{r.get('analyse_s', float('nan')):.2f}",
                  f"{r.get('prune_s', float('nan')):.2f}", r.get("error", "")[:60])
    Console(width=160).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
