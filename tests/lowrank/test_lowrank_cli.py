"""The ``factorize`` verb: common JSON shape, saved model, fine-tuning, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import torchslim as ts
from torchslim.cli import main


def test_factorize_json_shape_and_saved_model(tmp_path, capsys) -> None:
    out = tmp_path / "f"
    code = main(
        ["factorize", "zoo:conv2", "--data", "digits", "--method", "tucker", "--rank", "0.25",
         "--out", str(out), "--json", "--no-latency"]
    )
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    for key in ("before", "after", "accuracy_before", "accuracy_after", "files", "factorize"):
        assert key in payload
    assert payload["after"]["macs"] < payload["before"]["macs"]
    assert payload["after"]["macs"] == payload["factorize"]["macs_after"]
    assert [x["name"] for x in payload["factorize"]["layers"]] == ["features.2"]
    loaded = ts.load(out)
    assert isinstance(loaded.features[2], torch.nn.Sequential)
    assert ts.profile(loaded, latency=False, size=False).macs == payload["after"]["macs"]


def test_factorize_with_data_and_finetuning(tmp_path, capsys) -> None:
    code = main(
        ["factorize", "zoo:lenet300", "--data", "digits", "--method", "svd", "--energy", "0.8",
         "--finetune-epochs", "1", "--max-steps", "5", "--device", "cpu", "--out", str(tmp_path / "m"),
         "--json", "--no-latency", "--no-progress"]
    )
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert 0.0 <= payload["accuracy_before"] <= 1.0 and 0.0 <= payload["accuracy_after"] <= 1.0
    assert payload["finetune"]["result"]["epochs_run"] == 1
    assert payload["after"]["params"] < payload["before"]["params"]


def test_factorize_table_output(tmp_path, capsys) -> None:
    code = main(["factorize", "zoo:lenet300", "--method", "svd", "--rank", "vbmf", "--out", str(tmp_path / "t"), "--no-latency"])
    assert code == 0
    assert "factorize (svd)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "svd", "--energy", "1.5"], "energy"),
        (["--method", "svd", "--energy", "0"], "energy"),
        (["--method", "svd", "--rank", "500"], "larger than layer"),
        (["--method", "svd", "--rank", "abc"], "--rank"),
        (["--method", "qr", "--rank", "2"], "method"),
        (["--method", "tucker", "--rank", "2", "--modules", "fc1"], "Linear has no tucker"),
        (["--method", "svd", "--rank", "2", "--finetune-epochs", "1"], "--data"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle, tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    code = main(["factorize", "zoo:lenet300", *args, "--out", str(out), "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("torchslim: error:") and needle in err
    assert not out.exists()


def test_missing_rank_choice_is_an_argparse_error(tmp_path, capsys) -> None:
    assert main(["factorize", "zoo:lenet300", "--method", "svd", "--out", str(tmp_path / "x")]) == 2
    assert "one of the arguments" in capsys.readouterr().err
