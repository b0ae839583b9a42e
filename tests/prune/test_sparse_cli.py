"""The `sparsify` and `lottery` verbs, in process."""

from __future__ import annotations

import json
import os

import pytest
import torch

import torchslim as ts
from torchslim.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two on a shared machine (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_sparsify_json_common_shape(capsys, tmp_path):
    out = tmp_path / "sparse"
    code, stdout, _ = _run(capsys, ["sparsify", "zoo:lenet300", "--sparsity", "0.9", "--scope", "global",
                                    "--out", str(out), "--json", "--no-latency"])
    assert code == 0
    doc = json.loads(stdout)
    for key in ("before", "after", "files", "sparsify", "sparsity_report"):
        assert key in doc
    assert doc["after"]["nonzero_params"] < 0.15 * doc["before"]["nonzero_params"]
    assert doc["before"]["size_bytes"] / doc["after"]["size_bytes"] >= 5
    assert doc["sparsify"]["overall"] == pytest.approx(0.9)
    model = ts.load(out)
    assert os.path.getsize(out / "model.safetensors") == doc["after"]["size_bytes"]
    x = ts.example_inputs(model)
    assert torch.isfinite(model(*x)).all()


def test_sparsify_2_4_with_data_and_finetune(capsys, tmp_path):
    out = tmp_path / "nm"
    code, stdout, _ = _run(capsys, ["sparsify", "zoo:lenet300", "--pattern", "2:4", "--data", "synthetic:1x8x8:n=60",
                                    "--finetune-epochs", "1", "--out", str(out), "--json", "--no-latency"])
    assert code == 0
    doc = json.loads(stdout)
    assert doc["sparsify"]["pattern"] == "2:4" and doc["accuracy_after"] is not None
    model = ts.load(out)
    w = model.fc1.weight.detach()
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()


@pytest.mark.parametrize(
    "args",
    [
        ["--sparsity", "1.5"],
        ["--sparsity", "-0.5"],
        ["--pattern", "5:4"],
        ["--pattern", "2:4", "--modules", "nothing"],
        ["--sparsity", "0.5", "--method", "wanda"],  # needs --data
        ["--sparsity", "0.5", "--scope", "everything"],
        ["--sparsity", "0.5", "--method", "magnitud"],
    ],
)
def test_sparsify_bad_input_exit_2(capsys, tmp_path, args):
    out = tmp_path / "bad"
    code, stdout, err = _run(capsys, ["sparsify", "zoo:lenet300", *args, "--out", str(out), "--json", "--no-latency"])
    assert code == 2
    assert err.startswith("torchslim: error:") and len(err.strip().splitlines()) == 1
    assert not out.exists() and stdout == ""


def test_lottery_verb(capsys, tmp_path):
    out = tmp_path / "lt"
    code, stdout, _ = _run(capsys, ["lottery", "zoo:lenet300", "--data", "synthetic:1x6x6:n=90", "--rounds", "2",
                                    "--rate", "0.5", "--epochs", "1", "--eval-every", "2", "--batch-size", "16",
                                    "--out", str(out), "--json", "--device", "cpu"])
    assert code == 0
    doc = json.loads(stdout)
    assert json.loads((out / "lottery.json").read_text())["rounds"] == doc["rounds"]
    assert (out / "lottery.png").exists() and "reinit_accuracy" in doc["rounds"][0]
    ticket = ts.load(out)  # the directory is also the (finalized) ticket
    assert float((ticket.fc1.weight == 0).float().mean()) == pytest.approx(0.75, abs=1e-3)


def test_lottery_bad_rate_exit_2(capsys, tmp_path):
    code, _, err = _run(capsys, ["lottery", "zoo:lenet300", "--data", "synthetic:1x6x6:n=90", "--rate", "1.2",
                                 "--out", str(tmp_path / "x")])
    assert code == 2 and "rate" in err
