"""The `torchslim distill` verb: common JSON shape, teacher accuracy, one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

import torchslim as ts
from torchslim.cli import main


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    data = ts.load_data("digits")
    torch.manual_seed(0)
    teacher = ts.create_model("zoo:lenet300", data=data)
    ts.fit(teacher, data, ts.TrainConfig(epochs=1, lr=0.05, device="cpu", max_steps_per_epoch=10), progress=False)
    out = tmp_path_factory.mktemp("teacher") / "lenet300"
    ts.save(teacher, out)
    return out


def test_distill_verb_prints_the_common_json(teacher_dir, tmp_path, capsys):
    out = tmp_path / "student"
    argv = ["distill", "zoo:lenet300", "--teacher", str(teacher_dir), "--data", "digits", "--epochs", "1",
            "--loss", "hint", "--max-steps", "3", "--device", "cpu", "--out", str(out), "--json", "--no-latency"]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["verb"] == "distill"
    assert {"before", "after", "accuracy_before", "accuracy_after", "files", "teacher_accuracy"} <= set(payload)
    assert payload["before"]["params"] == payload["after"]["params"] == 266610 - 784 * 300 + 64 * 300
    assert 0.0 <= payload["teacher_accuracy"] <= 1.0 and 0.0 <= payload["accuracy_after"] <= 1.0
    assert payload["distill"]["config"]["loss"] == "hint"
    assert payload["distill"]["result"]["train"]["epochs_run"] == 1
    reloaded = ts.load(out)  # --out holds the student, loadable as the next verb's MODEL
    assert sum(p.numel() for p in reloaded.parameters()) == payload["after"]["params"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--loss", "fitnet"], "--loss must be one of"),
        (["--taps", "fc9"], "no module named 'fc9'"),
        (["--alpha", "1.5"], "--alpha"),
    ],
)
def test_bad_input_exits_2_with_one_line(teacher_dir, tmp_path, capsys, extra, needle):
    argv = ["distill", "zoo:lenet300", "--teacher", str(teacher_dir), "--data", "digits", "--epochs", "1",
            "--loss", "hint", "--device", "cpu", "--out", str(tmp_path / "s"), "--json", "--no-latency", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchslim: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "s").exists()


def test_teacher_with_other_output_shape_exits_2(tmp_path, capsys):
    teacher = ts.create_model("zoo:lenet300", data="digits", num_classes=5)
    ts.save(teacher, tmp_path / "t5")
    argv = ["distill", "zoo:lenet300", "--teacher", str(tmp_path / "t5"), "--data", "digits", "--epochs", "1",
            "--device", "cpu", "--out", str(tmp_path / "s"), "--no-latency"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "teacher (LeNet300) outputs shape (2, 5)" in err and "(2, 10)" in err
