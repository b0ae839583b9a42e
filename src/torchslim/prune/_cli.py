"""CLI verbs of the prune family: ``sparsify`` and ``lottery`` (structured ``prune`` sits beside them)."""

from __future__ import annotations

import argparse
from typing import Any

from torchslim._registry import register as _register_entry

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the prune family's verbs to the ``torchslim`` parser."""
    from torchslim.prune._cli_channels import register_channels

    register_channels(sub)
    _register_sparse(sub)


# --------------------------------------------------------------------------- unstructured sparsity


def _register_sparse(sub: Any) -> None:
    from torchslim._cli_common import add_model_verb_args
    from torchslim.prune.config import SparsifyConfig

    # flag defaults are the configs' (the one place defaults live)
    sd = SparsifyConfig.defaults()

    p = sub.add_parser("sparsify", help="unstructured / N:M / block sparsity with masks, then compressed storage")
    add_model_verb_args(p)
    p.add_argument("--sparsity", type=float, help="fraction of weights to prune, in [0, 1] (not for N:M)")
    p.add_argument("--target-latency", type=float,
                   help="instead of --sparsity: measured latency at most this fraction (0, 1] of the original's, with the "
                        "Linear layers that run faster as CSR converted (eager PyTorch: the runtime with a sparse kernel)")
    p.add_argument("--runtime", help="where --target-latency is measured: eager (default; the others have no sparse kernel)")
    p.add_argument("--threads", type=int, help="intra-op threads of the --target-latency runs (default: torch's)")
    p.add_argument("--batch", type=int, help="rows the --target-latency inputs are repeated to (default: as given)")
    p.add_argument("--method", default=sd["method"], help="magnitude, random, lamp, movement, wanda, snip")
    p.add_argument("--scope", default=sd["scope"], help="layer or global (default layer)")
    p.add_argument("--pattern", default=sd["pattern"], help="unstructured, N:M (e.g. 2:4), block or block:RxC")
    p.add_argument("--modules", help="comma-separated module names/globs to prune (default: all Linear/Conv)")
    p.add_argument("--calibration-batches", type=int, default=sd["calibration_batches"], help="batches of --data for wanda/snip/movement")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune with masks on --data after pruning")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--storage", default="auto", help="how sparse weights are saved: auto, bitmask, csr, dense")
    p.add_argument("--no-finalize", action="store_true", help="keep the masks (reversible) instead of baking them in")
    p.set_defaults(func=_cmd_sparsify)
    from torchslim.prune.lottery import LotteryConfig

    # flag defaults are the configs' (the one place defaults live)
    ld = LotteryConfig.defaults()

    p = sub.add_parser(
        "lottery", help="lottery tickets: iterative magnitude pruning with reset / rewinding",
        description="Find a lottery ticket (Frankle & Carbin): train MODEL on --data, prune --rate of each layer's "
                    "remaining weights by magnitude, reset the survivors to their initial values (or rewind to "
                    "--rewind-iter), and repeat for --rounds rounds; the random re-init control shows whether "
                    "the ticket's initialisation matters. --out gets the last round's ticket of the first seed "
                    "(model.safetensors, masks baked in), lottery.json and the plot lottery.png.")
    add_model_verb_args(p, data_required=True)
    p.add_argument("--rounds", type=int, default=ld["rounds"],
                   help="prune-and-retrain rounds (after round R about (1 - rate)^R of the weights remain)")
    p.add_argument("--rate", type=float, default=ld["rate"], help="fraction of each layer's remaining weights pruned per round")
    p.add_argument("--output-rate", type=float, help="rate of the output layer (default: rate / 2)")
    p.add_argument("--rewind-iter", type=int, default=ld["rewind_iter"], help="rewind to the weights of this iteration (0: reset to init)")
    p.add_argument("--seeds", type=int, default=ld["seeds"],
                   help="independent runs (seeds --seed, --seed+1, ...); the table shows their mean")
    p.add_argument("--epochs", type=int, default=ld["epochs"], help="training epochs of every run (dense, each round, each control)")
    p.add_argument("--lr", type=float, default=ld["lr"], help="Adam learning rate of every training run")
    p.add_argument("--batch-size", type=int, default=ld["batch_size"], help="training batch size")
    p.add_argument("--eval-every", type=int, default=ld["eval_every"],
                   help="training iterations between evaluations; the early-stop iteration is the one with the best validation loss")
    p.add_argument("--controls", default=",".join(ld["controls"]), help="comma list of reinit, random_mask (or 'none')")
    p.add_argument("--device", default=ld["device"], help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=_cmd_lottery)


def _cmd_sparsify(args: argparse.Namespace) -> int:
    from torchslim._cli_common import run_model_verb
    from torchslim.errors import ConfigError
    from torchslim.prune._sparse_io import FORMATS
    from torchslim.prune.unstructured import parse_pattern, valid_sparsity

    pattern = parse_pattern(args.pattern)  # check everything before building anything
    given = [f for f, v in (("--runtime", args.runtime), ("--threads", args.threads), ("--batch", args.batch)) if v is not None]
    if args.target_latency is not None:
        from torchslim.profile.budget import Budget
        from torchslim.prune.sparse_latency import check_sparse_runtime

        if args.sparsity is not None:
            raise ConfigError("give one of --sparsity F or --target-latency F, not both")
        if pattern.kind != "unstructured":
            raise ConfigError(f"--target-latency needs --pattern unstructured (the CSR kernel); got {pattern}")
        args._target = Budget(latency=args.target_latency, runtime=args.runtime or "eager", threads=args.threads,
                              batch=args.batch)
        check_sparse_runtime(args._target.runtime)
    elif given:
        raise ConfigError(f"{', '.join(given)}: only used with --target-latency F (where it is measured); give it too")
    else:
        args._target = None
    if pattern.kind != "nm" and args._target is None:
        if args.sparsity is None:
            raise ConfigError(f"--sparsity (a number in [0, 1]) or --target-latency is required for pattern {pattern}")
        valid_sparsity(args.sparsity, "--sparsity")
    if args.scope not in ("layer", "global"):
        raise ConfigError(f"--scope must be 'layer' or 'global'; got {args.scope!r}")
    if args.storage not in FORMATS:
        raise ConfigError(f"--storage must be one of {', '.join(FORMATS)}; got {args.storage!r}")
    if args.finetune_epochs and not args.data:
        raise ConfigError("--finetune-epochs needs --data to train on")
    from torchslim._registry import get_method

    criterion = get_method("prune.unstructured", args.method)
    if criterion.needs_calibration and not args.data:
        raise ConfigError(f"--method {args.method} needs calibration data: pass --data SPEC")
    from torchslim._cli_common import finetune_config

    args._train_config = finetune_config(args, args.finetune_epochs)
    return run_model_verb(args, "sparsify", _apply_sparsify)


def _apply_sparsify(model: Any, ctx: Any) -> dict[str, Any]:
    from torchslim.prune.masks import MaskCallback, finalize_, sparsify_, sparsity_report

    args = ctx.args
    calibration = ctx.data.loader("train", 64, shuffle=False) if ctx.data is not None else None
    modules = [m.strip() for m in args.modules.split(",")] if args.modules else None
    plan = sparsify_(
        model, None if args.pattern.count(":") == 1 and "block" not in args.pattern else args.sparsity,
        method=args.method, scope=args.scope, pattern=args.pattern, modules=modules,
        calibration=calibration, calibration_batches=args.calibration_batches, seed=args.seed, target=args._target,
    )
    extras: dict[str, Any] = {"sparsify": plan.to_dict()}
    if plan.latency is not None:
        extras["latency_ratio"] = plan.latency["latency"]
        if not args.json:
            lat = plan.latency
            ctx.console.print(f"sparsity {lat['sparsity']:.3f}: measured latency {lat['latency']:.3f} of the original's in "
                              f"{lat['runtime']} with {len(lat['csr_layers'])} Linear layers as CSR "
                              f"({', '.join(lat['csr_layers'][:4])}); deploy: {lat['deploy']}")
    if args._train_config is not None:
        import torchslim as ts

        result = ts.fit(model, ctx.data, args._train_config, callbacks=[MaskCallback()], progress=not args.no_progress)
        extras["finetune"] = {"epochs": result.epochs_run, "history": result.history}
    report = finalize_(model, args.storage) if not args.no_finalize else sparsity_report(model)
    extras["sparsity_report"] = report.to_dict()
    if not args.json:
        ctx.console.print(report.table())
    return extras


def _cmd_lottery(args: argparse.Namespace) -> int:
    import torchslim as ts
    from torchslim._cli_common import console_for, emit_json
    from torchslim.prune.lottery import LotteryConfig, run_lottery
    from torchslim.prune.masks import finalize_

    controls = () if args.controls.strip().lower() == "none" else tuple(c.strip() for c in args.controls.split(",") if c.strip())
    cfg = LotteryConfig(
        rounds=args.rounds, rate=args.rate, output_rate=args.output_rate, rewind_iter=args.rewind_iter,
        seeds=args.seeds, seed=args.seed, controls=controls, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, eval_every=args.eval_every, device=args.device,
    )
    con = console_for(args)
    data = ts.load_data(args.data, seed=args.seed)
    from torchslim._cli_common import build_model

    build_model(args, data)  # MODEL, --input-shape and --data checked against each other before any training
    log = None if args.json or args.no_progress else con.print
    result = run_lottery(args.model, data, cfg, log=log)
    from pathlib import Path

    from torchslim._cli_common import writing

    out = Path(args.out)
    files: dict[str, str] = {}
    with writing(out) as tmp:
        if result.ticket is not None:
            ticket = result.ticket.to("cpu")
            finalize_(ticket)
            if args.input_shape:
                from torchslim.zoo.spec import parse_input_shape

                ts.set_example_inputs(ticket, parse_input_shape(args.input_shape))
            ts.save(ticket, tmp)
            files.update({"model": str(out), "plan": str(out / "plan.json"), "weights": str(out / "model.safetensors")})
        files.update({k: str(out / Path(v).relative_to(tmp)) for k, v in result.write(tmp).items()})
    payload = {"verb": "lottery", "model": args.model, "data": args.data, **result.to_dict(), "files": files}
    if args.json:
        emit_json(payload)
        return 0
    from rich.table import Table

    t = Table(title=f"lottery tickets: {args.model} on {args.data}, {cfg.seeds} seed(s)",
              caption=f"early stop: the training iteration (batch step) of the best validation loss, checked every "
                      f"{cfg.eval_every} iterations; accuracy on the test split at that iteration", caption_justify="left")
    for col in ("round", "weights left", "ticket acc", "ticket early stop (iteration)", "reinit acc",
                "reinit early stop (iteration)"):
        t.add_column(col, justify="right")
    t.add_row("0", "100.0%", f"{100 * result.dense_accuracy:.2f}%", f"{result.dense_early_stop_iter:.0f}", "-", "-")
    for r in result.rounds:
        re_acc = f"{100 * r['reinit_accuracy']:.2f}%" if "reinit_accuracy" in r else "-"
        re_it = f"{r['reinit_early_stop_iter']:.0f}" if "reinit_early_stop_iter" in r else "-"
        t.add_row(str(r["round"]), f"{100 * r['remaining']:.1f}%", f"{100 * r['ticket_accuracy']:.2f}%",
                  f"{r['ticket_early_stop_iter']:.0f}", re_acc, re_it)
    con.print(t)
    con.print(_ticket_words(result, cfg, files), highlight=False)
    return 0


def _ticket_words(result: Any, cfg: Any, files: dict[str, str]) -> str:
    """The last line of ``lottery``: which ticket was saved where, and the other files."""
    others = f"; results in {files['lottery']}" + (f", plot {files['plot']}" if "plot" in files else "")
    if "weights" not in files or not result.rounds:
        return "no ticket saved" + others
    last = result.rounds[-1]
    acc = (last.get("ticket_accuracy_per_seed") or [last.get("ticket_accuracy")])[0]
    acc_text = f", test accuracy {100 * acc:.2f}%" if acc is not None else ""
    return (f"saved the ticket of seed {cfg.seed} after round {last['round']} ({100 * last['remaining']:.1f}% of the "
            f"weights left{acc_text}, masks baked in) to {files['weights']}{others}")


# the verbs above, found by `torchslim` through the registry (ordered by `order` in --help)
_register_entry("cli_verb", "prune", register, family="prune", order=10, verbs=("prune", "sparsify", "lottery"))
