"""The `binarize` verb, in process."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import torchslim as ts
from torchslim.binarize import BinaryLinear
from torchslim.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_binarize_json_common_shape_with_packed_size(capsys, tmp_path):
    out = tmp_path / "bin"
    code, stdout, _ = _run(capsys, ["binarize", "zoo:lenet300", "--method", "xnor", "--data", "digits", "--epochs", "1",
                                    "--max-steps", "5", "--out", str(out), "--json", "--no-latency"])
    assert code == 0
    doc = json.loads(stdout)
    for key in ("before", "after", "accuracy_before", "accuracy_after", "files", "binarize", "packing", "train"):
        assert key in doc
    assert doc["verb"] == "binarize" and doc["binarize"]["layers"] == ["fc2"]
    assert doc["after"]["size_bytes"] == os.path.getsize(out / "model.safetensors")  # the packed file
    fc2_fp32 = 300 * 100 * 4
    assert doc["before"]["size_bytes"] - doc["after"]["size_bytes"] >= fc2_fp32 * (1 - 1 / 25)
    assert doc["packing"]["compression"] >= 25 and doc["packing"]["binary_macs"] == 300 * 100
    assert doc["train"]["epochs_run"] == 1 and 0.0 <= doc["accuracy_after"] <= 1.0
    model = ts.load(out)
    assert isinstance(model.fc2, BinaryLinear) and model.fc2.method == "xnor"


def test_binarize_without_training_and_table_output(capsys, tmp_path):
    code, stdout, _ = _run(capsys, ["binarize", "zoo:lenet5", "--method", "bireal", "--binarize-last", "--backend", "auto",
                                    "--out", str(tmp_path / "m"), "--no-latency"])
    assert code == 0
    assert "binary layers" in stdout and "saved to" in stdout
    model = ts.load(tmp_path / "m")
    assert model.classifier[4].method == "bireal"


@pytest.mark.skipif(importlib.util.find_spec("torchslim.distill") is None, reason="no distill family")
def test_binarize_with_a_teacher(capsys, tmp_path):
    teacher = ts.create_model("zoo:lenet300", data="digits")
    ts.save(teacher, tmp_path / "teacher")
    code, stdout, _ = _run(capsys, ["binarize", str(tmp_path / "teacher"), "--method", "bnn", "--data", "digits",
                                    "--epochs", "1", "--max-steps", "3", "--teacher", str(tmp_path / "teacher"),
                                    "--out", str(tmp_path / "s"), "--json", "--no-latency"])
    assert code == 0
    doc = json.loads(stdout)
    assert doc["train"]["teacher"] == str(tmp_path / "teacher") and doc["train"]["teacher_accuracy"] is not None


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--method", "ternary"], "--method must be one of bnn, xnor, bireal, bwn"),
        (["--epochs", "2"], "--epochs needs --data"),
        (["--teacher", "zoo:lenet300"], "--teacher is used while training"),
        (["--modules", "nothing"], "selects no module"),
        (["--binarize-first", "--modules", "fc1", "--exclude", "fc1"], "no layer to binarize"),
        (["--word-bits", "8"], "word_bits must be 32 or 64"),
        (["--backend", "gpu"], "--backend must be one of"),
        (["--method", "bnn", "--scale-activations"], "XNOR-Net option"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, extra, match):
    out = tmp_path / "never"
    code, stdout, err = _run(capsys, ["binarize", "zoo:lenet300", "--out", str(out), "--json", "--no-latency", *extra])
    assert code == 2
    assert match in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
