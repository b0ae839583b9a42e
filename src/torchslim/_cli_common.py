"""What every CLI verb that changes a model shares (DESIGN section 5).

A family's verb module (``torchslim/<family>/_cli.py``) defines ``register(subparsers)``; it
adds its parser with :func:`add_model_verb_args` and, in its handler, calls
:func:`run_model_verb` with a function that changes the model in place. This module then
profiles before and after, measures accuracy on ``--data``'s test split, saves the model to
``--out`` with ``ts.save``, and prints either tables or the common JSON object::

    {"model", "data", "before", "after", "accuracy_before", "accuracy_after", "files", ...extras}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["VerbContext", "add_model_verb_args", "run_model_verb", "emit_json", "console_for"]


@dataclass
class VerbContext:
    """What a verb's ``apply`` function gets besides the model."""

    args: argparse.Namespace
    data: Any  # DataBundle or None
    example_inputs: Any
    out: Path
    console: Any
    files: dict[str, str] = field(default_factory=dict)  # add files the verb writes (name -> path)
    staging: Path | None = None  # write extra files here: they are moved into ``out`` after ts.save


def add_model_verb_args(p: argparse.ArgumentParser, *, data_required: bool = False) -> None:
    """MODEL, --data, --out, --json, --input-shape, --seed, --no-latency, --no-progress."""
    p.add_argument("model", metavar="MODEL", help="model spec: torchvision:NAME, timm:NAME, zoo:NAME, file.py:factory, or a saved dir")
    p.add_argument("--data", required=data_required, help="data spec (mnist, digits, mnist1d, images, synthetic:SHAPE, file.py:factory)")
    p.add_argument("--out", required=True, help="directory for the resulting model (written by ts.save)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement in the before/after profiles")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def console_for(args: argparse.Namespace) -> Any:
    from rich.console import Console

    return Console(stderr=bool(getattr(args, "json", False)))


def emit_json(payload: dict[str, Any]) -> None:
    def default(x: Any) -> Any:
        if hasattr(x, "to_dict"):
            return x.to_dict()
        return str(x)

    sys.stdout.write(json.dumps(payload, default=default) + "\n")
    sys.stdout.flush()


def _accuracy(model: nn.Module, data: Any) -> float | None:
    if data is None or not data.labeled:
        return None
    from torchslim.train import evaluate

    return evaluate(model, data.loader("test", batch_size=256))["accuracy"]


def run_model_verb(
    args: argparse.Namespace,
    verb: str,
    apply: Callable[[nn.Module, VerbContext], dict[str, Any] | None],
    *,
    load_data: bool = True,
) -> int:
    """Build MODEL, profile it, ``apply`` the change, profile again, save, report.

    ``apply(model, ctx)`` changes ``model`` in place (and may fine-tune it on ``ctx.data``);
    it returns the verb's own JSON extras (or None) and may add entries to ``ctx.files``.
    ``load_data=False``: ``--data`` is not a data-set spec the verb reads itself (``ctx.data``
    is None, no accuracy is reported).
    """
    import torchslim as ts
    from torchslim.zoo.spec import parse_input_shape

    data = ts.load_data(args.data, seed=args.seed) if args.data and load_data else None
    model = ts.create_model(args.model, data=data)
    if args.input_shape:
        ts.set_example_inputs(model, parse_input_shape(args.input_shape))
    inputs = ts.example_inputs(model)
    latency = not args.no_latency
    before = ts.profile(model, inputs, latency=latency)
    acc_before = _accuracy(model, data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.extra-", dir=out.parent))
    try:
        ctx = VerbContext(args=args, data=data, example_inputs=inputs, out=out, console=console_for(args), staging=staging)
        extras = apply(model, ctx) or {}
        model.to("cpu").eval()
        after = ts.profile(model, ts.example_inputs(model), latency=latency)
        acc_after = _accuracy(model, data)
        ts.save(model, ctx.out)
        files = {"model": str(ctx.out), "plan": str(ctx.out / "plan.json"), "weights": str(ctx.out / "model.safetensors")}
        for name, path in ctx.files.items():  # extra files written to the staging dir move into --out
            p = Path(path)
            if p.is_relative_to(staging):
                dest = ctx.out / p.relative_to(staging)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, dest)
                path = str(dest)
            files[name] = path
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    payload: dict[str, Any] = {
        "verb": verb,
        "model": args.model,
        "data": args.data,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "files": files,
        **extras,
    }
    if args.json:
        emit_json(payload)
        return 0
    con = ctx.console
    con.print(ts.compare(before, after).table())
    if acc_before is not None:
        con.print(f"test accuracy: {100 * acc_before:.2f}% -> {100 * acc_after:.2f}%")
    con.print(f"saved to {ctx.out}")
    return 0
