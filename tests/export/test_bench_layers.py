"""``torchslim bench MODEL --layers``: the per-layer latency table per runtime, cached entries marked."""

from __future__ import annotations

import json

import pytest

from torchslim.cli import main


def test_layers_json_rows_per_runtime_and_cache_marked(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path))
    pytest.importorskip("onnxruntime")
    argv = ["bench", "zoo:lenet300", "--layers", "--runtimes", "eager,onnxruntime", "--runs", "3", "--json"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["runtimes"] == ["eager", "onnxruntime"] and d["threads"] == 1
    rows = d["layers"]
    assert len(rows) == 3 and {r["type"] for r in rows} == {"Linear"}  # LeNet-300-100: three layers
    for r in rows:
        assert r["input_shape"][0] == 1 and set(r["ms"]) == {"eager", "onnxruntime"}
        assert all(v > 0 for v in r["ms"].values()) and not any(r["cached"].values())  # a fresh cache
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    eager = [r["ms"]["eager"] for r in rows]
    assert eager == sorted(eager, reverse=True)  # slowest first (in the first runtime)
    # a second run reads every figure back from the cache and says so
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)["layers"]
    assert all(all(r["cached"].values()) for r in again)
    assert {r["layer"]: r["ms"] for r in again} == {r["layer"]: r["ms"] for r in rows}


def test_layers_table_names_runtimes_and_marks_cached(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path))
    argv = ["bench", "zoo:lenet5", "--data", "mnist", "--layers", "--runs", "2"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "eager ms" in first and "features.0" in first and "1x1x28x28" in first and "Conv2d" in first
    assert main(argv) == 0
    assert "*" in capsys.readouterr().out.split("┡")[-1]  # rows now from the cache


@pytest.mark.parametrize("runtimes", ["executorch", "eager,eager", "tensorrt"])
def test_layers_refuses_unknown_runtimes_in_one_line(capsys, runtimes) -> None:
    assert main(["bench", "zoo:lenet300", "--layers", "--runtimes", runtimes]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--runtimes" in err
    assert ("once" in err) if runtimes == "eager,eager" else ("allowed: eager, compile, onnxruntime, xnnpack" in err)
