"""SmolLM2-135M with 30% of its non-embedding parameters removed, healed on a CPU (issue #23).

Rows (each on ``pretrained:smollm2-135m``, perplexity on the held-out plays only,
``shakespeare[test]``, ``--tokens`` tokens, one window):

* ``reference``: the float model;
* ``both`` / ``width`` / ``depth``: ``ts.prune_llm_(model, "shakespeare", target=--target,
  mode=...)`` (activation importance for width, ShortGPT block influence for depth);
* ``torch-pruning``: Torch-Pruning's ``MetaPruner`` as its LLM example sets it up (group L2
  magnitude importance, the hidden width, the MLP channels and the attention heads pruned at one
  ratio per layer, key/value heads given so grouped-query attention is kept, ``lm_head`` ignored,
  head dims kept, ``round_to=4``), its ratio searched so the removed share of non-embedding
  parameters is closest to ``--target``; the transformers config is then rewritten from the pruned
  shapes (as the example does) and a tied ``lm_head`` tied again (a peer for this row only:
  ``pip install torch-pruning==1.6.1``; without it the row reports that it cannot import);
* ``search``: ``search_llm(..., trials=--search-trials)`` (prune + int4), its best trial and the
  uniform baselines it measures (bytes vs the fp32 model, perplexity; with ``--search-objective
  tokens_per_s`` also each trial's int4 ONNX decoder's decode speed), unhealed unless
  ``--search-heal-minutes``.

Every pruned row is healed with ``ts.heal_`` (distillation from the reference on the training
plays) for ``--heal-minutes`` of wall clock (the same budget for every row, default threads), then
measured: perplexity unhealed and healed, the non-embedding share removed (achieved), the float ONNX
decoder with KV cache (``export_onnx_decoder``) timed in ONNX Runtime with 1 thread beside the
reference's (prefill of 128 tokens in ms, decode tokens/s; ``--rounds`` alternating rounds, the
median of each), and the ``save_pretrained`` -> stock ``AutoModelForCausalLM.from_pretrained``
reload (logits compared).

The JSON (``--out``) is written atomically after each row, so a stopped run keeps what it measured;
the table is printed at the end. The machine may be shared: the load average is recorded per row.

    python benchmarks/llm_prune.py                                   # every row, 30-minute heals
    python benchmarks/llm_prune.py --heal-minutes 8 --rows both,width --search-trials 0
    python benchmarks/llm_prune.py --heal-minutes 30 --rows both --search-trials 0   # the issue's budget
    python benchmarks/llm_prune.py --rows search --search-trials 8 --search-objective tokens_per_s
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import torchslim as ts  # noqa: E402
from torchslim._fs import atomic_path  # noqa: E402
from torchslim.prune.llm import parameter_counts  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "llm_prune.json"
ROWS = ("reference", "both", "width", "depth", "torch-pruning", "search")
MODEL = "pretrained:smollm2-135m"
TARGETS = {"perplexity_increase": 0.15, "prefill_speedup": 1.3}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _perplexity(model: Any, tokens: int) -> float:
    return float(ts.evaluate_lm(model, "shakespeare", max_tokens=tokens).perplexity)


def _reload(model: Any, work: Path) -> dict[str, Any]:
    """save_pretrained -> stock AutoModelForCausalLM.from_pretrained -> logits compared."""
    from torchslim.errors import ConfigError
    from torchslim.recipe._export_llm import save_pretrained_checked

    try:
        return {"ok": True, **save_pretrained_checked(model, work / "hf", check=True)}
    except ConfigError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - transformers' config validation: widths its config cannot express
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}


class _Speed:
    """The float ONNX decoders of the reference and a row, timed alternately in ONNX Runtime."""

    def __init__(self, work: Path, threads: int, rounds: int) -> None:
        self.work, self.threads, self.rounds = work, threads, rounds
        self.ref: Any = None

    def export(self, model: Any, name: str) -> tuple[Any, dict[str, Any]]:
        from torchslim.export.onnx_decoder import OnnxDecoder, export_onnx_decoder

        t0 = time.perf_counter()
        info = export_onnx_decoder(model, self.work / f"{name}.onnx")
        return OnnxDecoder(info["path"], threads=self.threads), {"bytes": info["bytes"], "graph": info.get("graph"),
                                                                 "export_s": time.perf_counter() - t0}

    def time(self, decoder: Any) -> dict[str, Any]:
        """Prefill ms / decode tokens/s of ``decoder`` and of the reference, rounds alternating."""
        runs: dict[str, list[Any]] = {"row": [], "reference": []}
        pair = [("row", decoder)] + ([("reference", self.ref)] if self.ref is not None and decoder is not self.ref else [])
        for r in range(self.rounds):
            for key, dec in (pair if r % 2 == 0 else pair[::-1]):
                runs[key].append(ts.lm_speed(dec, prompt_tokens=128, new_tokens=32, threads=self.threads, runs=3, warmup=1))
        out: dict[str, Any] = {}
        for key, got in runs.items():
            if got:
                out[f"{key}_prefill_ms"] = statistics.median(s.prefill_ms for s in got)
                out[f"{key}_decode_tokens_per_s"] = statistics.median(s.decode_tokens_per_s for s in got)
        if runs["reference"]:
            out["prefill_speedup"] = out["reference_prefill_ms"] / out["row_prefill_ms"]
            out["decode_speedup"] = out["row_decode_tokens_per_s"] / out["reference_decode_tokens_per_s"]
        out["threads"] = self.threads
        return out


# ---------------------------------------------------------------- Torch-Pruning (its LLM example's setup)


def _tp_prune(model: Any, ratio: float, example: torch.Tensor) -> Any:
    """One Torch-Pruning pass at ``ratio`` on ``model`` (in place); the config rewritten from the shapes."""
    import torch_pruning as tp

    cfg = model.config
    attn_impl = cfg._attn_implementation
    cfg._attn_implementation = "eager"  # traced attention: q/k/v heads visible to the dependency graph
    heads: dict[Any, int] = {}
    for name, mod in model.named_modules():
        if name.endswith("self_attn"):
            heads[mod.q_proj] = cfg.num_attention_heads
            heads[mod.k_proj] = cfg.num_key_value_heads
            heads[mod.v_proj] = cfg.num_key_value_heads
    try:
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=heads,
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4,
            forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits)
        pruner.step()
    finally:
        cfg._attn_implementation = attn_impl
    layer = model.model.layers[0]
    head_dim = layer.self_attn.head_dim
    cfg.hidden_size = model.model.embed_tokens.weight.shape[1]
    cfg.intermediate_size = layer.mlp.gate_proj.out_features
    cfg.num_attention_heads = layer.self_attn.q_proj.out_features // head_dim
    cfg.num_key_value_heads = layer.self_attn.k_proj.out_features // head_dim
    cfg.head_dim = head_dim
    for name, mod in model.named_modules():
        if name.endswith("self_attn"):
            mod.num_key_value_groups = mod.q_proj.out_features // mod.k_proj.out_features
    emb, head = model.model.embed_tokens, model.lm_head
    if getattr(cfg, "tie_word_embeddings", False) and head.weight is not emb.weight and torch.equal(head.weight, emb.weight):
        head.weight = emb.weight  # both pruned along the same hidden channels: one tensor again
    return model


def _tp_row(ref: Any, target: float, tok: Any) -> tuple[Any, dict[str, Any]]:
    """Torch-Pruning at the ratio whose removed non-embedding share is closest to ``target``."""
    import importlib.metadata

    t0 = time.perf_counter()
    example = torch.tensor([tok.encode("To be, or not to be, that is the question:")])
    base = parameter_counts(ref)["non_embedding"]
    ratio = 1 - (1 - target) ** 0.5  # in and out widths both shrink: ~ (1 - r)^2 stays
    tried: list[dict[str, float]] = []
    best: tuple[float, Any, float] | None = None
    for _ in range(3):
        m = _tp_prune(copy.deepcopy(ref).eval(), ratio, example)
        got = 1 - parameter_counts(m)["non_embedding"] / base
        tried.append({"ratio": ratio, "achieved": got})
        _log(f"torch-pruning ratio {ratio:.4f}: removed {got:.2%} of the non-embedding parameters")
        if best is None or abs(got - target) < abs(best[0] - target):
            best = (got, m, ratio)
        if abs(got - target) < 0.005 or got <= 0:
            break
        ratio = ratio * target / got
    assert best is not None
    widths = {k: getattr(best[1].config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                     "num_key_value_heads", "num_hidden_layers")}
    return best[1], {"version": importlib.metadata.version("torch-pruning"), "ratio": best[2], "ratios_tried": tried,
                     "achieved": best[0], "widths_after": widths, "seconds": time.perf_counter() - t0,
                     "importance": "GroupMagnitudeImportance(p=2, group_reduction='mean')"}


# ---------------------------------------------------------------- rows


def _pruned_row(name: str, ref: Any, args: argparse.Namespace, tok: Any, speed: _Speed, work: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"row": name, "load_start": os.getloadavg()[0]}
    t0 = time.perf_counter()
    if name == "torch-pruning":
        try:
            import torch_pruning  # noqa: F401
        except ImportError as e:
            return {**row, "error": f"torch_pruning does not import: {e}"}
        try:
            student, row["prune"] = _tp_row(ref, args.target, tok)
        except Exception as e:  # noqa: BLE001 - the row says why Torch-Pruning cannot run
            return {**row, "error": f"Torch-Pruning failed on this model: {type(e).__name__}: {e}"[:500]}
    else:
        student = copy.deepcopy(ref).eval()
        plan = ts.prune_llm_(student, "shakespeare", target=args.target, mode=name)
        row["prune"] = plan.to_dict()
    row["prune_s"] = time.perf_counter() - t0
    counts, base = parameter_counts(student), parameter_counts(ref)
    row["non_embedding_removed"] = 1 - counts["non_embedding"] / base["non_embedding"]
    row["params"] = counts
    row["perplexity_unhealed"] = _perplexity(student, args.tokens)
    _log(f"{name}: pruned in {row['prune_s']:.0f} s, {row['non_embedding_removed']:.2%} removed, "
         f"perplexity unhealed {row['perplexity_unhealed']:.2f}")
    torch.set_num_threads(args.heal_threads)
    try:
        heal = ts.heal_(student, ref, "shakespeare", minutes=args.heal_minutes, progress=True, log_every=25,
                        checkpoint_dir=None, **{k: v for k, v in (("schedule", args.heal_schedule),
                                                                  ("precision", args.heal_precision),
                                                                  ("hidden_weight", args.heal_hidden_weight),
                                                                  ("lr", args.heal_lr)) if v is not None})
    finally:
        torch.set_num_threads(1)
    row["heal"] = {k: v for k, v in heal.to_dict().items() if k != "loss_curve"}
    row["heal"]["loss_curve"] = [round(x, 4) for x in heal.loss_curve]
    row["perplexity"] = _perplexity(student, args.tokens)
    _log(f"{name}: healed {heal.steps} steps ({heal.minutes:.1f} min), perplexity {row['perplexity']:.2f}")
    try:
        dec, row["onnx"] = speed.export(student, name)
        row["speed"] = speed.time(dec)
    except Exception as e:  # noqa: BLE001 - the row says why it has no ONNX timing
        row["speed"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    row["reload"] = _reload(student, work / name)
    row["load_end"] = os.getloadavg()[0]
    row["seconds"] = time.perf_counter() - t0
    return row


def _search_row(ref: Any, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from torchslim.search.llm import search_llm

    t0 = time.perf_counter()
    row: dict[str, Any] = {"row": "search", "load_start": os.getloadavg()[0]}
    torch.set_num_threads(args.heal_threads)
    try:
        res = search_llm(ref, "shakespeare", trials=args.search_trials, perplexity_tokens=args.tokens,
                         heal_minutes=args.search_heal_minutes, out=work / "search", uniform=args.search_uniform,
                         width=tuple(float(w) for w in args.search_width.split(",")), objective=args.search_objective)
    finally:
        torch.set_num_threads(1)
    fp32 = res.reference["bytes"]
    row.update(res.to_dict())
    row["reference"] = {k: v for k, v in res.reference.items() if k != "sensitivity"}
    row["bytes_ratio"] = {t.name: t.bytes / fp32 for t in res.trials}
    row["healed"] = args.search_heal_minutes > 0
    row["table"] = str(res.table())
    row["seconds"] = time.perf_counter() - t0
    row["load_end"] = os.getloadavg()[0]
    return row


def _write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, default=str))


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(res: dict[str, Any]) -> str:
    rows = res["rows"]
    ref = next((r for r in rows if r["row"] == "reference" and "perplexity" in r), None)
    ref_ppl = ref["perplexity"] if ref else None
    pruned = any(r["row"] not in ("reference", "search") for r in rows)
    what = f"{res['target']:.0%} of the non-embedding parameters removed, healed {res['heal_minutes']} min" if pruned else "reference"
    lines = [f"SmolLM2-135M, {what}; "
             f"perplexity on {res['tokens']} held-out tokens (shakespeare[test]); float ONNX decoder in ONNX Runtime, "
             f"{res['timing_threads']} thread; {res['cpu']}",
             f"{'row':14s} {'removed':>8s} {'ppl unhealed':>12s} {'ppl healed':>10s} {'vs ref':>8s} {'heal steps':>10s} "
             f"{'prefill ms':>10s} {'x ref':>6s} {'decode t/s':>10s} {'x ref':>6s} {'reload':>7s}"]
    for r in rows:
        if r["row"] == "search":
            continue
        if "error" in r:
            lines.append(f"{r['row']:14s} failed: {r['error']}")
            continue
        sp = r.get("speed", {})
        inc = None if ref_ppl is None or r.get("perplexity") is None else r["perplexity"] / ref_ppl - 1
        lines.append(
            f"{r['row']:14s} {_fmt(r.get('non_embedding_removed'), '.1%'):>8s} {_fmt(r.get('perplexity_unhealed'), '.2f'):>12s} "
            f"{_fmt(r.get('perplexity'), '.2f'):>10s} {_fmt(inc, '+.1%'):>8s} {_fmt(r.get('heal', {}).get('steps'), 'd'):>10s} "
            f"{_fmt(sp.get('row_prefill_ms'), '.1f'):>10s} {_fmt(sp.get('prefill_speedup'), '.2f'):>6s} "
            f"{_fmt(sp.get('row_decode_tokens_per_s'), '.1f'):>10s} {_fmt(sp.get('decode_speedup'), '.2f'):>6s} "
            f"{('ok' if r.get('reload', {}).get('ok') else 'FAIL'):>7s}")
    search = next((r for r in rows if r["row"] == "search"), None)
    if search is not None:
        if "error" in search:
            lines.append(f"search failed: {search['error']}")
        else:
            lines.append("")
            lines.append(search["table"])
            best = search.get("best")
            if best:
                lines.append(f"search best: {best['name']}, {search['bytes_ratio'][best['name']]:.1%} of the fp32 bytes, "
                             f"perplexity {best['perplexity']:.2f} ({best['increase']:+.1%}), "
                             f"{'healed' if search['healed'] else 'unhealed'}")
            else:
                lines.append("search: no trial within the perplexity limit")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heal-minutes", type=float, default=30.0, help="healing budget of every pruned row (wall clock)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)} (reference always runs)")
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens scored for perplexity")
    ap.add_argument("--search-trials", type=int, default=8, help="Optuna trials of the search row (0: no search row)")
    ap.add_argument("--search-heal-minutes", type=float, default=0.0, help="heal the search's chosen model this long")
    ap.add_argument("--search-objective", default="bytes", help="search objective: bytes (fewest) or tokens_per_s "
                    "(fastest int4 ONNX decoder, measured per trial)")
    ap.add_argument("--search-width", default="0,0.1,0.2,0.3", help="non-embedding shares the search may remove by width")
    ap.add_argument("--no-search-uniform", dest="search_uniform", action="store_false",
                    help="skip the search's uniform baselines (int8, int4, width30+int4, depth30+int4)")
    ap.add_argument("--target", type=float, default=0.3, help="fraction of the non-embedding parameters removed")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (row, reference)")
    ap.add_argument("--heal-schedule", default=None, help="heal_'s learning-rate schedule (constant | cosine; default: heal_'s)")
    ap.add_argument("--heal-precision", default=None, help="heal_'s precision (auto | bfloat16 | float32; default: heal_'s)")
    ap.add_argument("--heal-hidden-weight", type=float, default=None, help="heal_'s hidden_weight (0: logit KD only)")
    ap.add_argument("--heal-lr", type=float, default=None, help="heal_'s learning rate (default: heal_'s)")
    ap.add_argument("--heal-threads", type=int, default=torch.get_num_threads(), help="threads while healing / searching")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.search_trials <= 0 and "search" in rows:
        rows.remove("search")
    rows = ["reference"] + [r for r in rows if r != "reference"]
    from torchslim.profile.latency import cpu_name
    from torchslim.zoo.pretrained_llm import tokenizer

    torch.set_num_threads(1)
    began = time.perf_counter()
    res: dict[str, Any] = {"model": MODEL, "target": args.target, "heal_minutes": args.heal_minutes, "tokens": args.tokens,
                           "timing_threads": 1, "heal_threads": args.heal_threads, "cpu": cpu_name(),
                           "cores": os.cpu_count(), "argv": sys.argv[1:], "targets": TARGETS, "rows": [], "partial": True}
    tok = tokenizer("smollm2-135m")
    ref = ts.create_model(MODEL).eval()
    work = Path(tempfile.mkdtemp(prefix="llm_prune_"))
    speed = _Speed(work, threads=1, rounds=args.rounds)
    for name in rows:
        _log(f"== {name} (load {os.getloadavg()[0]:.1f}, {time.perf_counter() - began:.0f} s in)")
        try:
            if name == "reference":
                row: dict[str, Any] = {"row": name, "load_start": os.getloadavg()[0], "params": parameter_counts(ref),
                                       "non_embedding_removed": 0.0, "perplexity": _perplexity(ref, args.tokens)}
                speed.ref, row["onnx"] = speed.export(ref, "reference")
                row["speed"] = speed.time(speed.ref)
                row["reload"] = _reload(ref, work / "reference")
                row["load_end"] = os.getloadavg()[0]
            elif name == "search":
                row = _search_row(ref, args, work)
            else:
                row = _pruned_row(name, ref, args, tok, speed, work)
        except Exception as e:  # noqa: BLE001 - a failed row is reported, the others still run
            row = {"row": name, "error": f"{type(e).__name__}: {e}"[:500]}
        res["rows"].append(row)
        res["seconds"] = time.perf_counter() - began
        _write(args.out, res)
        _log(f"== {name} done: " + ("; ".join(f"{k} {row[k]}" for k in ("perplexity", "error") if k in row)))
    shutil.rmtree(work, ignore_errors=True)  # ONNX files, save_pretrained folders, heal checkpoints: GBs
    res["partial"] = False
    res["table"] = _table(res)
    _write(args.out, res)
    print(res["table"])
    print(f"wrote {args.out} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
