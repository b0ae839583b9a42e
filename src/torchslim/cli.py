"""The ``torchslim`` command line: parse, build configs, call the same verbs as the Python API.

Every verb prints a readable table (or, with ``--json``, one JSON object on stdout and nothing
else there); ``--out DIR`` holds the resulting model written by ``ts.save``. Bad input exits with
code 2 and one line naming what was wrong and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from torchslim._registry import register as _register_entry

__all__ = ["main"]

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(EXIT_BAD_INPUT, f"torchslim: error: {message} (see `{self.prog} --help`)\n")


def _console(args: argparse.Namespace) -> Any:
    from rich.console import Console

    # with --json, stdout carries only the JSON object; anything readable goes to stderr
    return Console(stderr=bool(getattr(args, "json", False)))


def _emit(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    if args.json:
        sys.stdout.write(json.dumps(payload, default=_json_default) + "\n")
        sys.stdout.flush()


def _json_default(x: Any) -> Any:
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _device(name: str) -> Any:
    import torch

    from torchslim.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; allowed here: auto, cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from exc


def _build(args: argparse.Namespace, data: Any = None) -> tuple[Any, Any]:
    """Model and example inputs from MODEL, --data, --seed and --input-shape (checked)."""
    import torchslim as ts
    from torchslim._cli_common import build_model

    model = build_model(args, data)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return model, ts.example_inputs(model, batch_size=getattr(args, "batch_size", None))


# ---- verbs ----------------------------------------------------------------------------------
def cmd_profile(args: argparse.Namespace) -> int:
    import torchslim as ts

    model, inputs = _build(args)
    model.to(_device(args.device))
    prof = ts.profile(model, inputs, latency=not args.no_latency, runs=args.runs, warmup=args.warmup)
    if args.json:
        _emit(args, {"model": args.model, **prof.to_dict()})
    else:
        con = _console(args)
        con.print(f"[bold]{args.model}[/bold]: {prof.summary()}")
        con.print(prof.table(max_layers=args.max_layers))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torchslim as ts

    data = ts.load_data(args.data, seed=args.seed)
    model, _ = _build(args, data=data)
    config = ts.TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        optimizer=args.optimizer,
        batch_size=args.batch_size_train,
        seed=args.seed,
        device=args.device,
        max_steps_per_epoch=args.max_steps,
    )
    from torchslim._cli_common import resume_target, writing

    out = Path(args.out)
    ckpt = resume_target(args)
    if args.force and ckpt is not None and ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)  # --force: start over (the checked contract allows it)
    result = ts.fit(model, data, config, checkpoint_dir=ckpt, resume=args.resume, progress=not args.no_progress)
    model.to("cpu")
    with writing(out) as tmp:
        ts.save(model, tmp)
    files = {"model": str(out), "plan": str(out / "plan.json"), "weights": str(out / "model.safetensors"),
             "checkpoint": str(ckpt / "last.pt")}
    payload = {
        "model": args.model,
        "data": args.data,
        "accuracy": result.test_accuracy,
        "best_val_accuracy": result.best_val_accuracy,
        "epochs": result.epochs_run,
        "history": result.history,
        "config": config.to_dict(),
        "files": files,
    }
    if args.json:
        _emit(args, payload)
    else:
        con = _console(args)
        acc = "-" if result.test_accuracy is None else f"{100 * result.test_accuracy:.2f}%"
        con.print(f"[bold]{args.model}[/bold] trained on {args.data} for {result.epochs_run} epochs: test accuracy {acc}")
        con.print(f"saved to {out}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import torchslim as ts
    from torchslim.zoo.models import zoo_entry

    models = ts.list_models(args.pattern)
    datasets = ts.list_datasets()
    if args.json:
        _emit(args, {"models": ["zoo:" + m for m in models], "datasets": datasets, "recipes": ts.list_recipes()})
        return 0
    from rich.table import Table

    t = Table(title="zoo models (zoo:NAME)")
    for col in ("name", "default input", "classes", "description"):
        t.add_column(col)
    for m in models:
        e = zoo_entry(m)
        t.add_row(m, "x".join(map(str, e.default_input_shape)), str(e.default_num_classes), e.description)
    con = _console(args)
    con.print(t)
    con.print("data specs: " + ", ".join(datasets))
    from torchslim._registry import entries

    for e in entries("dataset"):  # text corpora: say which texts calibrate and which evaluate
        if e.meta.get("text"):
            con.print(f"  {e.name}: {e.description}")
    con.print("recipes (torchslim compress --recipe NAME): " + ", ".join(ts.list_recipes()))
    con.print("model specs: torchvision:NAME, timm:NAME, zoo:NAME, path/to/file.py:factory, or a saved directory")
    return 0


def _demo_cache() -> Path:
    root = os.environ.get("TORCHSLIM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                             os.path.expanduser("~/.cache"), "torchslim")
    return Path(root) / "demo"


def cmd_demo(args: argparse.Namespace) -> int:
    """The built-in default job: ``torchslim compress`` with recipe ``default`` on a zoo CNN trained on
    the real MNIST subset (the dense model is trained once and cached). The run reports every
    deploy target of the recipe (``default``: ONNX Runtime, ExecuTorch/XNNPACK, eager PyTorch)
    whose runtime is installed, and names the ones left out."""
    import torchslim as ts
    from torchslim.recipe import compress, without_missing_targets
    from torchslim.recipe._cli import print_summary

    con = _console(args)
    say = (lambda msg: None) if args.quiet else (lambda msg: con.print(msg, highlight=False))
    recipe, dropped = without_missing_targets(args.recipe)  # every deploy target this install can measure
    if dropped:
        say(f"not measured here (runtime not installed): {', '.join(dropped)}; pip install \"torchslim[all]\" adds them")
    data = ts.load_data("mnist", seed=args.seed)
    cached = _demo_cache() / f"{args.model.replace(':', '-')}-mnist-e{args.epochs}-s{args.seed}"
    if (cached / "plan.json").is_file():
        say(f"dense {args.model} trained on mnist: cached in {cached}")
        model = ts.load(cached)
    else:
        say(f"training the dense {args.model} on mnist ({len(data.train)} train / {len(data.val)} val / "
            f"{len(data.test)} test real digits); cached in {cached} for the next run")
        model = ts.create_model(args.model, data=data, seed=args.seed)
        ts.fit(model, data, ts.TrainConfig(epochs=args.epochs, lr=0.02, optimizer="sgd", batch_size=64, seed=args.seed),
               progress=not args.quiet)
        model.to("cpu")
        ts.save(model, cached)
    out = Path(args.out)
    resume = (out / "state.json").is_file() and not (args.fresh or args.force)
    if resume:
        import json

        try:
            previous = json.loads((out / "state.json").read_text()).get("recipe")
        except (OSError, ValueError):
            previous = None
        if previous != recipe.to_dict():  # another recipe, or this version resolves it differently
            say(f"{out} holds a run of another recipe (or an older torchslim's defaults): starting it over")
            resume = False
    result = compress(model, recipe, data, out=out, resume=resume, force=not resume, progress=not args.quiet,
                      log=say, status=lambda text: con.status(text, spinner="dots"))
    if args.json:
        _emit(args, result.report)
        return 0
    print_summary(result.report, con)
    return 0


# ---- parser ---------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    if model:
        p.add_argument("model", metavar="MODEL", help="model spec: torchvision:NAME, timm:NAME, zoo:NAME, file.py:factory, or a saved dir")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")


def _register_verbs(sub: Any) -> None:
    """Every ``cli_verb`` of the registry, in ``order``: the verbs below and each family's ``_cli``."""
    from torchslim._registry import entries

    for entry in sorted(entries("cli_verb"), key=lambda e: (e.meta.get("order", 100), e.name)):
        entry.obj(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="torchslim", description="Deep-model compression for PyTorch.")
    from torchslim import __version__

    parser.add_argument("--version", action="version", version=f"torchslim {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    _register_verbs(sub)
    from torchslim._cli_common import apply_flag_rules

    apply_flag_rules(parser)  # one range per numeric flag name, in every verb
    return parser


def _register_core(sub: Any) -> None:
    """The verbs of the core: profile, train, list, demo."""
    from torchslim._cli_common import Number, add_out_args

    p = sub.add_parser("profile", help="params, MACs, FLOPs, bytes, memory and latency of a model")
    _common(p)
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (several: separate with ';')")
    p.add_argument("--batch-size", type=int, help="repeat the example inputs to this batch size")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the latency runs")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--runs", type=int, help="timed runs (default: as many as fit in ~1 s, 5..200)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")
    p.add_argument("--max-layers", type=int, default=40, help="rows of the per-layer table (default 40)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("train", help="train or fine-tune a model on a data spec and save it")
    _common(p)
    p.add_argument("--data", required=True, help="data spec: mnist, digits, mnist1d, images, synthetic:SHAPE, file.py:factory")
    p.add_argument("--epochs", type=Number(int, 1), default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam", help="sgd, adam or adamw (default adam)")
    p.add_argument("--batch-size", dest="batch_size_train", type=int, default=64)
    p.add_argument("--max-steps", type=int, help="at most this many steps per epoch (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    add_out_args(p, help="folder for the trained model (written by ts.save; checkpoints go to OUT.checkpoint)",
                 resume="continue the run killed earlier from OUT.checkpoint/last.pt")
    p.set_defaults(func=cmd_train, input_shape=None, resume_beside=".checkpoint")

    p = sub.add_parser("list", help="zoo models and data specs")
    _common(p, model=False)
    p.add_argument("pattern", nargs="?", default=None, help="glob over zoo model names, e.g. 'resnet*'")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("demo", help="the built-in default job: compress a CNN trained on real MNIST digits (recipe default)")
    _common(p, model=False)
    p.add_argument("--model", default="zoo:conv2", help="zoo model to train and compress (default zoo:conv2)")
    p.add_argument("--recipe", default="default", help="recipe name or YAML file (default: default)")
    p.add_argument("--epochs", type=int, default=6, help="dense training epochs (default 6; cached)")
    p.add_argument("--seed", type=int, default=0)
    add_out_args(p, default=os.path.join("runs", "demo"),
                 help="folder of the run (default runs/demo); one holding an earlier demo run is continued")
    p.add_argument("--fresh", action="store_true", help="rerun every stage even if --out holds a finished run")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no stage lines")
    p.set_defaults(func=cmd_demo, out_continues="state.json")


_register_entry("cli_verb", "core", _register_core, family="core", order=0, verbs=("profile", "train", "list", "demo"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torchslim`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse refused the line (one line written) or printed --help/--version
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else EXIT_BAD_INPUT
    from torchslim.errors import TorchslimError

    try:
        from torchslim._cli_common import check_output

        check_output(args)  # the output contract, before any work
        return int(args.func(args) or 0)
    except TorchslimError as exc:
        msg = " ".join(str(exc).split())
        sys.stderr.write(f"torchslim: error: {msg}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("torchslim: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
