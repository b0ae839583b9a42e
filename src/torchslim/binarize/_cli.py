"""CLI verb ``binarize``: make a model's layers binary, train it, save it bit-packed.

``torchslim binarize MODEL --method bnn|xnor|bireal|bwn --data SPEC --epochs N [--teacher MODEL]
--out DIR [--json]``

The JSON is the common shape (``after.size_bytes`` is the packed file) plus ``binarize`` (the
plan), ``packing`` (binary MACs and packed vs fp32 bytes of the binary layers, per layer) and
``train`` (epochs and history, with the teacher's accuracy when distilling).
"""

from __future__ import annotations

import argparse
from typing import Any

from torchslim._registry import register as _register_entry

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``binarize`` verb to the ``torchslim`` parser."""
    from torchslim._cli_common import add_model_verb_args
    from torchslim.binarize import BinarizeConfig
    from torchslim.distill import DistillConfig
    from torchslim.train import TrainConfig

    # flag defaults are the configs' (the one place defaults live)
    bd = BinarizeConfig.defaults()
    dd = DistillConfig.defaults()
    td = TrainConfig.defaults()

    p = sub.add_parser("binarize", help="binary networks (BNN, XNOR-Net, Bi-Real, BWN) saved bit-packed")
    add_model_verb_args(p)
    p.add_argument("--method", default=bd["method"], help="bnn, xnor, bireal or bwn (default xnor)")
    p.add_argument("--epochs", type=int, default=0, help="training epochs on --data after binarizing (default 0)")
    p.add_argument("--teacher", help="distill from this model (spec) while training; needs torchslim.distill")
    p.add_argument("--binarize-first", action="store_true", help="binarize the first layer too (kept fp32 by default)")
    p.add_argument("--binarize-last", action="store_true", help="binarize the last layer too (kept fp32 by default)")
    p.add_argument("--modules", help="comma-separated layer names/globs to binarize (default: all Linear/Conv2d)")
    p.add_argument("--skip", "--exclude", dest="exclude",
                   help="comma-separated layer names/globs/re: patterns to keep in full precision (--exclude: old name)")
    p.add_argument("--scale-activations", action="store_true", help="XNOR-Net activation scaling K (xnor only)")
    p.add_argument("--no-shortcut", action="store_true", help="bireal without its real-valued shortcuts")
    p.add_argument("--keep-relu", action="store_true", help="do not turn ReLU modules into Hardtanh")
    p.add_argument("--word-bits", type=int, default=bd["word_bits"], help="bits per stored word, 32 or 64 (default 32)")
    p.add_argument("--backend", default="float", help="inference path of the result: float, auto, c, torch or fastest (default float)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam", help="sgd, adam or adamw (default adam)")
    p.add_argument("--batch-size", type=int, default=td["batch_size"])
    p.add_argument("--max-steps", type=int, help="at most this many steps per epoch")
    p.add_argument("--temperature", type=float, default=dd["temperature"], help="KD temperature with --teacher (default 4)")
    p.add_argument("--alpha", type=float, default=dd["alpha"], help="weight of the KD term with --teacher (default 0.9)")
    p.add_argument("--device", default=td["device"], help="training device: auto, cpu, cuda (default auto)")
    p.set_defaults(func=_cmd_binarize)


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """BinarizeConfig and TrainConfig from the flags (``ConfigError`` when invalid)."""
    from torchslim.binarize.api import BinarizeConfig
    from torchslim.binarize.layers import INFERENCE_BACKENDS, METHODS
    from torchslim.errors import ConfigError
    from torchslim.train import TrainConfig

    if args.method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {args.method!r}")
    if args.backend not in INFERENCE_BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(INFERENCE_BACKENDS)}; got {args.backend!r}")
    if args.epochs < 0:
        raise ConfigError(f"--epochs must be >= 0; got {args.epochs}")
    if args.epochs and not args.data:
        raise ConfigError("--epochs needs --data to train on")
    if args.teacher and not args.epochs:
        raise ConfigError("--teacher is used while training: give --epochs N (N >= 1) and --data")
    cfg = BinarizeConfig(
        method=args.method,
        keep_first=not args.binarize_first,
        keep_last=not args.binarize_last,
        modules=_split(args.modules),
        skip=_split(args.exclude) or (),
        scale_activations=args.scale_activations,
        shortcut=False if args.no_shortcut else None,
        replace_relu=False if args.keep_relu else None,
        word_bits=args.word_bits,
    )
    train = TrainConfig(
        epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, batch_size=args.batch_size,
        max_steps_per_epoch=args.max_steps, device=args.device, seed=args.seed,
    )
    return cfg, train


def _cmd_binarize(args: argparse.Namespace) -> int:
    from torchslim._cli_common import run_model_verb

    cfg, train = _configs(args)  # check the flags before building anything
    if args.backend == "c":  # fail early when the C kernel cannot be built here
        import torch

        from torchslim.binarize.kernel import resolve_backend

        resolve_backend("c", torch.device("cpu"))

    def apply(model: Any, ctx: Any) -> dict[str, Any]:
        from torchslim.binarize._summary import summary
        from torchslim.binarize.api import binarize_, set_backend_

        if args.teacher:  # build the teacher first: a bad spec leaves the model untouched
            teacher = _teacher(args.teacher, ctx.data)
        plan = binarize_(model, cfg, example_inputs=ctx.example_inputs)
        extras: dict[str, Any] = {"binarize": plan.to_dict()}
        progress = not (args.no_progress or args.json)
        if args.epochs:
            if args.teacher:
                import importlib

                distill_api = importlib.import_module("torchslim.distill.api")
                dcfg = distill_api.DistillConfig(loss="kd", temperature=args.temperature, alpha=args.alpha, train=train)
                result = distill_api.distill(model, teacher, ctx.data, dcfg, progress=progress)
                extras["train"] = {"teacher": args.teacher, "teacher_accuracy": result.teacher_accuracy, **result.train.to_dict()}
            else:
                from torchslim.train import fit

                extras["train"] = {"teacher": None, **fit(model, ctx.data, train, progress=progress).to_dict()}
        model.to("cpu").eval()
        set_backend_(model, args.backend)
        s = summary(model, ctx.example_inputs, latency=False)
        extras["packing"] = s.to_dict()
        if not args.json:
            ctx.console.print(s.table())
        return extras

    return run_model_verb(args, "binarize", apply)


def _teacher(spec: str, data: Any, seed: int | None = None) -> Any:
    import importlib

    from torchslim.errors import ConfigError

    try:
        importlib.import_module("torchslim.distill.api")
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--teacher needs the distill family (torchslim.distill), which is not installed: {exc}") from exc
    if data is None:
        raise ConfigError("--teacher needs --data")
    import torchslim as ts

    return ts.create_model(spec, data=data, seed=seed)


# the verbs above, found by `torchslim` through the registry (ordered by `order` in --help)
_register_entry("cli_verb", "binarize", register, family="binarize", order=30, verbs=("binarize",))
