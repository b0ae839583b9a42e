"""CLI verb ``search``: budgeted compression search on Optuna.

``torchslim search MODEL --data SPEC --budget macs=0.3 [--objective accuracy,latency] --trials N
[--storage URL --study NAME] [--resume] --out DIR [--json]``

Many workers: run the same command on any number of machines with one ``--storage
postgresql://...`` and ``--study NAME`` (each with its own ``--out``); together they run ``--trials``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torchslim._registry import register as _register_entry

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``search`` verb to the ``torchslim`` parser."""
    from torchslim._cli_common import add_out_args

    p = sub.add_parser("search", help="search per-layer pruning ratios / bit widths for the best model within a budget")
    p.add_argument("model", metavar="MODEL", help="model spec")
    p.add_argument("--data", required=True, help="labeled data spec")
    p.add_argument("--budget", help="bounds as fractions of the original, e.g. macs=0.3 or macs=0.3,latency=0.5 "
                   "(metrics: macs, params, size, latency)")
    p.add_argument("--target-latency", type=float,
                   help="the latency bound alone: measured latency at most this fraction (0, 1] of the original's, in "
                        "--runtime (the same as --budget latency=F; may be combined with --budget macs=...)")
    p.add_argument("--runtime", default="eager",
                   help="where latency (objective or budget) is measured: eager (default), compile, onnxruntime, xnnpack")
    p.add_argument("--threads", type=int, help="intra-op threads of the latency runs (default: torch's)")
    p.add_argument("--objective", default="accuracy",
                   help="comma-separated metrics to optimise: accuracy (max), macs, params, size, latency (min); "
                   "two or more give a Pareto front (NSGA-II). Default: accuracy")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study should hold (default 20)")
    p.add_argument("--storage", help="shared Optuna storage URL, e.g. postgresql://user@host:5432/db "
                   "(default: sqlite in --out)")
    p.add_argument("--study", help="study name (default torchslim-search)")
    add_out_args(p, help="output folder (study, Pareto table, best recipe and model)",
                 resume="continue the study of an existing --out")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,32,32")
    p.add_argument("--max-ratio", type=float, default=0.9, help="largest pruning ratio a group may draw (default 0.9)")
    p.add_argument("--step", type=float, default=0.05, help="spacing of the ratio choices (default 0.05)")
    p.add_argument("--skip", "--ignore", dest="ignore",
                   help="comma-separated module names, globs or re:REGEX whose channels stay whole (--ignore: old name)")
    p.add_argument("--importance", default="l2", help="channel importance criterion (default l2)")
    p.add_argument("--min-channels", type=int, default=1, help="never keep fewer channels in a group (default 1)")
    p.add_argument("--bits", help="also search per-layer weight bits among these, e.g. 4,8")
    p.add_argument("--quant-mode", default="weight-only", help="weight-only (Linear) or static (Conv+Linear)")
    p.add_argument("--ranks", help="also search a per-layer rank among these fractions of full rank, "
                   "e.g. 0.25,0.5,1.0 (1.0: leave the layer alone); Linear by SVD, Conv2d by --conv-rank-method")
    p.add_argument("--rank-layers", help="comma-separated globs of the layers whose rank is searched "
                   "(default: all)")
    p.add_argument("--conv-rank-method", default="tucker",
                   help="tucker (Tucker-2, default) or svd for Conv2d layers")
    p.add_argument("--eval", dest="evaluation", default="finetune",
                   help="how a trial recovers before validation: finetune, bn (BatchNorm recalibration) or none")
    p.add_argument("--finetune-steps", type=int, default=20, help="SGD steps of each trial's fine-tune (default 20)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of the fine-tunes")
    p.add_argument("--optimizer", default="sgd", help="optimizer of the fine-tunes: sgd, adam or adamw")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the fine-tunes")
    p.add_argument("--final-epochs", type=int, default=2, help="fine-tune epochs of the recipe and best model (default 2)")
    p.add_argument("--sampler", default="auto", help="auto, tpe, nsga2 or random")
    p.add_argument("--startup-trials", type=int, default=8, help="random trials before TPE; NSGA-II population")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and the fine-tunes")
    p.add_argument("--heartbeat", type=int, default=10, help="seconds between trial heartbeats (default 10)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-best-model", action="store_true", help="do not build and save the best model")
    p.add_argument("--no-progress", action="store_true", help="no per-trial lines")
    g = p.add_argument_group("decoder LLMs (pretrained:smollm2-135m, --data shakespeare): width, depth and bits "
                             "within a perplexity limit; --objective bytes (default) or tokens_per_s, --bits 4,8")
    g.add_argument("--max-perplexity-increase", type=float, default=0.15,
                   help="held-out perplexity at most this fraction above the float model's (default 0.15)")
    g.add_argument("--heal-minutes", type=float, default=0.0,
                   help="heal the chosen pruning by distillation for this many minutes (default 0: no healing)")
    p.set_defaults(func=_cmd_search)


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _bits(text: str | None) -> tuple[int, ...] | None:
    from torchslim.errors import ConfigError

    parts = _split(text)
    if parts is None:
        return None
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--bits must be comma-separated integers such as 4,8; got {text!r}") from None


def _ranks(text: str | None) -> tuple[float, ...] | None:
    from torchslim.errors import ConfigError

    parts = _split(text)
    if parts is None:
        return None
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--ranks must be comma-separated fractions of full rank such as 0.25,0.5,1.0; "
                          f"got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`SearchConfig` the flags describe (raises ``ConfigError`` when invalid)."""
    from torchslim.search.api import SearchConfig

    budget = args.budget
    if getattr(args, "target_latency", None) is not None:
        from torchslim.errors import ConfigError

        if budget and "latency" in budget:
            raise ConfigError("give the latency bound once: --target-latency F or latency=F in --budget, not both")
        budget = f"{budget},latency={args.target_latency}" if budget else f"latency={args.target_latency}"
    return SearchConfig(
        objectives=args.objective,
        budget=budget,
        runtime=args.runtime,
        threads=args.threads,
        trials=args.trials,
        max_ratio=args.max_ratio,
        step=args.step,
        skip=_split(args.ignore) or (),
        importance=args.importance,
        min_channels=args.min_channels,
        bits=_bits(args.bits),
        quant_mode=args.quant_mode,
        ranks=_ranks(args.ranks),
        rank_layers=_split(args.rank_layers),
        conv_rank_method=args.conv_rank_method,
        evaluation=args.evaluation,
        finetune_steps=args.finetune_steps,
        lr=args.lr,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        final_epochs=args.final_epochs,
        sampler=args.sampler,
        startup_trials=args.startup_trials,
        seed=args.seed,
        heartbeat=args.heartbeat,
        device=args.device,
    )


def _cmd_search(args: argparse.Namespace) -> int:
    import torchslim as ts
    from torchslim._cli_common import build_model, console_for, emit_json
    from torchslim._fs import drop_set_aside, set_aside
    from torchslim.errors import ConfigError
    from torchslim.search.api import search

    try:  # bad flags are refused before any model is built
        cfg, deferred = config_from_args(args), None
    except ConfigError as exc:
        if args.objective not in ("bytes", "tokens_per_s"):  # the objectives of a decoder LLM's search
            raise
        cfg, deferred = None, exc
    data = ts.load_data(args.data, seed=args.seed)
    model = build_model(args, data)
    if type(model).__name__.endswith("ForCausalLM"):  # a decoder LLM: bytes / speed within a perplexity limit
        return _cmd_search_llm(args, model, data)
    if deferred is not None:
        raise deferred
    if args.force and Path(args.out).exists():  # the contract was checked: set the old results aside
        set_aside(args.out)
    con = console_for(args)
    result = search(model, data, out=args.out, storage=args.storage, study=args.study, resume=args.resume,
                    config=cfg, best_model=not args.no_best_model, progress=not args.no_progress, console=con)
    drop_set_aside(args.out)
    payload = {"model": args.model, "data": args.data, **result.to_dict()}
    if args.json:
        emit_json(payload)
        return 0
    con.print(f"trials: {_trial_words(result.trials)}", highlight=False)
    if result.best is not None:
        b = result.best
        con.print(f"best trial {b['trial']}: {_value_words(b.get('metrics') or b['values'])}; recipe {b['recipe']}",
                  highlight=False)
        if "accuracy_after" in payload:
            con.print(f"best model (test accuracy {100 * payload['accuracy_before']:.2f}% -> "
                      f"{100 * payload['accuracy_after']:.2f}%) saved to {b.get('model', '-')}")
    con.print(f"results in {args.out}")
    return 0


def _cmd_search_llm(args: argparse.Namespace, model: Any, data: Any) -> int:
    from torchslim._cli_common import console_for, emit_json
    from torchslim._fs import drop_set_aside, set_aside
    from torchslim.saving import save
    from torchslim.search.llm import LLMSearchConfig, search_llm

    objective = "bytes" if args.objective == "accuracy" else args.objective
    cfg = LLMSearchConfig(max_perplexity_increase=args.max_perplexity_increase, objective=objective,
                          trials=args.trials, bits=_bits(args.bits) or (4, 8), heal_minutes=args.heal_minutes,
                          threads=args.threads or 1, seed=args.seed)
    if args.force and Path(args.out).exists():
        set_aside(args.out)
    con = console_for(args)
    result = search_llm(model, data, cfg, out=args.out, storage=args.storage, progress=not args.no_progress)
    if result.model is not None and not args.no_best_model:
        save(result.model, Path(args.out) / "model")
        result.files["model"] = str(Path(args.out) / "model")
    drop_set_aside(args.out)
    if args.json:
        emit_json({"model": args.model, "data": args.data, **result.to_dict()})
        return 0
    con.print(result.table())
    ref = result.reference
    if result.best is None:
        con.print(f"no trial stayed within +{args.max_perplexity_increase:.0%} perplexity of the float model "
                  f"({ref['perplexity']:.2f}); raise --max-perplexity-increase or --trials", highlight=False)
    else:
        b = result.best
        con.print(f"best: {b.name}: weights {b.bytes / ref['bytes']:.3f} of the float model's "
                  f"({ref['bytes'] / b.bytes:.2f}x smaller), perplexity {ref['perplexity']:.2f} -> {b.perplexity:.2f} "
                  f"({b.increase:+.1%}); model saved to {result.files.get('model', '-')}", highlight=False)
    con.print(f"results in {args.out}")
    return 0


def _value_words(values: dict[str, Any]) -> str:
    """``{'accuracy': 0.912, 'macs': 0.29}`` -> ``'accuracy 91.20%, MACs 0.290 of the original'``."""
    names = {"macs": "MACs", "params": "parameters", "size": "size", "latency": "latency"}
    parts = []
    for k, v in sorted(values.items(), key=lambda kv: kv[0] != "accuracy"):
        if k == "accuracy":
            parts.append(f"accuracy {100 * v:.2f}%")
        elif k in names:
            parts.append(f"{names[k]} {v:.3f} of the original")
    return ", ".join(parts)


def _trial_words(trials: Any) -> str:
    """Trial counts in words (``{'complete': 18, 'pruned': 2}`` -> ``'18 complete, 2 pruned'``)."""
    if isinstance(trials, dict):
        return ", ".join(f"{v} {k}" for k, v in trials.items() if v or k == "total") or "none"
    return str(trials)


# the verbs above, found by `torchslim` through the registry (ordered by `order` in --help)
_register_entry("cli_verb", "search", register, family="search", order=80, verbs=("search",))
