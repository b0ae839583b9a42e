"""``torchslim prune``: structured channel pruning from the command line."""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from torchslim._cli_common import VerbContext, add_model_verb_args, run_model_verb

__all__ = ["register_channels", "removed_words"]


def _apply(args: argparse.Namespace) -> Any:
    """Check every flag (before anything is built) and return the verb's ``apply``."""
    from torchslim._cli_common import finetune_config
    from torchslim.errors import ConfigError
    from torchslim.prune.channels import Budget, prune_channels_
    from torchslim.prune.importance import get_importance

    target = None
    if args.target_macs is not None:
        target = Budget(macs=args.target_macs)
    elif args.target_params is not None:
        target = Budget(params=args.target_params)
    where = {"runtime": args.runtime, "threads": args.threads, "memory_format": args.memory_format, "batch": args.batch}
    if args.target_latency is not None:
        if target is not None:
            raise ConfigError("give one of --target-macs, --target-params or --target-latency")
        target = Budget(latency=args.target_latency, **{k: v for k, v in where.items() if v is not None})
    elif any(v is not None for v in where.values()):
        given = ", ".join("--" + k.replace("_", "-") for k, v in where.items() if v is not None)
        raise ConfigError(f"{given}: only used with --target-latency F (where it is measured); give --target-latency too")
    if (args.ratio is None) == (target is None):
        raise ConfigError("give exactly one of --ratio R, --target-macs F, --target-params F or --target-latency F")
    get_importance(args.importance)
    if args.importance == "taylor" and not args.data:
        raise ConfigError("--importance taylor needs --data (gradients on labelled batches)")
    if args.finetune_epochs and not args.data:
        raise ConfigError("--finetune-epochs needs --data")
    train_cfg = finetune_config(args, args.finetune_epochs, optimizer="adam")

    def apply(model: nn.Module, ctx: VerbContext) -> dict[str, Any]:
        taylor_data = None
        if args.importance == "taylor":
            taylor_data = ctx.data.loader("train", batch_size=64)
        plan = prune_channels_(
            model,
            ctx.example_inputs,
            ratio=args.ratio,
            target=target,
            importance=args.importance,
            global_ranking=args.global_ranking,
            skip=args.ignore or (),
            round_to=args.round_to,
            min_channels=args.min_channels,
            data=taylor_data,
        )
        extras: dict[str, Any] = {
            "prune": {
                "ratio": plan.ratio,
                "importance": plan.importance,
                "removed_channels": plan.removed_channels,
                "total_channels": plan.total_channels,
                "groups": len(plan.groups),
                "left_whole": plan.left_whole,
                "budget": plan.budget,
                "achieved": plan.achieved,
            }
        }
        ctx.notes.append(removed_words(plan))
        if train_cfg is not None:
            from torchslim.train import fit

            result = fit(model, ctx.data, train_cfg, progress=not args.no_progress)
            extras["finetune"] = {"epochs": result.epochs_run, "test_accuracy": result.test_accuracy}
        return extras

    return apply


def _round_to(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'auto'; got {text!r}")
    return value


def removed_words(plan: Any) -> str:
    """What ``prune`` removed, in one line: ``removed 186 of 400 channels in 3 groups ...``.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> plan = NS(removed_channels=186, total_channels=400, importance="l2", budget=None, achieved={}, left_whole=[],
        ...           groups=[{"size": 200, "kept": 100}, {"size": 100, "kept": 64}, {"size": 100, "kept": 50}])
        >>> removed_words(plan)
        'removed 186 of 400 channels (46.5%) in 3 of 3 channel groups, ranked by l2 importance'
    """
    cut = [g for g in plan.groups if g.get("kept", g.get("size")) < g.get("size", 0)]
    share = f" ({100 * plan.removed_channels / plan.total_channels:.1f}%)" if plan.total_channels else ""
    text = (f"removed {plan.removed_channels} of {plan.total_channels} channels{share} in {len(cut)} of "
            f"{len(plan.groups)} channel groups, ranked by {plan.importance} importance")
    if plan.budget:
        names = {"macs": "MACs", "params": "parameters", "latency": "latency"}
        goals = ", ".join(f"{names[k]} {plan.achieved[k]:.3f} of the original (budget {v:g})" if k in plan.achieved
                          else f"{names[k]} budget {v:g} of the original" for k, v in plan.budget.items()
                          if k in names and isinstance(v, (int, float)))
        if goals:
            text += f"; {goals}"
    if plan.left_whole:
        text += f"; {len(plan.left_whole)} group(s) left whole (cutting them would break the forward)"
    return text


def register_channels(sub: Any) -> None:
    """Add the ``prune`` verb."""
    from torchslim.prune.config import PruneConfig

    # flag defaults are the configs' (the one place defaults live)
    pd = PruneConfig.defaults()

    p = sub.add_parser("prune", help="structured pruning: remove channels so shapes (and MACs) really shrink")
    add_model_verb_args(p)
    p.add_argument("--ratio", type=float, help="fraction of each group's channels to remove, in [0, 1)")
    p.add_argument("--target-macs", type=float, help="keep this fraction of the MACs (e.g. 0.5)")
    p.add_argument("--target-params", type=float, help="keep this fraction of the parameters")
    p.add_argument("--target-latency", type=float,
                   help="keep this fraction of the latency measured in --runtime (paired with the original)")
    p.add_argument("--runtime", help="where --target-latency is measured: eager (default), compile, onnxruntime, xnnpack")
    p.add_argument("--threads", type=int, help="intra-op threads of the --target-latency runs (default: torch's)")
    p.add_argument("--memory-format", help="contiguous or channels_last for eager/compile (default: the faster one)")
    p.add_argument("--batch", type=int, help="rows the --target-latency inputs are repeated to (default: as given)")
    p.add_argument("--importance", default=pd["importance"], help="l1, l2, bn_scale, fpgm, taylor, lamp, random (default l2)")
    p.add_argument("--global", dest="global_ranking", action="store_true", help="rank channels across groups")
    p.add_argument("--skip", "--ignore", dest="ignore", action="append", metavar="PATTERN",
                   help="module name, glob or re:REGEX to leave whole (repeatable; --ignore is its old name)")
    p.add_argument("--round-to", type=_round_to, default=pd["round_to"],
                   help="kept widths rounded up to a multiple of this, or 'auto': nearby widths the runtime runs "
                        "fastest, measured (default: auto with --target-latency, else 1)")
    p.add_argument("--min-channels", type=int, default=pd["min_channels"])
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune on --data after pruning")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (Adam)")
    p.set_defaults(func=lambda args: run_model_verb(args, "prune", _apply(args)))
