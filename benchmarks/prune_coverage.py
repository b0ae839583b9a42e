"""Structured-pruning coverage over the models people bring, with Torch-Pruning side by side.

For each model (random weights, seeded): build it twice, prune 50% of every channel group once with
``ts.prune_channels_`` and once with Torch-Pruning (``MagnitudePruner``, L2, pruning_ratio=0.5, used
carefully: output layers ignored, attention heads declared through ``num_heads`` and pruned whole),
then check each result: it still runs in eval mode with the same output structure, a train-mode
loss backpropagates, and MACs after/before (counted by the same profiler for both). For torchslim a
refused or failed prune must leave the model bit-identical (every tensor reachable from a module,
plain attributes included) and runnable: the ``intact`` column. A failure is a result, never skipped.

    python benchmarks/prune_coverage.py --suite torchvision|timm|hf|detection|segmentation|video|flow|hf-all|all
        [--models a,b] [--resume] [--no-tp]

Prints a table and writes benchmarks/results/prune_coverage_<suite>.json (updated after every model,
so a long run can be watched and resumed with --resume; --models reruns only the named models).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import torchslim as ts
from torchslim.graph._detection import fixed_counts
from torchslim.graph.inputs import Inputs
from torchslim.prune.channels import prune_channels_

SUITES = ("torchvision", "timm", "hf", "detection", "segmentation", "video", "flow", "hf-all")
TIMM = ["resnet50", "efficientnet_b0", "convnext_tiny", "vit_small_patch16_224", "swin_tiny_patch4_window7_224",
        "deit_small_patch16_224", "mobilevit_s", "levit_128s", "efficientformerv2_s0"]

# names of the layers that produce a model's outputs: Torch-Pruning must be told to leave them whole
_OUTPUT_LAYERS = ("fc", "classifier", "head", "lm_head", "cls_logits", "bbox_pred", "bbox_reg", "cls_score",
                  "mask_fcn_logits", "kps_score_lowres", "conv5_mask", "low_classifier", "high_classifier",
                  "aux_classifier", "pooler", "proj", "flow_head", "mask", "qa_outputs", "score")


class Case:
    """One model of a suite: a seeded factory, its example inputs, and how to score its outputs."""

    def __init__(self, name: str, build: Callable[[], nn.Module], inputs: Any, *, kind: str = "plain",
                 targets: Any = None) -> None:
        self.name, self._build, self.inputs, self.kind, self.targets = name, build, inputs, kind, targets

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        model = self._build()
        return model.eval()

    def call(self, model: nn.Module, train: bool = False) -> Any:
        args, kwargs = self.inputs
        if train and self.kind == "detection":
            return model(*args, self.targets)
        return model(*args, **kwargs)


# ---- the suites -------------------------------------------------------------------------------------
def _tv(module: Any) -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=module)


def _torchvision() -> Iterator[Case]:
    import torchvision

    for n in torchvision.models.list_models(module=torchvision.models):
        m0 = ts.create_model(f"torchvision:{n}")
        (x,) = ts.example_inputs(m0)
        if x.shape[-1] > 224 and not n.startswith(("vit_", "swin", "maxvit")):
            x = torch.randn(1, 3, 224, 224)  # convnets take any size: the giants are analysed at 224
        yield Case(f"torchvision:{n}", lambda n=n: ts.create_model(f"torchvision:{n}"), ((x,), {}))


def _timm() -> Iterator[Case]:
    for n in TIMM:
        m0 = ts.create_model(f"timm:{n}")
        yield Case(f"timm:{n}", lambda n=n: ts.create_model(f"timm:{n}"), (tuple(ts.example_inputs(m0)), {}))


def _detection() -> Iterator[Case]:
    import torchvision

    for n in _tv(torchvision.models.detection):
        kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
        if not n.startswith("ssd"):
            kwargs.update(min_size=256, max_size=256)  # the transform's resize; 800 px is needlessly slow on a CPU
        # two images: SSDLite's last extra block is 1x1, whose BatchNorm cannot train on one value
        images = [torch.rand(3, 256, 256)] * (2 if n.startswith("ssdlite") else 1)
        boxes = torch.tensor([[20.0, 30.0, 120.0, 160.0], [100.0, 60.0, 220.0, 200.0]])
        target: dict[str, Any] = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        if n.startswith("maskrcnn"):
            masks = torch.zeros(2, 256, 256, dtype=torch.uint8)
            masks[0, 30:160, 20:120] = 1
            masks[1, 60:200, 100:220] = 1
            target["masks"] = masks
        if n.startswith("keypointrcnn"):
            target["labels"] = torch.tensor([1, 1])
            kp = torch.rand(2, 17, 3) * 80 + 40
            kp[..., 2] = 1
            target["keypoints"] = kp
        yield Case(f"detection:{n}", lambda n=n, kw=kwargs: torchvision.models.get_model(n, **kw), ((images,), {}),
                   kind="detection", targets=[target] * len(images))


def _segmentation() -> Iterator[Case]:
    import torchvision

    for n in _tv(torchvision.models.segmentation):
        yield Case(f"segmentation:{n}",
                   lambda n=n: torchvision.models.get_model(n, weights=None, weights_backbone=None),
                   ((torch.randn(2, 3, 224, 224),), {}), kind="dict")  # batch 2: ASPP's pooled BatchNorm trains


def _video() -> Iterator[Case]:
    import torchvision

    for n in _tv(torchvision.models.video):
        size = 224 if n.startswith(("mvit", "s3d")) else 112
        frames = 16
        yield Case(f"video:{n}", lambda n=n: torchvision.models.get_model(n, weights=None),
                   ((torch.randn(1, 3, frames, size, size),), {}))


def _flow() -> Iterator[Case]:
    import torchvision

    for n in _tv(torchvision.models.optical_flow):
        a, b = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
        yield Case(f"flow:{n}", lambda n=n: torchvision.models.get_model(n, weights=None), ((a, b), {"num_flow_updates": 4}),
                   kind="list")


def _hf_small() -> list[tuple[str, Callable[[], nn.Module], dict[str, Any]]]:
    """Small configs of the transformers architectures (random weights)."""
    import transformers as tf

    ids = torch.randint(0, 256, (1, 16))
    mask = torch.ones_like(ids)
    text = {"input_ids": ids, "attention_mask": mask}
    c = {"vocab_size": 256, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 256, "max_position_embeddings": 64}
    gqa = {**c, "num_key_value_heads": 2}
    out: list[tuple[str, Callable[[], nn.Module], dict[str, Any]]] = [
        ("bert", lambda: tf.BertModel(tf.BertConfig(**c)), text),
        ("roberta", lambda: tf.RobertaModel(tf.RobertaConfig(**{**c, "max_position_embeddings": 80})), text),
        ("distilbert", lambda: tf.DistilBertModel(tf.DistilBertConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4,
                                                                       hidden_dim=256)), text),
        ("albert", lambda: tf.AlbertModel(tf.AlbertConfig(**c, embedding_size=64)), text),
        ("deberta-v2", lambda: tf.DebertaV2Model(tf.DebertaV2Config(**c)), text),
        # a ViTModel's output is its hidden state, so its width stays: 0.63 of the MACs, the patch
        # embedding being a quarter of them at this size; the classifier users prune has it free
        ("vit", lambda: tf.ViTForImageClassification(tf.ViTConfig(hidden_size=128, num_hidden_layers=2,
                                                                  num_attention_heads=4, intermediate_size=256,
                                                                  image_size=64, patch_size=16, num_labels=10)),
         {"pixel_values": torch.randn(1, 3, 64, 64)}),
        ("gpt2", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4,
                                                          n_positions=64)), {"input_ids": ids}),
        ("opt", lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                                       num_attention_heads=4, ffn_dim=256, word_embed_proj_dim=128,
                                                       max_position_embeddings=64)), {"input_ids": ids}),
        ("llama", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**gqa)), {"input_ids": ids}),
        ("mistral", lambda: tf.MistralForCausalLM(tf.MistralConfig(**gqa)), {"input_ids": ids}),
        ("qwen2", lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**gqa)), {"input_ids": ids}),
        ("gemma", lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**gqa, head_dim=32)), {"input_ids": ids}),
        ("gemma3", lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**gqa, head_dim=32, sliding_window=16)),
         {"input_ids": ids}),
        ("phi3", lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**gqa, pad_token_id=0)), {"input_ids": ids}),
        ("falcon", lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                                                num_attention_heads=4)), {"input_ids": ids}),
        ("t5", lambda: tf.T5Model(tf.T5Config(vocab_size=256, d_model=128, d_kv=32, d_ff=256, num_layers=2,
                                              num_heads=4)), {"input_ids": ids, "decoder_input_ids": ids}),
        ("bart", lambda: tf.BartModel(tf.BartConfig(vocab_size=256, d_model=128, encoder_layers=2, decoder_layers=2,
                                                    encoder_attention_heads=4, decoder_attention_heads=4,
                                                    encoder_ffn_dim=256, decoder_ffn_dim=256,
                                                    max_position_embeddings=64)),
         {"input_ids": ids, "decoder_input_ids": ids}),
        ("whisper", lambda: tf.WhisperModel(tf.WhisperConfig(vocab_size=256, pad_token_id=0, bos_token_id=1,
                                                             eos_token_id=2, decoder_start_token_id=1,
                                                             d_model=128, encoder_layers=2,
                                                             decoder_layers=2, encoder_attention_heads=4,
                                                             decoder_attention_heads=4, encoder_ffn_dim=256,
                                                             decoder_ffn_dim=256, num_mel_bins=16,
                                                             max_source_positions=32, max_target_positions=32)),
         {"input_features": torch.randn(1, 16, 64), "decoder_input_ids": ids[:, :8]}),
        ("clip", lambda: tf.CLIPModel(tf.CLIPConfig(
            text_config={"vocab_size": 256, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 256, "max_position_embeddings": 32},
            vision_config={"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "intermediate_size": 256, "image_size": 64, "patch_size": 16},
            projection_dim=64)), {"input_ids": ids, "pixel_values": torch.randn(1, 3, 64, 64)}),
    ]
    return out


def _hf(names: tuple[str, ...] | None = None) -> Iterator[Case]:
    for n, build, inputs in _hf_small():
        if names is not None and n not in names:
            continue
        yield Case(f"hf:{n}", build, ((), inputs), kind="hf")


SUITE_CASES: dict[str, Callable[[], Iterator[Case]]] = {
    "torchvision": _torchvision, "timm": _timm, "detection": _detection, "segmentation": _segmentation,
    "video": _video, "flow": _flow, "hf": lambda: _hf(("bert", "vit", "gpt2", "llama")), "hf-all": _hf,
}


# ---- checks -----------------------------------------------------------------------------------------
def _structure(out: Any, kind: str) -> Any:
    """What must not change: the output tree and each tensor's shape (detections: all but their count)."""
    if isinstance(out, torch.Tensor):
        return ("T", out.dim(), tuple(out.shape[1:]) if kind == "detection" else tuple(out.shape))
    if isinstance(out, dict) or hasattr(out, "items"):
        return {k: _structure(v, kind) for k, v in out.items() if v is not None}
    if isinstance(out, (list, tuple)):
        return [_structure(v, kind) for v in out]
    return type(out).__name__


def _loss(out: Any, kind: str) -> torch.Tensor:
    if kind == "detection":
        return sum(out.values())
    leaves = [t for t in _leaves(out) if t.is_floating_point()]
    return sum(t.float().mean() for t in leaves)


def _leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _leaves(v)]
    return []


def _state(model: nn.Module) -> dict[str, Any]:
    """Every tensor reachable from a module (parameters, buffers, plain attributes) and the attribute names."""
    snap: dict[str, Any] = {}
    for mname, m in model.named_modules():
        for k, v in list(m.__dict__.items()):
            if k in ("_parameters", "_buffers"):
                for pn, p in v.items():
                    if p is not None:
                        snap[f"{mname}.{pn}"] = p.detach().clone()
            elif k != "_modules":
                for i, t in enumerate(_leaves(v) if isinstance(v, (list, tuple, dict, torch.Tensor)) else []):
                    snap[f"{mname}.{k}[{i}]"] = t.detach().clone() if not t.is_meta else "meta"
        snap[f"{mname}.__attrs__"] = sorted(k for k in m.__dict__ if not k.startswith("__"))
    return snap


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _macs(case: Case, model: nn.Module) -> float:
    """MACs of one eval forward; detectors at fixed counts (NMS and score thresholds that keep every
    candidate), else the RoI heads' work would follow how many boxes random weights happen to score."""
    ts.set_example_inputs(model, Inputs(tuple(case.inputs[0]), dict(case.inputs[1])))
    with fixed_counts(model) if case.kind == "detection" else contextlib.nullcontext():
        return float(ts.profile(model, latency=False, size=False).macs)


def _check(case: Case, model: nn.Module, reference: Any, macs_before: float, row: dict[str, Any], key: str) -> None:
    with torch.no_grad():
        out = case.call(model)
    same = _structure(out, case.kind) == reference
    model.train()
    try:
        _loss(case.call(model, train=True), case.kind).backward()
    finally:
        model.eval()
    macs = _macs(case, model)
    row[f"{key}_macs_ratio"] = macs / max(macs_before, 1.0)
    row[f"{key}_ok"] = bool(same)
    if not same:
        row[f"{key}_error"] = "output structure changed"


def _run_torchslim(case: Case, row: dict[str, Any], reference: Any, macs_before: float) -> None:
    model = case.build()
    ts.set_example_inputs(model, Inputs(tuple(case.inputs[0]), dict(case.inputs[1])))
    before = _state(model)
    t0 = time.perf_counter()
    try:
        _alarm(TIMEOUT_S)
        try:
            plan = prune_channels_(model, ratio=0.5)
        finally:
            _alarm(0)
    except Exception as exc:  # refused or failed: the model must be as it was, and still run
        row["ts_seconds"] = time.perf_counter() - t0
        row["ts_ok"] = False
        row["ts_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:240] if str(exc) else ''}"
        intact = _same_state(before, _state(model))
        try:
            with torch.no_grad():
                intact = intact and _structure(case.call(model), case.kind) == reference
        except Exception:
            intact = False
        row["ts_intact"] = intact
        return
    row["ts_seconds"] = time.perf_counter() - t0
    row["ts_left_whole"] = len(plan.left_whole)
    try:
        _check(case, model, reference, macs_before, row, "ts")
    except Exception as exc:
        row["ts_ok"] = False
        row["ts_error"] = f"after pruning: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        row["ts_trace"] = traceback.format_exc(limit=4)[-1200:]


def _tp_num_heads(model: nn.Module) -> tuple[dict[nn.Module, int], list[nn.Module]]:
    """Attention projections and their head counts, as Torch-Pruning's transformers examples declare them."""
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        n_heads = getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None) or getattr(
            getattr(m, "config", None), "num_attention_heads", None)
        n_kv = getattr(m, "num_key_value_heads", None) or getattr(getattr(m, "config", None), "num_key_value_heads", None)
        if not isinstance(n_heads, int):
            continue
        for q, k, v in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v")):
            if all(isinstance(getattr(m, a, None), nn.Linear) for a in (q, k, v)):
                heads[getattr(m, q)] = n_heads
                heads[getattr(m, k)] = n_kv if isinstance(n_kv, int) else n_heads
                heads[getattr(m, v)] = n_kv if isinstance(n_kv, int) else n_heads
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads
    ignored = [m for name, m in model.named_modules() if name and name.split(".")[-1] in _OUTPUT_LAYERS
               and isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.Conv1d, nn.Sequential))]
    return heads, ignored


def _run_tp(case: Case, row: dict[str, Any], reference: Any, macs_before: float) -> None:
    import torch_pruning as tp

    model = case.build()
    args, kwargs = case.inputs
    example = kwargs if not args else (args[0] if len(args) == 1 and not kwargs else args)
    t0 = time.perf_counter()
    try:
        _alarm(TIMEOUT_S)
        num_heads, ignored = _tp_num_heads(model)
        pruner = tp.pruner.MagnitudePruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
            ignored_layers=ignored, num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
            head_pruning_ratio=0.5, round_to=4 if case.kind == "hf" else None,
            forward_fn=(lambda m, x: case.call(m)),
            output_transform=lambda out: _leaves(out),
        )
        pruner.step()
        for m, h in num_heads.items():  # what Torch-Pruning's examples do after pruning heads
            for owner in model.modules():
                for attr in ("num_heads", "num_attention_heads"):
                    if getattr(owner, "q_proj", None) is m and isinstance(getattr(owner, attr, None), int):
                        setattr(owner, attr, pruner.num_heads.get(m, h))
        row["tp_seconds"] = time.perf_counter() - t0
        _check(case, model, reference, macs_before, row, "tp")
    except Exception as exc:
        row["tp_seconds"] = time.perf_counter() - t0
        row["tp_ok"] = False
        row["tp_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:240] if str(exc) else ''}"
    finally:
        _alarm(0)


TIMEOUT_S = 300  # a pruner that has not finished one model in 5 minutes is reported as timed out


class Timeout(Exception):
    pass


def _alarm(seconds: int) -> None:
    """Raise :class:`Timeout` in ``seconds`` (0: cancel); POSIX only."""
    import signal

    def fire(signum: int, frame: Any) -> None:
        raise Timeout(f"no result after {TIMEOUT_S} s")

    signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)


def run_one(case: Case, torch_pruning: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"model": case.name}
    t0 = time.perf_counter()
    try:
        model = case.build()
        with torch.no_grad():
            reference = _structure(case.call(model), case.kind)
        row["macs_before"] = macs_before = _macs(case, model)
    except Exception as exc:  # the model itself does not build or run here: not a pruning result
        row.update(ts_ok=False, tp_ok=False, ts_error=f"does not build/run: {type(exc).__name__}: {str(exc)[:200]}")
        return row
    _run_torchslim(case, row, reference, macs_before)
    if torch_pruning:
        _run_tp(case, row, reference, macs_before)
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> int:
    global TIMEOUT_S
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="torchvision", choices=[*SUITES, "all"])
    ap.add_argument("--models", default="", help="comma-separated names (without the suite prefix) to rerun")
    ap.add_argument("--resume", action="store_true", help="skip models already in the JSON")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds a pruner gets per model (default 300)")
    args = ap.parse_args()
    TIMEOUT_S = args.timeout
    path = os.path.join(os.path.dirname(__file__), "results", f"prune_coverage_{args.suite}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    only = [m for m in args.models.split(",") if m]
    rows: list[dict[str, Any]] = []
    if (args.resume or only) and os.path.exists(path):
        rows = json.load(open(path))["rows"]
    if only and not args.resume:
        rows = [r for r in rows if r["model"].split(":", 1)[-1] not in only]
    done = {r["model"] for r in rows}
    torch.set_num_threads(max(1, args.threads))
    use_tp = not args.no_tp
    if use_tp:
        try:
            import torch_pruning as tp
        except ImportError:
            print("torch-pruning is not installed (pip install torch-pruning): its columns stay empty", file=sys.stderr)
            use_tp = False
    suites = SUITES if args.suite == "all" else (args.suite,)
    for suite in suites:
        for case in SUITE_CASES[suite]():
            short = case.name.split(":", 1)[-1]
            if case.name in done or (only and short not in only):
                continue
            row = run_one(case, use_tp)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("trace")}), file=sys.stderr, flush=True)
            with open(path + ".tmp", "w") as f:
                json.dump({"rows": rows, "torch": torch.__version__, "torch_pruning": getattr(tp, "__version__", None)
                           if use_tp else None, "cpu": platform.processor() or platform.machine(),
                           "threads": args.threads}, f, indent=1)
            os.replace(path + ".tmp", path)
    print_table(rows, args.suite)
    return 0


def print_table(rows: list[dict[str, Any]], suite: str) -> None:
    n_ts, n_tp = sum(bool(r.get("ts_ok")) for r in rows), sum(bool(r.get("tp_ok")) for r in rows)
    t = Table(title=f"prune 50% of channels, suite {suite}: torchslim {n_ts}/{len(rows)} ok, "
                    f"Torch-Pruning {n_tp}/{len(rows)} ok")
    for col in ("model", "torchslim", "MACs after/before", "intact if refused", "Torch-Pruning", "TP MACs after/before",
                "note"):
        t.add_column(col, justify="left" if col in ("model", "note") else "right")
    for r in rows:
        intact = "-" if r.get("ts_ok") or "ts_intact" not in r else ("yes" if r["ts_intact"] else "NO")
        note = r.get("ts_error") or r.get("tp_error") or ""
        t.add_row(r["model"], "ok" if r.get("ts_ok") else "FAIL", f"{r.get('ts_macs_ratio', float('nan')):.3f}",
                  intact, "ok" if r.get("tp_ok") else ("FAIL" if "tp_ok" in r else "-"),
                  f"{r.get('tp_macs_ratio', float('nan')):.3f}", note[:70])
    Console(width=180).print(t)


if __name__ == "__main__":
    sys.exit(main())
