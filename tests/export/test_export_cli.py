"""``torchslim export``: JSON shape, tables, exit code 2 with one line for bad input."""

from __future__ import annotations

import json
import os

import pytest

from torchslim.cli import main


def test_json_has_files_sizes_and_parity_per_format(tmp_path, capsys):
    out = tmp_path / "exports"
    code = main(["export", "zoo:lenet5", "--format", "torchscript,pt2", "--out", str(out), "--json",
                 "--random-inputs", "1"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)  # stdout holds only the JSON object
    assert payload["verb"] == "export" and set(payload["files"]) == {"torchscript", "pt2"}
    for fmt, path in payload["files"].items():
        assert os.path.getsize(path) == payload["sizes"][fmt]
        entry = payload["parity"][fmt]
        assert entry["ok"] is True and entry["max_abs"] <= entry["tolerance"]["atol"] + 1e-9
        assert set(entry) >= {"max_abs", "max_rel", "tolerance", "ok"}
    assert payload["files"]["torchscript"].endswith("model.pt")


def test_single_file_from_suffix_prints_a_table(tmp_path, capsys):
    path = tmp_path / "lenet.onnx"
    assert main(["export", "zoo:lenet300", "--out", str(path), "--random-inputs", "0"]) == 0
    text = capsys.readouterr().out
    assert "onnx" in text and "ok" in text and path.is_file()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--format", "tflite"], "not supported"),
        ([], "--format is required"),
        (["--format", "pt2", "--method", "x"], "--method"),
        (["--format", "pt2", "--check-cpp"], "--check-cpp"),
        (["--format", "onnx,onnx"], "twice"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    code = main(["export", "zoo:lenet300", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("torchslim: error:") and err.count("\n") == 1 and match in err
    assert not out.exists()


def test_missing_parent_folders_are_created_and_removed_on_failure(tmp_path, capsys):
    code = main(["export", "zoo:lenet300", "--out", str(tmp_path / "nope" / "m.pt2"), "--no-check"])
    assert code == 0 and (tmp_path / "nope" / "m.pt2").is_file()
    assert sorted(p.name for p in (tmp_path / "nope").iterdir()) == ["m.pt2"]  # no hidden leftovers
    # refused after the folders would have been needed: none of them is left behind
    code = main(["export", "zoo:lenet300", "--out", str(tmp_path / "a" / "b" / "m.onnx"), "--input-shape", "1,3,9,9"])
    assert code == 2 and "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
