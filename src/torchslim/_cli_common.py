"""What every CLI verb shares (DESIGN section 5): arguments, the output contract, the runner.

**Arguments.** Every numeric flag of every verb has a declared range (:class:`Number`); a flag
without its own ``type=Number(...)`` gets the rule of :data:`FLAG_RULES` for its name when the
parser is built (:func:`apply_flag_rules`), so ``--epochs``, ``--lr`` or ``--threads`` mean and
check the same everywhere.

**Output contract** (:func:`add_out_args`, :func:`check_output`, :func:`writing`), checked by
``torchslim.cli.main`` before a verb does any work:

- an existing ``--out`` (file or folder) is refused unless ``--force`` (or ``--resume`` where the
  verb resumes); ``--resume`` with nothing to resume is refused;
- ``--out`` may never be an input (the model, ``--teacher``, the recipe...), lie inside one, or
  contain one;
- the nearest existing folder above ``--out`` must be a writable folder;
- the result is built under a hidden name beside ``--out`` and published by one atomic replace
  (:func:`torchslim._fs.replace_path`); on failure the hidden copy and any parent folders this
  run created are removed, so an exit-2 path leaves nothing behind.

**Third-party output**: :mod:`torchslim._cli_output` (around every verb in ``torchslim.cli.main``).

**Runner.** A family's verb module (``torchslim/<family>/_cli.py``) defines
``register(subparsers)``; it adds its parser with :func:`add_model_verb_args` and, in its
handler, calls :func:`run_model_verb` with a function that changes the model in place. This
module then profiles before and after, measures accuracy on ``--data``'s test split, saves the
model to ``--out`` with ``ts.save``, and prints either tables or the common JSON object::

    {"model", "data", "before", "after", "accuracy_before", "accuracy_after", "files", ...extras}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "DATA_HELP",
    "FLAG_RULES",
    "MODEL_HELP",
    "Number",
    "VerbContext",
    "add_model_verb_args",
    "add_out_args",
    "apply_flag_rules",
    "build_model",
    "check_output",
    "console_for",
    "data_help",
    "emit_json",
    "finetune_config",
    "run_model_verb",
    "untrained_note",
    "writing",
    "writing_beside",
]


# ---- arguments ------------------------------------------------------------------------------------
#: The MODEL help of every verb (``torchslim list`` shows every member of each family).
MODEL_HELP = ("model spec: zoo:NAME, pretrained:NAME (minilm, smollm2-135m, gemma3-270m, mnist_cnn, ...), "
              "torchvision:NAME, timm:NAME, path/to/model.py:factory, or a folder written by ts.save "
              "(`torchslim list` shows them all)")

#: The data spec families every ``--data`` help names.
DATA_HELP = ("data spec: mnist, digits, mnist1d, images[:SIZE], synthetic:SHAPE, shakespeare, text:PATH, "
             "sentences[:N] (text encoders), path/to/data.py:factory (`torchslim list` describes them)")


def data_help(text: str | None) -> str:
    """A verb's ``--data`` help with the shared list of spec families (:data:`DATA_HELP`).

    The verb's own words stay in front (what it does with the data); an older list of specs in
    parentheses is replaced.

    Example:
        >>> data_help("calibration data (mnist, digits)").startswith("calibration data; data spec: mnist")
        True
    """
    import re

    if text and DATA_HELP in text:
        return text
    own = re.sub(r"\s*\((?:mnist|shakespeare|data spec)[^)]*\)", "", text or "").strip().rstrip(";:,. ")
    if not own or own.lower() in ("data spec", "data", "labeled data spec"):
        return DATA_HELP if not own.lower().startswith("labeled") else "labeled " + DATA_HELP
    return f"{own}; {DATA_HELP}"


class Number:
    """An argparse ``type`` for a number in a range: ``Number(int, 1)`` is an integer >= 1.

    ``lo_open`` / ``hi_open`` exclude the bound. The range is data, so tests can generate values
    outside it (:meth:`invalid_examples`).

    Example:
        >>> Number(float, 0, 1, lo_open=True)("0.5")
        0.5
        >>> Number(int, 1).describe()
        'an integer >= 1'
    """

    def __init__(self, kind: type = int, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> None:
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"{what} in {left}{self.lo:g}, {self.hi:g}{right}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {self.hi:g}"
        return what

    def _ok(self, v: float) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}; got {text!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not self._ok(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}; got {text!r}")
        return value

    def invalid_examples(self) -> list[str]:
        """Strings this type refuses: not a number, out of range on each side, fractional ints."""
        bad = ["abc", "nan" if self.kind is float else "1.5"]
        if self.lo is not None:
            bad.append(f"{self.lo:g}" if self.lo_open else f"{self.lo - (1 if self.kind is int else 0.5):g}")
        if self.hi is not None:
            bad.append(f"{self.hi:g}" if self.hi_open else f"{self.hi + (1 if self.kind is int else 0.5):g}")
        return bad

    def __repr__(self) -> str:
        return f"Number({self.describe()})"


def _int(lo: int | None = None, hi: int | None = None) -> Number:
    return Number(int, lo, hi)


def _frac(*, lo_open: bool = False, hi_open: bool = False) -> Number:
    return Number(float, 0.0, 1.0, lo_open=lo_open, hi_open=hi_open)


_POSITIVE = Number(float, 0.0, lo_open=True)

#: The one rule per numeric flag name (argparse ``dest``); a verb may pass its own ``Number``.
FLAG_RULES: dict[str, Number] = {
    # counts
    "epochs": _int(0), "finetune_epochs": _int(0), "final_epochs": _int(0), "max_steps": _int(1),
    "finetune_steps": _int(0), "batch": _int(1), "batch_size": _int(1), "batch_size_train": _int(1), "threads": _int(1),
    "runs": _int(1), "warmup": _int(0), "max_layers": _int(1), "calibration_batches": _int(1),
    "random_inputs": _int(0), "max_iter": _int(1), "rounds": _int(1), "seeds": _int(1),
    "rewind_iter": _int(0), "eval_every": _int(1), "trials": _int(1), "startup_trials": _int(0),
    "heartbeat": _int(1), "round_to": _int(1), "min_channels": _int(1), "group_size": _int(1),
    "seed": _int(0, 2**32 - 1),
    # widths
    "bits": _int(1, 16), "act_bits": _int(2, 16), "word_bits": _int(8, 64), "opset": _int(7, 99),
    # fractions
    "ratio": _frac(hi_open=True), "sparsity": _frac(), "rate": _frac(lo_open=True, hi_open=True),
    "output_rate": _frac(lo_open=True, hi_open=True), "energy": _frac(lo_open=True),
    "target_macs": _frac(lo_open=True), "target_params": _frac(lo_open=True),
    "target_latency": _frac(lo_open=True), "max_ratio": _frac(lo_open=True, hi_open=True),
    "step": _frac(lo_open=True, hi_open=True), "alpha": _frac(), "smoothquant": _frac(),
    # positive reals
    "lr": _POSITIVE, "temperature": _POSITIVE, "tolerance": _POSITIVE,
    "feature_weight": Number(float, 0.0), "smoothquant_min_gain": Number(float, 0.0),
    "max_perplexity_increase": Number(float, 0.0, 10.0, lo_open=True), "heal_minutes": Number(float, 0.0),
}


def apply_flag_rules(parser: argparse.ArgumentParser) -> None:
    """Give every plain ``int`` / ``float`` flag of ``parser`` and its sub-parsers its rule."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                apply_flag_rules(sub)
        elif action.type in (int, float) and action.dest in FLAG_RULES:
            rule = FLAG_RULES[action.dest]
            action.type = rule if rule.kind is action.type else Number(action.type, rule.lo, rule.hi,
                                                                       lo_open=rule.lo_open, hi_open=rule.hi_open)


# ---- the output contract --------------------------------------------------------------------------
def add_out_args(p: argparse.ArgumentParser, *, kind: str = "dir", help: str | None = None,
                 required: bool = True, default: str | None = None, resume: str | None = None) -> None:
    """``--out`` and ``--force`` (and ``--resume`` with its help text when the verb resumes).

    ``kind``: ``"dir"`` (a folder), ``"file"`` or ``"any"`` (decided by the verb, e.g. export).
    """
    text = help or {"dir": "folder for the result (written by ts.save)", "file": "the file to write",
                    "any": "the file or folder to write"}[kind]
    p.add_argument("--out", required=required and default is None, default=default,
                   help=f"{text}; an existing one is refused unless --force" + (" or --resume" if resume else ""))
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (atomically: the old copy stays until the new one is complete)")
    if resume:
        p.add_argument("--resume", action="store_true", help=resume)
    p.set_defaults(out_kind=kind, out_resumable=bool(resume))


#: argparse ``dest`` of the arguments that name inputs an ``--out`` must never touch
_INPUT_DESTS = ("model", "file", "teacher", "recipe", "data")


def _input_paths(args: argparse.Namespace) -> list[tuple[str, Path]]:
    found = []
    for dest in _INPUT_DESTS:
        value = getattr(args, dest, None)
        if not isinstance(value, str) or not value:
            continue
        candidates = [value]
        if ":" in value:  # file.py:factory
            candidates.append(value.rsplit(":", 1)[0])
        for c in candidates:
            if os.path.exists(c):
                found.append((dest, Path(c).resolve()))
                break
    return found


def resume_target(args: argparse.Namespace) -> Path | None:
    """What ``--resume`` continues from when a verb keeps it beside ``--out``: ``OUT<resume_beside>``.

    ``train`` sets ``resume_beside=".checkpoint"`` (its checkpoints outlive a killed run).
    """
    suffix = getattr(args, "resume_beside", None)
    if not suffix:
        return None
    out = Path(args.out)
    return out.with_name(out.name + suffix)


def check_output(args: argparse.Namespace) -> None:
    """The output contract (module doc), before any work; raises ``ConfigError`` (exit 2)."""
    from torchslim.errors import ConfigError

    out_arg = getattr(args, "out", None)
    if out_arg is None or not hasattr(args, "out_kind"):
        return
    out = Path(out_arg)
    force, resume = bool(getattr(args, "force", False)), bool(getattr(args, "resume", False))
    if force and resume:
        raise ConfigError("--resume and --force contradict each other: --resume continues --out, --force replaces it")
    if not str(out_arg).strip():
        raise ConfigError("--out is empty; give a path for the result")
    target = out.resolve()
    for dest, path in _input_paths(args):
        flag = "MODEL" if dest == "model" else ("FILE" if dest == "file" else f"--{dest}")
        if target == path:
            raise ConfigError(f"--out {out} is the input {flag} itself; write the result to another path")
        if path in target.parents:
            raise ConfigError(f"--out {out} lies inside the input {flag} {path}; write the result elsewhere")
        if target in path.parents:
            raise ConfigError(f"--out {out} contains the input {flag} {path}; replacing it would delete the input")
    kind = args.out_kind
    exists = out.exists() or out.is_symlink()
    continues = getattr(args, "out_continues", None)  # demo: a folder holding its own earlier run goes on
    if continues and exists and (out / continues).is_file():
        force = True
    if exists and kind == "dir" and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; this verb writes a folder there")
    if exists and kind == "file" and out.is_dir():
        raise ConfigError(f"--out {out} is a folder; this verb writes one file, e.g. --out {out / 'model.tslim'}")
    extra = resume_target(args)
    if resume:
        if not (exists or (extra is not None and extra.exists())):
            raise ConfigError(f"--resume: nothing to resume, {out} does not exist")
    elif exists and not force:
        hint = " or --resume to continue it" if args.out_resumable else ""
        raise ConfigError(f"--out {out} already exists; pass --force to replace it{hint}")
    elif extra is not None and extra.exists() and not force:
        raise ConfigError(f"{extra} holds an unfinished earlier run; pass --resume to continue it or --force to start over")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write --out {out}: {parent} is a file, not a folder")
    try:  # a real probe: os.access says yes to root on read-only or immutable folders
        fd, probe = tempfile.mkstemp(prefix=".torchslim-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write --out {out}: cannot create files in {parent} ({exc.strerror or exc})") from None


def _missing_parents(path: Path) -> list[Path]:
    missing, p = [], path.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    return missing


@contextlib.contextmanager
def writing(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Build the result under a hidden name beside ``out``; publish it onto ``out`` on success.

    The yielded path does not exist yet (the block creates a file or a folder there). On any
    failure the hidden copy and the parent folders this call created are removed; ``out`` is
    left as it was.
    """
    from torchslim._fs import remove_path, replace_path, staging_name

    final = Path(out)
    created = _missing_parents(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(final)
    try:
        yield tmp
        replace_path(tmp, final)
    except BaseException:
        remove_path(tmp)
        for d in created:  # deepest first; only folders still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


@contextlib.contextmanager
def writing_beside(out: str | os.PathLike[str]) -> Iterator[Path]:
    """For one file that may come with sidecars (ONNX external data): build them in a hidden folder.

    Yields that folder; on success each file in it is published beside ``out`` under its own
    name (``out``'s own name last), on failure nothing is, and the folder always goes.
    """
    from torchslim._fs import remove_path, replace_path, staging_name

    final = Path(out)
    created = _missing_parents(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(final)
    tmp.mkdir()
    try:
        yield tmp
        for f in sorted(tmp.iterdir(), key=lambda q: q.name == final.name):
            replace_path(f, final.parent / f.name)
    except BaseException:
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    finally:
        remove_path(tmp)


def finetune_config(args: argparse.Namespace, epochs: int, **fixed: Any) -> Any:
    """The fine-tuning ``TrainConfig`` of the common flags (--lr, --optimizer, --batch-size,
    --max-steps, --device, --seed), or None when ``epochs`` is 0.

    It is built (so every flag is checked) even when there is nothing to fine-tune: a wrong
    ``--optimizer`` is refused, never silently ignored.
    """
    from torchslim.train import TrainConfig

    flags = {"lr": "lr", "optimizer": "optimizer", "batch_size": "batch_size", "max_steps_per_epoch": "max_steps",
             "device": "device", "seed": "seed"}
    values = {field: getattr(args, dest) for field, dest in flags.items() if getattr(args, dest, None) is not None}
    cfg = TrainConfig(epochs=max(1, epochs), **{**values, **fixed})
    return cfg if epochs else None


def build_model(args: argparse.Namespace, data: Any = None, *, spec: str | None = None) -> nn.Module:
    """MODEL (or ``spec``) built with ``--seed`` and ``--input-shape``, checked against ``data``.

    With ``--input-shape`` the model is run once on it, and with labeled data once on a batch:
    a shape it cannot take is an ``InputShapeError`` naming the shape it expects.
    """
    import torchslim as ts
    from torchslim.graph.inputs import as_inputs, remembered_inputs
    from torchslim.zoo.spec import parse_input_shape

    model = ts.create_model(spec or args.model, data=data, seed=getattr(args, "seed", None))
    expected = remembered_inputs(model).describe()
    shape = getattr(args, "input_shape", None)
    if shape:
        ts.set_example_inputs(model, _like_remembered(parse_input_shape(shape), remembered_inputs(model)))
        _probe(model, remembered_inputs(model), f"--input-shape {shape}", expected)
    if data is not None and getattr(data, "labeled", False) and spec is None:

        x, _ = next(iter(data.loader("test", batch_size=2)))
        _probe(model, as_inputs(x), f"--data {args.data} (inputs {tuple(x.shape)})", expected)
    return model


def _like_remembered(parsed: Any, remembered: Any) -> Any:
    """A model whose example is a list of tensors (a detector's images) takes ``--input-shape
    N,C,H,W`` as a list of ``N`` images of ``(C, H, W)``."""
    import torch

    from torchslim.graph.inputs import Inputs

    first = remembered.args[0] if len(remembered.args) == 1 and not remembered.kwargs else None
    if (type(first) is list and first and isinstance(first[0], torch.Tensor) and len(parsed.args) == 1
            and parsed.args[0].dim() == first[0].dim() + 1):
        return Inputs((list(parsed.args[0].unbind(0)),))
    return parsed


def _probe(model: nn.Module, inputs: Any, what: str, expected: str) -> None:
    import torch

    from torchslim._utils import evaluating, model_device
    from torchslim.errors import InputShapeError, TorchslimError
    from torchslim.graph.inputs import call_model

    try:
        with torch.no_grad(), evaluating(model):
            call_model(model, inputs.to(model_device(model)))
    except TorchslimError as exc:
        cause = exc.__cause__ or exc
        detail = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
        raise InputShapeError(f"{what} does not fit the model, which expects inputs like {expected} ({detail})") from None


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
    notes: list[str] = field(default_factory=list)  # what changed, in words: printed under the table


def add_model_verb_args(p: argparse.ArgumentParser, *, data_required: bool = False) -> None:
    """MODEL, --data, --out, --json, --input-shape, --seed, --no-latency, --no-progress."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--data", required=data_required, help=DATA_HELP)
    add_out_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initial weights and the data split")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement in the before/after profiles")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def console_for(args: argparse.Namespace) -> Any:
    """The verb's rich console: stdout, or stderr with ``--json``; a file or pipe gets the plain
    text width of :mod:`torchslim._text` (120 columns) instead of rich's 80."""
    from rich.console import Console

    err = bool(getattr(args, "json", False))
    stream = sys.stderr if err else sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError, OSError):
        tty = False
    if tty:
        return Console(stderr=err)
    from torchslim._text import DEFAULT_WIDTH

    return Console(stderr=err, width=DEFAULT_WIDTH)


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

    data = ts.load_data(args.data, seed=args.seed) if args.data and load_data else None
    model = build_model(args, data)
    inputs = ts.example_inputs(model)
    latency = not args.no_latency
    before = ts.profile(model, inputs, latency=latency)
    acc_before = _accuracy(model, data)
    # said with the result (a refused call keeps its one error line)
    warning = untrained_note(args.model, args.data if data is not None else None, acc_before,
                             getattr(data, "num_classes", None))
    out = Path(args.out)
    staging = Path(tempfile.mkdtemp(prefix="torchslim-extra-"))  # outside the user's folders
    try:
        ctx = VerbContext(args=args, data=data, example_inputs=inputs, out=out, console=console_for(args), staging=staging)
        extras = apply(model, ctx) or {}
        model.to("cpu").eval()
        after = ts.profile(model, ts.example_inputs(model), latency=latency)
        acc_after = _accuracy(model, data)
        files = {"model": str(out), "plan": str(out / "plan.json"), "weights": str(out / "model.safetensors")}
        with writing(out) as tmp:
            ts.save(model, tmp)
            for name, path in ctx.files.items():  # extra files written to the staging dir move into --out
                p = Path(path)
                if p.is_relative_to(staging):
                    dest = tmp / p.relative_to(staging)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(p), str(dest))
                    path = str(out / p.relative_to(staging))
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
        if warning:
            ctx.console.print(warning, highlight=False, soft_wrap=True)  # stderr: stdout holds the JSON only
        emit_json(payload)
        return 0
    con = ctx.console
    if warning:
        con.print(warning, highlight=False, soft_wrap=True)
    con.print(ts.compare(before, after).table())
    for line in ctx.notes:
        con.print(line, highlight=False, soft_wrap=True)
    if acc_before is not None:
        con.print(f"test accuracy: {100 * acc_before:.2f}% -> {100 * acc_after:.2f}%", highlight=False)
    con.print(f"saved to {out}", highlight=False)
    return 0


#: how close to chance a test accuracy must be to count as an untrained model (1.5x chance)
CHANCE_FACTOR = 1.5


def untrained_note(spec: str, data: str | None, accuracy: float | None, num_classes: int | None) -> str | None:
    """One warning line when the input model is untrained, else None.

    Untrained: a ``zoo:`` spec (built with random weights), or a test accuracy within
    :data:`CHANCE_FACTOR` times chance (``1 / num_classes``). The line says how to train it.

    Example:
        >>> untrained_note("zoo:lenet5", "digits", 0.107, 10)
        'note: zoo:lenet5 is untrained (accuracy 10.7% on digits, chance is 10%): train it first: torchslim train zoo:lenet5 --data digits --out runs/lenet5'
        >>> untrained_note("runs/lenet5", "mnist", 0.97, 10) is None
        True
    """
    zoo = spec.startswith("zoo:")
    chance = 1 / num_classes if num_classes else None
    at_chance = accuracy is not None and chance is not None and accuracy <= CHANCE_FACTOR * chance
    if not (zoo or at_chance):
        return None
    name = spec.split(":", 1)[1] if zoo else Path(spec.rstrip("/\\")).name or "model"
    out = f"runs/{name}" if zoo else f"runs/{name}-trained"
    command = f"torchslim train {spec} --data {data or 'SPEC'} --out {out}"
    if accuracy is not None and chance is not None:
        why = f"accuracy {100 * accuracy:.1f}% on {data}, chance is {100 * chance:.0f}%"
        state = "is untrained" if zoo else "scores at chance"
    else:
        why, state = "random weights", "is untrained"
    return f"note: {spec} {state} ({why}): train it first: {command}"
