"""``torchslim pack`` / ``unpack``: common JSON shape, the packed file, exit code 2 on bad input."""

from __future__ import annotations

import json

import pytest
import torch

import torchslim as ts
from torchslim.cli import main
from torchslim.pack import clustered_layers, unpack


def _run(capsys, argv: list[str]) -> dict:
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out.strip().splitlines()[-1])


def test_pack_then_unpack(tmp_path, capsys) -> None:
    out = tmp_path / "m.tslim"
    payload = _run(capsys, [
        "pack", "zoo:lenet300", "--bits", "4", "--data", "synthetic:1x1x28x28:n=64", "--finetune-epochs", "1",
        "--max-steps", "2", "--out", str(out), "--json", "--no-latency", "--no-progress",
    ])
    assert payload["verb"] == "pack"
    for key in ("before", "after", "accuracy_before", "accuracy_after", "files", "cluster", "pack", "train"):
        assert key in payload
    assert payload["after"]["size_bytes"] == out.stat().st_size == payload["pack"]["size_bytes"]
    assert payload["after"]["params"] == payload["before"]["params"]  # clustered weights count in full
    assert payload["after"]["size_bytes"] * 7 < payload["before"]["size_bytes"]
    assert payload["cluster"]["bits"] == 4 and payload["files"]["packed"] == str(out)
    assert 0.0 <= payload["accuracy_after"] <= 1.0
    listing = _run(capsys, ["unpack", str(out), "--out", str(tmp_path / "dir"), "--json"])
    model = ts.load(listing["files"]["model"])
    assert set(clustered_layers(model)) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), unpack(out)(x))
    # a clustered saved directory packs as it is (no --bits needed)
    again = _run(capsys, ["pack", listing["files"]["model"], "--out", str(tmp_path / "again.tslim"), "--json",
                          "--no-latency", "--coder", "huffman"])
    assert again["cluster"] is None and again["pack"]["coder"] == "huffman"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bits", "9"], "bits"),
        (["--bits", "0"], "bits"),
        (["--coder", "zip"], "coder"),
        (["--init", "kmeans"], "init"),
        (["--finetune-epochs", "1"], "--data"),
        (["--modules", "conv*"], "selects no"),
    ],
)
def test_pack_bad_input_exits_2(tmp_path, capsys, args: list[str], needle: str) -> None:
    out = tmp_path / "m.tslim"
    code = main(["pack", "zoo:lenet300", "--out", str(out), "--json", "--no-latency", *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
    assert not out.exists()


def test_pack_out_must_be_a_file_and_unpack_errors(tmp_path, capsys) -> None:
    assert main(["pack", "zoo:lenet300", "--out", str(tmp_path), "--no-latency"]) == 2
    assert "is a folder" in capsys.readouterr().err
    bad = tmp_path / "bad.tslim"
    bad.write_bytes(b"not a packed model")
    assert main(["unpack", str(bad), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "not a torchslim packed model" in err and str(bad) in err
    assert not (tmp_path / "d").exists()
