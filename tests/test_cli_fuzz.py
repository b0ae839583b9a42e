"""Every verb, every flag, fed what a hostile but realistic user types: exit 2, one line, nothing lost.

The cases are generated from the parser itself (``torchslim.cli.build_parser``), so a new verb or
flag is fuzzed without editing this file:

- each numeric flag gets the values outside its declared range (``_cli_common.Number``), a
  non-number and (integers) a fraction; a numeric flag without a declared range fails the suite;
- each flag with ``choices`` and each free-text flag gets a value no verb accepts;
- each verb that writes ``--out`` gets: an existing folder holding a user's file, an existing file,
  the input model itself, a path inside the input, a path under a file, a folder nobody may write,
  ``--resume`` on nothing, ``--resume`` with ``--force``;
- each input gets damaged copies: a saved model folder with truncated or bit-flipped weights or a
  truncated ``plan.json``, a truncated or bit-flipped ``.tslim``, a recipe that is not text.

Every case must exit 2 with exactly one line on stderr (no traceback), create nothing, and leave
every input byte-identical. Each verb's valid base command is run once first (exit 0), so a refusal
below is the bad value's doing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from torchslim._cli_common import FLAG_RULES, Number
from torchslim.cli import build_parser, main

PARSER = build_parser()
VERBS: dict[str, argparse.ArgumentParser] = next(
    a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices

#: a valid command per verb (BASE: a saved LeNet-300-100 for `digits`; OUT: a fresh output path)
BASE_ARGV: dict[str, list[str]] = {
    "profile": ["BASE", "--no-latency"],
    "train": ["BASE", "--data", "digits", "--epochs", "1", "--max-steps", "2", "--no-progress", "--out", "OUT"],
    "prune": ["BASE", "--ratio", "0.5", "--no-latency", "--out", "OUT"],
    "sparsify": ["BASE", "--sparsity", "0.5", "--no-latency", "--out", "OUT"],
    "lottery": ["BASE", "--data", "digits", "--rounds", "1", "--epochs", "1", "--seeds", "1", "--eval-every", "20",
                "--no-progress", "--out", "OUT"],
    "quantize": ["BASE", "--mode", "dynamic", "--no-latency", "--out", "OUT"],
    "binarize": ["BASE", "--no-latency", "--out", "OUT"],
    "distill": ["BASE", "--teacher", "BASE", "--data", "digits", "--epochs", "1", "--max-steps", "2", "--no-latency",
                "--no-progress", "--out", "OUT"],
    "factorize": ["BASE", "--method", "svd", "--energy", "0.9", "--no-latency", "--out", "OUT"],
    "pack": ["BASE", "--bits", "4", "--no-latency", "--out", "OUT.tslim"],
    "unpack": ["TSLIM", "--out", "OUT"],
    "export": ["BASE", "--out", "OUT.onnx"],
    "bench": ["BASE", "--runs", "1", "--warmup", "0", "--runtimes", "eager"],
    "compress": ["BASE", "--recipe", "quantize-int8", "--data", "digits", "--quiet", "--no-latency", "--out", "OUT"],
    "search": ["BASE", "--data", "digits", "--trials", "1", "--startup-trials", "1", "--final-epochs", "0",
               "--finetune-steps", "1", "--no-progress", "--no-best-model", "--out", "OUT"],
    "demo": ["--model", "zoo:lenet300", "--epochs", "1", "--recipe", "quantize-int8", "--quiet", "--out", "OUT"],
    "list": [],
    "eval": ["BASE", "--data", "digits"],
}

#: free-text flags for which any text is valid (nothing to refuse)
FREE_TEXT = {"out", "study", "title", "pattern"}
BAD_TEXT = "nosuch_value"


def test_every_verb_has_a_base_command() -> None:
    assert set(VERBS) == set(BASE_ARGV), "add the new verb's valid command to BASE_ARGV"


def test_every_numeric_flag_declares_its_range() -> None:
    plain = [f"{verb} {'/'.join(a.option_strings)}" for verb, p in VERBS.items() for a in p._actions
             if a.type in (int, float)]
    assert not plain, f"numeric flags without a range (give them type=Number(...) or a FLAG_RULES entry): {plain}"
    assert all(isinstance(rule, Number) for rule in FLAG_RULES.values())


# ---- the world a case runs in -------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with BASE (a saved model), TSLIM (its packed file), damaged copies and a recipe."""
    import torchslim as ts
    from torchslim.pack import cluster_, pack

    root = tmp_path_factory.mktemp("fuzz")
    model = ts.create_model("zoo:lenet300", data="digits", seed=0)
    ts.save(model, root / "base")
    cluster_(model, bits=4)
    pack(model, root / "base.tslim")
    for name, damage in (("trunc", "truncate"), ("flip", "flip")):
        shutil.copytree(root / "base", root / f"base_{name}")
        _damage(root / f"base_{name}" / "model.safetensors", damage)
        shutil.copy(root / "base.tslim", root / f"{name}.tslim")
        _damage(root / f"{name}.tslim", damage)
    shutil.copytree(root / "base", root / "base_plan")
    _damage(root / "base_plan" / "plan.json", "truncate")
    (root / "binary_recipe.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "userdir").mkdir()
    (root / "userdir" / "keep.txt").write_text("a user's file")
    (root / "userfile").write_text("a user's file")
    return root


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one bit in the middle of the payload
        data[len(data) * 2 // 3] ^= 0x10
        path.write_bytes(bytes(data))


def _argv(verb: str, root: Path, out: str = "new_out", base: str = "base", **replace: str | None) -> list[str]:
    """The verb's base command in ``root`` with ``--flag`` values replaced (None: drop the flag)."""
    mapping = {"BASE": str(root / base), "TSLIM": str(root / "base.tslim"), "OUT": str(root / out),
               "OUT.tslim": str(root / f"{out}.tslim"), "OUT.onnx": str(root / f"{out}.onnx")}
    argv = [verb] + [mapping.get(a, a) for a in BASE_ARGV[verb]]
    for flag, value in replace.items():
        if flag in argv:
            i = argv.index(flag)
            del argv[i: i + 2]
        if value is not None:
            argv += [flag, value]
    return argv


def _snapshot(root: Path) -> dict[str, str]:
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            snap[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return snap


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    return int(code or 0), capsys.readouterr().err


def _assert_refused(argv: list[str], root: Path, capsys: pytest.CaptureFixture[str]) -> str:
    before = _snapshot(root)
    code, err = _run(argv, capsys)
    if code == 0:  # accepted: clean up so that the next cases still start from the same world
        for p in root.glob("new_out*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, f"{argv}: exit {code}, stderr {err[-800:]!r}"
    assert len(lines) == 1 and lines[0].startswith("torchslim: error: "), f"{argv}: stderr {err[-800:]!r}"
    assert "Traceback" not in err
    after = _snapshot(root)
    assert after == before, (f"{argv}: files changed on an exit-2 path: created {sorted(set(after) - set(before))}, "
                             f"removed {sorted(set(before) - set(after))}, changed "
                             f"{sorted(k for k in before if k in after and before[k] != after[k])}")
    return lines[0]


# ---- the valid base commands run -----------------------------------------------------------------
@pytest.mark.parametrize("verb", sorted(BASE_ARGV))
def test_base_command_runs(verb: str, world: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))
    out = f"ok_{verb}"
    code, err = _run(_argv(verb, world, out=out), capsys)
    assert code == 0, f"{verb}: {err[-1500:]}"
    for p in world.glob(f"{out}*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# ---- generated bad values --------------------------------------------------------------------------
def _value_cases() -> list[tuple[str, str, str]]:
    cases = []
    for verb, p in sorted(VERBS.items()):
        for a in p._actions:
            if not a.option_strings or a.nargs == 0 or a.dest in FREE_TEXT:
                continue
            flag = max(a.option_strings, key=len)
            if isinstance(a.type, Number):
                cases += [(verb, flag, bad) for bad in a.type.invalid_examples()]
            elif a.choices is not None:
                cases.append((verb, flag, BAD_TEXT))
            elif a.type is None:
                cases.append((verb, flag, BAD_TEXT))
        positional = [a for a in p._actions if not a.option_strings and a.dest in ("model", "file")]
        cases += [(verb, a.dest.upper(), BAD_TEXT) for a in positional]
    return cases


@pytest.mark.parametrize(("verb", "flag", "value"), _value_cases(), ids=lambda x: str(x))
def test_bad_value_is_refused(verb: str, flag: str, value: str, world: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))
    argv = _argv(verb, world)
    if flag in ("MODEL", "FILE"):
        argv[1] = value
    else:
        argv = _argv(verb, world, **{flag: value})
    _assert_refused(argv, world, capsys)


# ---- the output contract -------------------------------------------------------------------------
WRITERS = sorted(v for v, p in VERBS.items() if p.get_default("out_kind"))


def _immutable(path: Path) -> bool:
    """Make ``path`` a folder nobody may create files in (root ignores modes: chattr +i)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        return True
    return shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(path)],
                                                                 capture_output=True).returncode == 0


def _out_cases() -> list[tuple[str, str]]:
    cases = []
    for verb in WRITERS:
        kinds = ["existing_dir", "existing_file", "under_a_file", "unwritable"]
        if "BASE" in BASE_ARGV[verb]:
            kinds += ["the_input", "inside_the_input"]
        if VERBS[verb].get_default("out_resumable"):
            kinds += ["resume_nothing", "resume_and_force"]
        cases += [(verb, k) for k in kinds]
    return cases


@pytest.mark.parametrize(("verb", "case"), _out_cases())
def test_output_contract(verb: str, case: str, world: Path, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))
    kind = VERBS[verb].get_default("out_kind")
    argv = _argv(verb, world)
    out_at = argv.index("--out") + 1
    if case == "existing_dir":
        argv[out_at] = str(world / "userdir")
    elif case == "existing_file":
        argv[out_at] = str(world / "userfile")
    elif case == "under_a_file":
        argv[out_at] = str(world / "userfile" / "x")
    elif case == "the_input":
        argv[out_at] = str(world / "base")
    elif case == "inside_the_input":
        argv[out_at] = str(world / "base" / "sub")
    elif case == "unwritable":
        locked = world / f"locked_{verb}"
        if not _immutable(locked):
            locked.rmdir()
            pytest.skip("no way to make an unwritable folder here (root without chattr)")
        try:
            argv[out_at] = str(locked / "deep" / "x")
            line = _assert_refused(argv, world, capsys)
            assert "cannot write" in line
        finally:
            if os.geteuid() == 0:
                subprocess.run(["chattr", "-i", str(locked)], check=True)
            locked.chmod(0o700)
            locked.rmdir()
        return
    elif case == "resume_nothing":
        argv.append("--resume")
    elif case == "resume_and_force":
        argv += ["--resume", "--force"]
    line = _assert_refused(argv, world, capsys)
    if case in ("existing_dir", "existing_file") and not (kind == "dir" and case == "existing_file") and not (
            kind == "file" and case == "existing_dir"):
        assert "--force" in line


# ---- damaged inputs --------------------------------------------------------------------------------
def _damaged_cases() -> list[tuple[str, str]]:
    cases = []
    for verb in sorted(BASE_ARGV):
        if "BASE" in BASE_ARGV[verb]:
            cases += [(verb, f"model:{d}") for d in ("base_trunc", "base_flip", "base_plan")]
    cases += [("unpack", "file:trunc.tslim"), ("unpack", "file:flip.tslim"), ("compress", "recipe:binary")]
    return cases


@pytest.mark.parametrize(("verb", "case"), _damaged_cases())
def test_damaged_input_is_refused(verb: str, case: str, world: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))
    what, _, name = case.partition(":")
    if what == "model":
        argv = [a if a != str(world / "base") else str(world / name) for a in _argv(verb, world)]
    elif what == "file":
        argv = _argv(verb, world)
        argv[1] = str(world / name)
    else:
        argv = _argv(verb, world, **{"--recipe": str(world / "binary_recipe.yaml")})
    line = _assert_refused(argv, world, capsys)
    damaged = name if what != "recipe" else "binary_recipe.yaml"
    assert damaged.split(".")[0] in line, line
