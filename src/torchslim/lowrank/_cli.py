"""CLI verb ``factorize``: low-rank factorization of a model, optionally fine-tuned after.

``torchslim factorize MODEL --method M (--rank R | --energy E | --target-macs F | --target-params F |
--target-latency F [--memory-format FMT]) [--runtime eager|compile|onnxruntime|xnnpack] [--threads N]
[--scope layer|model] [--data SPEC --finetune-epochs N] --out DIR [--json]``

``--target-latency`` measures: each layer's factorized forms are timed in the runtime, layers not
faster factorized are left whole, and the whole model is timed against the original; ``--json``
reports the measured latency ratio, the runtime, the threads and the layers left whole under
``"latency"``. ``--runtime R`` with any other rank rule (``--energy 0.9 --runtime onnxruntime``)
times every layer the rule factorizes, as it is and factorized, in R and leaves whole the ones
not at least 5% faster factorized; ``--json`` lists them (with the measured milliseconds) under
``"runtime_check"`` (and, with the reasons, in ``"factorize"``'s ``skipped``).
"""

from __future__ import annotations

import argparse
from typing import Any

from torchslim._registry import register as _register_entry

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``factorize`` verb to the ``torchslim`` parser."""
    from torchslim._cli_common import add_model_verb_args
    from torchslim.lowrank import FactorizeConfig
    from torchslim.lowrank.api import METHODS
    from torchslim.train import TrainConfig

    # flag defaults are the configs' (the one place defaults live)
    fd = FactorizeConfig.defaults()
    td = TrainConfig.defaults()

    p = sub.add_parser(
        "factorize", help="replace layers by low-rank factorized ones (SVD, Tucker-2, CP, spatial SVD, separable)"
    )
    add_model_verb_args(p)
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", help="integer rank, a fraction of full rank in (0, 1], or 'vbmf'")
    g.add_argument("--energy", type=float, help="keep this fraction (0, 1] of the squared singular values")
    g.add_argument("--target-macs", type=float, help="keep at most this fraction (0, 1] of the MACs")
    g.add_argument("--target-params", type=float, help="keep at most this fraction (0, 1] of the parameters")
    g.add_argument("--target-latency", type=float,
                   help="measured latency at most this fraction (0, 1] of the original's, in --runtime")
    p.add_argument("--runtime", help="eager, compile, onnxruntime or xnnpack: where --target-latency is measured "
                   "(default eager); with another rule, layers not faster factorized there are left whole")
    p.add_argument("--threads", type=int, help="intra-op threads of the --runtime timings (default: torch's)")
    p.add_argument("--memory-format", help="contiguous or channels_last for the PyTorch runtimes (--target-latency)")
    p.add_argument("--scope", default=fd["scope"], help="layer or model: where a --target-* applies (default layer)")
    p.add_argument("--modules", help="comma-separated module names/globs (default: every layer the method takes)")
    p.add_argument("--skip", "--exclude", dest="exclude",
                   help="comma-separated layer names/globs/re: patterns to leave alone (--exclude: old name)")
    p.add_argument("--keep-larger", action="store_true", help="factorize even layers whose factorized form is larger")
    p.add_argument("--max-iter", type=int, default=fd["max_iter"], help="CP-ALS iterations (default 100)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune on --data after factorizing")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--batch-size", type=int, default=td["batch_size"])
    p.add_argument("--max-steps", type=int, help="at most this many steps per fine-tuning epoch")
    p.add_argument("--device", default=td["device"], help="device for fine-tuning: auto, cpu, cuda (default auto)")
    p.set_defaults(func=_cmd_factorize)


def _rank(text: str | None) -> int | float | str | None:
    from torchslim.errors import ConfigError

    if text is None:
        return None
    t = text.strip().lower()
    if t == "vbmf":
        return t
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        raise ConfigError(f"--rank must be an integer, a fraction in (0, 1] or 'vbmf'; got {text!r}") from None


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(s.strip() for s in text.split(",") if s.strip())


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`FactorizeConfig` the flags describe (raises ``ConfigError`` when invalid)."""
    from torchslim.errors import ConfigError
    from torchslim.lowrank.api import FactorizeConfig
    from torchslim.profile.budget import Budget

    target = None
    runtime, threads = args.runtime, args.threads
    where = {"runtime": args.runtime, "threads": args.threads, "memory_format": args.memory_format}
    if args.target_latency is not None:
        target = Budget(latency=args.target_latency, **{k: v for k, v in where.items() if v is not None})
        runtime = threads = None  # the budget says where it is measured
    elif args.memory_format is not None:
        raise ConfigError("--memory-format says how --target-latency is measured; give --target-latency F too")
    elif threads is not None and runtime is None:
        raise ConfigError("--threads says how layers are timed in --runtime; give --runtime R too")
    return FactorizeConfig(
        method=args.method,
        rank=_rank(args.rank),
        energy=args.energy,
        target_macs=args.target_macs,
        target_params=args.target_params,
        target=target,
        scope=args.scope,
        modules=_split(args.modules),
        skip=_split(args.exclude) or (),
        only_if_smaller=not args.keep_larger,
        max_iter=args.max_iter,
        seed=args.seed,
        runtime=runtime,
        threads=threads,
    )


def _cmd_factorize(args: argparse.Namespace) -> int:
    from torchslim._cli_common import finetune_config, run_model_verb
    from torchslim.errors import ConfigError

    config = config_from_args(args)  # check everything before building anything
    if args.finetune_epochs and not args.data:
        raise ConfigError("--finetune-epochs needs --data to train on")
    train_cfg = finetune_config(args, args.finetune_epochs, lr_schedule="cosine")

    def apply(model: Any, ctx: Any) -> dict[str, Any]:
        from torchslim.lowrank.api import factorize_

        plan = factorize_(model, config, ctx.example_inputs)
        if not args.json:
            ctx.console.print(plan.table())
        extras: dict[str, Any] = {"factorize": plan.to_dict()}
        if plan.latency is not None:
            from torchslim.lowrank._latency import speedup_words

            extras["latency"] = plan.latency
            ctx.notes.append(speedup_words(plan.latency))
        if plan.runtime_check is not None:
            rc = plan.runtime_check
            extras["runtime_check"] = rc
            ctx.notes.append(f"timed in {rc['runtime']} ({rc['threads']} thread{'s' if rc['threads'] != 1 else ''}): "
                             f"{len(rc['left_whole'])} layer{'s' if len(rc['left_whole']) != 1 else ''} left whole as "
                             f"not faster factorized" + (f" ({', '.join(rc['left_whole'])})" if rc['left_whole'] else ""))
        if train_cfg is not None:
            from torchslim.train import fit

            result = fit(model, ctx.data, train_cfg, progress=not (args.no_progress or args.json))
            extras["finetune"] = {"config": train_cfg.to_dict(), "result": _result_dict(result)}
        return extras

    return run_model_verb(args, "factorize", apply)


def _result_dict(result: Any) -> Any:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    import dataclasses

    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else str(result)


# the verbs above, found by `torchslim` through the registry (ordered by `order` in --help)
_register_entry("cli_verb", "factorize", register, family="lowrank", order=50, verbs=("factorize",))
