"""CLI verb ``distill``: train a student against a frozen teacher.

``torchslim distill STUDENT --teacher MODEL --data SPEC --epochs N [--loss kd|hint|at|tinybert]
[--temperature T --alpha A] --out DIR [--json]``

The JSON is the common shape (``before`` / ``after`` are the student's profiles) plus
``teacher``, ``teacher_accuracy`` and ``distill`` (config and training history).
"""

from __future__ import annotations

import argparse
from typing import Any

from torchslim._registry import register as _register_entry

__all__ = ["register"]

_LOSSES = ("kd", "hint", "at", "tinybert")


def register(sub: Any) -> None:
    """Add the ``distill`` verb to the ``torchslim`` parser."""
    from torchslim._cli_common import add_model_verb_args
    from torchslim.distill import DistillConfig
    from torchslim.train import TrainConfig

    # flag defaults are the configs' (the one place defaults live)
    dd = DistillConfig.defaults()
    td = TrainConfig.defaults()

    p = sub.add_parser("distill", help="train a student model against a teacher (knowledge distillation)")
    add_model_verb_args(p, data_required=True)
    p.add_argument("--teacher", required=True, help="teacher model spec (e.g. a directory written by ts.save)")
    p.add_argument("--epochs", type=int, required=True, help="training epochs")
    p.add_argument("--loss", default=dd["loss"], help=f"one of {', '.join(_LOSSES)} (default kd)")
    p.add_argument("--temperature", type=float, default=dd["temperature"], help="KD softmax temperature (default 4)")
    p.add_argument("--alpha", type=float, default=dd["alpha"], help="weight of the soft KD term in [0, 1] (default 0.9)")
    p.add_argument("--feature-weight", type=float, help="weight of the feature term (hint/at/tinybert)")
    p.add_argument("--taps", help="comma-separated student modules to tap (default: automatic)")
    p.add_argument("--teacher-taps", help="comma-separated teacher modules to tap (default: automatic)")
    p.add_argument("--cache-teacher", action="store_true", help="run the teacher once and train on its cached outputs")
    p.add_argument("--lr", type=float, default=td["lr"])
    p.add_argument("--optimizer", default=td["optimizer"], help="sgd, adam or adamw (default sgd)")
    p.add_argument("--batch-size", type=int, default=td["batch_size"], help="global batch size (default 64)")
    p.add_argument("--max-steps", type=int, help="at most this many steps per epoch")
    p.add_argument("--device", default=td["device"], help="auto, cpu, cuda (default auto)")
    p.set_defaults(func=_cmd_distill)


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(s.strip() for s in text.split(",") if s.strip())


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~torchslim.distill.DistillConfig` the flags describe (``ConfigError`` when invalid)."""
    from torchslim.distill.api import DistillConfig
    from torchslim.errors import ConfigError
    from torchslim.train import TrainConfig

    if args.loss not in _LOSSES:
        raise ConfigError(f"--loss must be one of {', '.join(_LOSSES)}; got {args.loss!r}")
    train = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        max_steps_per_epoch=args.max_steps,
        device=args.device,
        seed=args.seed,
    )
    return DistillConfig(
        loss=args.loss,
        temperature=args.temperature,
        alpha=args.alpha,
        feature_weight=args.feature_weight,
        taps=_split(args.taps),
        teacher_taps=_split(args.teacher_taps),
        cache_teacher=args.cache_teacher,
        train=train,
    )


def _cmd_distill(args: argparse.Namespace) -> int:
    from torchslim._cli_common import run_model_verb

    config = config_from_args(args)  # check the flags before building anything

    def apply(model: Any, ctx: Any) -> dict[str, Any]:
        import torchslim as ts
        from torchslim.distill.api import distill

        teacher = ts.create_model(args.teacher, data=ctx.data, seed=args.seed)
        result = distill(model, teacher, ctx.data, config, progress=not (args.no_progress or args.json))
        if not args.json:
            acc = result.teacher_accuracy
            ctx.console.print(f"teacher {args.teacher}: test accuracy {'-' if acc is None else f'{100 * acc:.2f}%'}")
        return {
            "teacher": args.teacher,
            "teacher_accuracy": result.teacher_accuracy,
            "distill": {"config": config.to_dict(), "result": result.to_dict()},
        }

    return run_model_verb(args, "distill", apply)


# the verbs above, found by `torchslim` through the registry (ordered by `order` in --help)
_register_entry("cli_verb", "distill", register, family="distill", order=40, verbs=("distill",))
