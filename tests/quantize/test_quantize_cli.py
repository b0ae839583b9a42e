"""``torchslim quantize``: common JSON shape, ONNX files, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os

import pytest
import torch

import torchslim as ts
from torchslim.cli import main


def _run(capsys, argv: list[str]) -> dict:
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out.strip().splitlines()[-1])


def test_weight_only_int4_cli(tmp_path, capsys) -> None:
    out = tmp_path / "q"
    payload = _run(capsys, [
        "quantize", "zoo:lenet300", "--mode", "weight-only", "--bits", "4", "--granularity", "channel",
        "--out", str(out), "--json", "--no-latency", "--no-progress",
    ])
    assert payload["verb"] == "quantize"
    for key in ("before", "after", "accuracy_before", "accuracy_after", "files"):
        assert key in payload
    assert payload["quantize"]["config"]["bits"] == 4
    assert os.path.exists(payload["files"]["onnx"]) and os.path.exists(payload["files"]["onnx_fp32"])
    assert os.path.dirname(payload["files"]["onnx"]) == payload["files"]["model"]  # inside --out
    fp32_bytes = 266_610 * 4
    assert os.path.getsize(out / "model.safetensors") * 6 < fp32_bytes
    model = ts.load(out)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_static_cli_with_data(tmp_path, capsys) -> None:
    out = tmp_path / "s"
    payload = _run(capsys, [
        "quantize", "zoo:lenet300", "--mode", "static", "--data", "synthetic:1x1x28x28:n=64",
        "--calibration-batches", "1", "--out", str(out), "--json", "--no-latency", "--no-progress",
    ])
    assert payload["quantize"]["calibration_batches"] == 1
    assert payload["onnx_bytes"]["onnx"] * 3 < payload["onnx_bytes"]["onnx_fp32"]
    assert payload["onnx_parity"]["fp32_vs_torch_float_db"] > 60
    assert payload["onnx_parity"]["int8_vs_torch_quantized_db"] > 15
    assert ts.load(out)(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_dynamic_smoothquant_cli_min_gain(tmp_path, capsys) -> None:
    payload = _run(capsys, [
        "quantize", "zoo:lenet300", "--mode", "dynamic", "--smoothquant", "0.5", "--smoothquant-min-gain", "0",
        "--data", "synthetic:1x1x28x28:n=32", "--calibration-batches", "1", "--out", str(tmp_path / "d"), "--json",
        "--no-latency", "--no-progress",
    ])
    q = payload["quantize"]
    assert q["config"]["smoothquant_min_gain"] == 0
    assert q["smoothed"] == ["fc1", "fc2", "fc3"] and q["smoothed_into_norm"] == {}  # min gain 0: every layer


def test_text_encoder_smoothquant_cli_with_sentences(tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "minilm"
    payload = _run(capsys, [
        "quantize", "pretrained:minilm", "--mode", "dynamic", "--smoothquant", "0.75", "--data", "sentences:16",
        "--out", str(out), "--json", "--no-latency", "--no-progress",
    ])
    assert payload["data"] == "sentences:16" and payload["accuracy_after"] is None
    assert payload["quantize"]["smoothed"]  # calibrated on the bundled sentences
    assert payload["onnx_bytes"]["onnx"] * 3 < payload["onnx_bytes"]["onnx_fp32"]
    assert payload["onnx_parity"]["fp32_vs_torch_float_db"] > 60
    loaded = ts.load(out)
    ids = ts.example_inputs(loaded)
    with torch.no_grad():
        assert loaded(*ids).shape[-1] == 384


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bits", "9"], "bits"),
        (["--mode", "static"], "--data"),
        (["--mode", "int8"], "mode"),
        (["--observer", "kl"], "observer"),
        (["--mode", "weight-only", "--bits", "4", "--group-size", "128"], "group_size"),
        (["--mode", "dynamic", "--smoothquant", "0.5", "--smoothquant-min-gain", "-1", "--data", "synthetic:1x1x28x28:n=8"],
         "--smoothquant-min-gain"),
        (["--mode", "dynamic", "--smoothquant", "0.5", "--data", "sentences:0"], "sentences:N"),
        (["--mode", "static", "--data", "sentences"], "--mode dynamic or weight-only"),
        (["--mode", "dynamic", "--smoothquant", "0.5", "--data", "sentences"], "pretrained text encoder"),
    ],
)
def test_bad_input_one_line_error(tmp_path, capsys, args: list[str], needle: str) -> None:
    out = tmp_path / "bad"
    code = main(["quantize", "zoo:lenet300", *args, "--out", str(out), "--no-latency", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("torchslim: error:") and needle in err
    assert not out.exists()
