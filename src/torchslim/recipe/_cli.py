"""CLI verb ``torchslim compress``: run a recipe on a model, write the model, its files and the report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torchslim._registry import register as _register_entry
from torchslim.errors import TorchslimError

__all__ = ["register", "print_summary", "deployed_lines"]


def register(sub: Any) -> None:
    """Add ``compress`` to the ``torchslim`` parser."""
    from torchslim._cli_common import add_out_args

    p = sub.add_parser("compress", help="run a recipe (prune, distill, quantize, export, ...) and write a report")
    p.add_argument("model", metavar="MODEL", help="model spec: zoo:NAME, torchvision:NAME, timm:NAME, file.py:factory, or a saved dir")
    p.add_argument("--recipe", default="default", help="a built-in recipe name (see `torchslim list`) or a YAML file (default: default)")
    p.add_argument("--data", help="data spec (mnist, digits, mnist1d, images, synthetic:SHAPE, file.py:factory)")
    add_out_args(p, help="output folder (model, report, stage folders)",
                 resume="continue the run in --out from its last finished stage")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--no-latency", action="store_true", help="skip torch latency after each stage (ONNX timing still runs)")
    p.add_argument("--allow-slower", action="store_true",
                   help="a result slower than the original in a runtime it deploys to is no failed goal "
                        "(default: the recipe's allow_slower; otherwise the goal is MISSED and the stage that made it slower named)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no stage lines")
    p.add_argument("--json", action="store_true", help="print only the final JSON report on stdout")
    p.set_defaults(func=_cmd_compress)


def _cmd_compress(args: argparse.Namespace) -> int:
    import torchslim as ts
    from torchslim._cli_common import build_model, console_for, emit_json
    from torchslim.recipe import compress, load_recipe

    recipe = load_recipe(args.recipe)  # every recipe error before any work
    need = recipe.needs_data()
    con = console_for(args)
    say = (lambda msg: None) if args.quiet else (lambda msg: con.print(msg, highlight=False))
    if not args.data:
        from torchslim._cli_defaults import SENTENCES, SHAKESPEARE, default_data, describe_default
        from torchslim.recipe import RecipeError

        bundled = default_data(args.model)  # a model made for bundled data trains / calibrates on it
        if bundled == SHAKESPEARE:  # a decoder LLM: calibration and held-out perplexity read the plays
            args.data = bundled
            say(describe_default(args.model, bundled, "calibration / perplexity"))
        elif need:
            if bundled is None or bundled == SENTENCES:  # text stages calibrate on the sentences already; training needs a data set
                raise RecipeError(f"{recipe.source}: stages {', '.join(need)} need data: pass --data SPEC")
            args.data = bundled
            say(describe_default(args.model, bundled, "training / calibration"))
    data = ts.load_data(args.data, seed=recipe.seed) if args.data else None
    args.seed = recipe.seed
    model = build_model(args, data)  # a wrong --input-shape or --data is refused before --out is touched
    out = Path(args.out)
    fresh = not out.exists()
    try:
        result = compress(model, recipe, data, out=out,
                          resume=args.resume, force=args.force, progress=not args.quiet, latency=not args.no_latency,
                          log=say, status=lambda text: con.status(text, spinner="dots"),
                          allow_slower=True if args.allow_slower else None)
    except TorchslimError:
        if fresh and not _finished_stages(out):  # refused before any stage finished: leave nothing behind
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    if args.json:
        emit_json(result.report)
        return 0
    if not args.quiet:
        print_summary(result.report, con)
    return 0


def _finished_stages(out: Path) -> bool:
    """Whether a run in ``out`` finished at least one stage (then it is kept for --resume)."""
    import json

    try:
        state = json.loads((out / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(state, dict) and state.get("stages"))


def print_summary(report: dict[str, Any], con: Any) -> None:
    """What ships first (one line per deployed file, then the goals in the same units), then what
    each stage changed, then where everything was written."""
    from rich.table import Table

    from torchslim.report.html import goal_cells, guard_note, headline

    for line in deployed_lines(report) or headline(report):
        con.print(line, highlight=False)
    for g in report.get("goals", []):
        word, target, value, basis, met = goal_cells(g)
        mark = {"met": "[green]met[/green]", "MISSED": "[red]MISSED[/red]"}.get(met, f"[yellow]{met}[/yellow]")
        con.print(f"goal {word} {target}: {value} ({basis}) {mark}", highlight=False)
    if guard_note(report):
        con.print(str(guard_note(report)), highlight=False)
    ppl = any(s.get("perplexity") is not None for s in report["stages"])
    acc_col = any(s.get("accuracy") is not None for s in report["stages"]) or not ppl
    t = Table(title=f"{report['model']} · recipe {report['recipe']}: each stage (ratios to the original)")
    heads = ("stage", *(("accuracy",) if acc_col else ()), *(("perplexity",) if ppl else ()), "params", "MACs",
             "size on disk", "eager ms (1 thread)", "s")
    for h in heads:
        t.add_column(h, justify="left" if h == "stage" else "right")
    for s in report["stages"]:
        r = s["ratios"]
        acc = "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
        lat = "-" if s["latency_ms"] is None else f"{s['latency_ms']:.2f}"
        extra = (("-" if s.get("perplexity") is None else f"{s['perplexity']:.2f}"),) if ppl else ()
        t.add_row(s["label"], *((acc,) if acc_col else ()), *extra, f"{r['params']:.3f}x", f"{r['macs']:.3f}x", f"{r['size_bytes']:.3f}x", lat,
                  f"{s.get('seconds', 0.0):.0f}")
    con.print(t)
    files = report.get("files", {})
    shipped = [f"{k}: {files[k]}" for k in report.get("deployed", {}) if k in files]
    if shipped:
        con.print("shipped files: " + "; ".join(shipped), highlight=False)
    con.print(f"report: {files['report_html']} (also report.md, report.json); final model: {files.get('model')}",
              highlight=False)


_LABELS = {"onnx": "ONNX", "pte": "ExecuTorch .pte", "torch": "PyTorch (ts.save)", "torchscript": "TorchScript",
           "pt2": "torch.export .pt2", "gguf": "GGUF"}


def _bytes(n: float) -> str:
    from torchslim.report.html import _fmt_bytes

    return _fmt_bytes(n)


def deployed_lines(report: dict[str, Any]) -> list[str]:
    """One line per deploy target of the report: bytes, latency in its runtime and accuracy, vs the original."""
    from torchslim.report.html import decode_change, perplexity_change

    lines = []
    for target, fig in report.get("deployed", {}).items():
        if target == "tslim" or not fig.get("size_bytes"):
            continue
        runtime = fig.get("runtime", "ONNX Runtime")
        lat = ", ".join(f"batch {b}: {_speed(v['speedup'])}" for b, v in fig.get("latency_ms", {}).items())
        acc = ""
        if fig.get("accuracy") is not None:
            acc = f"; accuracy {100 * fig['original_accuracy']:.2f}% -> {100 * fig['accuracy']:.2f}%"
        acc += f"; {perplexity_change(fig)}" if perplexity_change(fig) else ""
        lat = decode_change(fig) or lat
        shipped = f" ({fig['format']})" if fig.get("format") not in (None, target) else ""
        lines.append(f"{_LABELS.get(target, target)}{shipped}: {fig['original_size_bytes'] / fig['size_bytes']:.2f}x smaller "
                     f"on disk ({_bytes(fig['original_size_bytes'])} -> {_bytes(fig['size_bytes'])}), "
                     + (f"{lat} in {runtime} (1 thread){acc}" if lat else f"not timed{' (llama.cpp is not run here)' if target == 'gguf' else ''}{acc}"))
    return lines


def _speed(ratio: float | None) -> str:
    """``original / compressed`` latency as words: "2.10x faster" or "1.60x slower"."""
    if not ratio:
        return "-"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


# the verbs above, found by `torchslim` through the registry (ordered by `order` in --help)
_register_entry("cli_verb", "compress", register, family="recipe", order=90, verbs=("compress",))
