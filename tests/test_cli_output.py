"""What a person reads (issue #26): no third-party noise, discoverable specs, human tables, notes.

The subprocess test runs a real static quantize (ONNX Runtime's quantizer logs its advice on the
root logger there); the rest run ``torchslim.cli.main`` in-process on small models.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

from torchslim.cli import build_parser, main

RAW_KEYS = ("nonzero_params", "dense_fp32_bytes", "peak_activation_bytes", "latency_ms", "size_bytes", "packed_bytes")
NOISE = ("WARNING:root", "UserWarning", "No CUDA runtime", "Resetting threadpool", "KernelPreference")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """zoo:lenet300 trained one epoch on digits (about 88% test accuracy): a model that is not at chance."""
    out = tmp_path_factory.mktemp("trained") / "lenet300"
    assert main(["train", "zoo:lenet300", "--data", "digits", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    return str(out)


# ---- third-party noise ----------------------------------------------------------------------------
def test_static_quantize_prints_no_third_party_noise(tmp_path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # show every warning Python would show a user
    proc = subprocess.run(
        [sys.executable, "-m", "torchslim", "quantize", "zoo:lenet5", "--mode", "static", "--data", "mnist",
         "--calibration-batches", "2", "--out", str(tmp_path / "q"), "--no-latency", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for noise in NOISE:
        assert noise not in proc.stderr, proc.stderr
        assert noise not in proc.stdout, proc.stdout
    for key in RAW_KEYS:
        assert key not in proc.stdout, proc.stdout
    assert "size on disk" in proc.stdout and "parameters (nonzero)" in proc.stdout
    flat = " ".join(proc.stdout.split())  # rich wraps long lines
    assert "note: zoo:lenet5 is untrained" in flat  # random weights: the user is told to train first
    assert "torchslim train zoo:lenet5 --data mnist" in flat


def test_third_party_output_drops_harmless_and_notes_the_rest(capsys) -> None:
    from torchslim._cli_output import third_party_output

    with third_party_output():
        logging.getLogger().warning("Please consider to run pre-processing before quantization. Refer to example: x")
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        warnings.warn("# The axis name: batch will not be used, since it shares the same shape", UserWarning, stacklevel=1)
        warnings.warn("old API", FutureWarning, stacklevel=1)
        logging.getLogger("somelib.sub").warning("weights contain NaN\nsecond line")
        logging.getLogger("somelib.sub").warning("weights contain NaN\nsecond line")  # said once
    err = capsys.readouterr().err
    assert err.splitlines() == ["note: somelib says: weights contain NaN"]
    assert logging.getLogger().handlers == [h for h in logging.getLogger().handlers if "RootCatch" not in type(h).__name__]


def _warner(module: str):
    """A function whose module is ``module`` that warns (with a stacklevel pointing at its caller)."""
    scope = {"__name__": module, "warnings": warnings}
    exec("def warn(text):\n    warnings.warn(text, UserWarning, stacklevel=2)\n", scope)  # noqa: S102 - test helper
    return scope["warn"]


def test_third_party_output_keeps_torchslim_own_warnings_and_verbose_shows_all(capsys) -> None:
    from torchslim._cli_output import third_party_output

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with third_party_output():
            _warner("torchslim.fake")("torchslim: a layer runs the reference path")
            _warner("somelib.core")("something the user may care about")
    assert [str(w.message) for w in seen] == ["torchslim: a layer runs the reference path"]  # shown as Python shows it
    assert capsys.readouterr().err == "note: somelib says: something the user may care about\n"
    with third_party_output(verbose=True):
        assert os.environ.get("TORCHSLIM_VERBOSE") == "1"
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _warner("somelib.core")("shown as the library prints it")
    assert len(seen) == 1 and os.environ.get("TORCHSLIM_VERBOSE") != "1"
    assert "note:" not in capsys.readouterr().err


def test_quiet_native_stderr_catches_fd_2_and_restores_it(capfd) -> None:
    from torchslim._utils import quiet_native_stderr

    with quiet_native_stderr(replay=False) as caught:
        os.write(2, b"[threadpool.cpp:66] Resetting threadpool to 1 threads.\n[cpuinfo_utils.cpp:87] midr\n")
    assert caught.lines() == ["[threadpool.cpp:66] Resetting threadpool to 1 threads.", "[cpuinfo_utils.cpp:87] midr"]
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"  # descriptor 2 is back
    with quiet_native_stderr(replay=True):
        os.write(2, b"replayed\n")
    assert "replayed" in capfd.readouterr().err
    with pytest.raises(RuntimeError), quiet_native_stderr(replay=False):
        os.write(2, b"explains the failure\n")
        raise RuntimeError("boom")
    assert "explains the failure" in capfd.readouterr().err  # a failing block replays what it caught


def test_verbose_is_accepted_before_and_after_the_verb() -> None:
    parser = build_parser()
    assert parser.parse_args(["--verbose", "list"]).verbose is True
    assert parser.parse_args(["list", "--verbose"]).verbose is True
    assert parser.parse_args(["list"]).verbose is False


# ---- discoverable specs -----------------------------------------------------------------------------
def test_list_names_every_spec_family(capsys) -> None:
    code, out, err = run(capsys, "list")
    assert code == 0, err
    for name in ("pretrained:minilm", "pretrained:smollm2-135m", "pretrained:gemma3-270m", "zoo:lenet5",
                 "torchvision:NAME", "path/to/model.py:factory", "sentences", "shakespeare", "text:", "mnist",
                 "digits", "images"):
        assert name in out, name
    code, out, _ = run(capsys, "list", "--json")
    d = json.loads(out)
    specs = [m["spec"] for fam in d["model_specs"] for m in fam["members"]]
    assert {"pretrained:minilm", "pretrained:smollm2-135m", "pretrained:gemma3-270m", "zoo:lenet5"} <= set(specs)
    llms = {m["spec"]: m for fam in d["model_specs"] for m in fam["members"] if m["spec"].startswith("pretrained:")}
    assert all(isinstance(m["installed"], bool) for m in llms.values())
    data = {x["spec"] for x in d["data_specs"]}
    assert {"sentences[:N]", "shakespeare", "text:PATH", "mnist"} <= data
    assert all(x["description"] for x in d["data_specs"])
    assert d["models"] and "zoo:lenet5" in d["models"]  # the older keys stay


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_help_states_its_default_and_the_specs() -> None:
    parser = build_parser()
    missing = []
    for verb, p in _verbs(parser).items():
        for a in p._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS:
                continue
            if a.default not in (None, False, "", argparse.SUPPRESS) and "default" not in (a.help or "").lower():
                missing.append(f"{verb} {a.option_strings[0]}")
            if a.dest == "data":
                assert "sentences" in a.help and "text:PATH" in a.help and "torchslim list" in a.help, (verb, a.help)
        for a in p._actions:
            if a.dest == "model" and not a.option_strings:
                assert "pretrained:NAME" in a.help and "zoo:NAME" in a.help and "torchslim list" in a.help, verb
    assert not missing, missing
    text = _verbs(parser)["lottery"].format_help()
    text = text[text.index("options:"):]
    for flag in ("--rounds", "--seeds", "--epochs", "--lr"):
        entry = text[text.index(f"  {flag} "):].split("\n  -")[0]
        assert "(default:" in entry and len(entry.split(flag.upper().lstrip("-"), 1)[-1].strip()) > 20, entry


# ---- human tables and notes ---------------------------------------------------------------------------
def test_prune_summary_in_words(capsys, tmp_path) -> None:
    code, out, err = run(capsys, "prune", "zoo:lenet300", "--data", "digits", "--ratio", "0.3", "--out",
                         str(tmp_path / "p"), "--no-latency", "--no-progress")
    assert code == 0, err
    for key in RAW_KEYS:
        assert key not in out, out
    assert "removed " in out and " channels" in out and "channel groups" in out
    assert "packed" not in out  # no packed file: no row
    assert "note: zoo:lenet300 is untrained" in out


def test_no_untrained_note_for_a_trained_model(capsys, tmp_path, trained) -> None:
    code, out, err = run(capsys, "sparsify", trained, "--data", "digits", "--sparsity", "0.5", "--out",
                         str(tmp_path / "s"), "--no-latency", "--no-progress")
    assert code == 0, err
    assert "is untrained" not in out and "scores at chance" not in out
    assert "test accuracy:" in out


def test_untrained_note_wording() -> None:
    from torchslim._cli_common import untrained_note

    assert untrained_note("zoo:lenet5", "digits", 0.107, 10) == (
        "note: zoo:lenet5 is untrained (accuracy 10.7% on digits, chance is 10%): train it first: "
        "torchslim train zoo:lenet5 --data digits --out runs/lenet5")
    assert untrained_note("runs/x", "mnist", 0.12, 10).startswith("note: runs/x scores at chance")
    assert untrained_note("runs/x", "mnist", 0.16, 10) is None  # above 1.5x chance
    assert untrained_note("runs/x", None, None, None) is None
    assert "random weights" in untrained_note("zoo:resnet20", None, None, None)


def test_latency_inside_its_spread_reads_same() -> None:
    from torchslim.profile.compare import CompareRow
    from torchslim.profile.tables import change_words, compare_table

    assert change_words(CompareRow("latency_ms", 0.054, 0.093, 0.093 / 0.054, 0.02, 0.03)) == "same"
    assert change_words(CompareRow("latency_ms", 1.0, 0.5, 0.5, 0.01, 0.01)) == "2.00x faster"
    assert change_words(CompareRow("size_bytes", 1000, 250, 0.25)) == "4.00x smaller"
    assert change_words(CompareRow("params", 100, 99, 0.99)) == "1.0% fewer"
    from torchslim.profile.compare import Comparison

    text = str(compare_table(Comparison((CompareRow("packed_bytes", None, None, None),
                                         CompareRow("size_bytes", 2048, 1024, 0.5),
                                         CompareRow("latency_ms", 1.0, 1.01, 1.01, 0.05, 0.05)))))
    assert "packed" not in text and "size on disk" in text and "2.00 KiB" in text and "same" in text
    assert "latency (ms, ± spread)" in text and "1.000 ± 0.05" in text


def test_train_names_the_checkpoint_it_leaves(capsys, tmp_path) -> None:
    out = tmp_path / "t"
    code, text, err = run(capsys, "train", "zoo:lenet300", "--data", "digits", "--epochs", "1", "--max-steps", "3",
                          "--out", str(out), "--no-progress")
    assert code == 0, err
    assert "last.pt" in text and str(out) + ".checkpoint" in " ".join(text.split())
    assert "KiB" in text or "MiB" in text
