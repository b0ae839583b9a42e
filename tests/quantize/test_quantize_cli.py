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


def _picked(argv: list[str]):
    """The parsed ``quantize`` arguments after the CLI chose its defaults (no model is built)."""
    from torchslim.cli import build_parser
    from torchslim.quantize._cli import _pick_defaults

    args = build_parser().parse_args(["quantize", *argv, "--out", "unused"])
    _pick_defaults(args)
    return args


@pytest.mark.parametrize(
    ("argv", "data", "alpha"),
    [
        (["pretrained:minilm", "--mode", "dynamic"], "sentences", 0.75),  # text encoder: calibrate + smooth
        (["pretrained:minilm", "--mode", "dynamic", "--smoothquant", "0.5"], "sentences", 0.5),
        (["pretrained:minilm", "--mode", "dynamic", "--data", "sentences:16"], "sentences:16", 0.75),
        (["pretrained:minilm", "--mode", "dynamic", "--no-smoothquant"], None, None),  # opt out: nothing picked
        (["pretrained:minilm", "--mode", "weight-only", "--bits", "4"], None, None),  # no data helps weight-only
        (["pretrained:mnist_cnn", "--mode", "static"], "mnist", None),  # the data the model declares
        (["pretrained:efficientnet_lite0", "--mode", "static"], "images", None),
        (["pretrained:mnist_cnn", "--mode", "dynamic"], None, None),
        (["zoo:lenet300", "--mode", "dynamic"], None, None),  # random weights: no data of its own
        (["pretrained:mnist_cnn", "--mode", "static", "--data", "digits"], "digits", None),  # the user's data wins
    ],
)
def test_cli_picks_the_bundled_data_and_smoothing(argv: list[str], data: str | None, alpha: float | None) -> None:
    args = _picked(argv)
    assert args.data == data and args._smoothquant == alpha
    given = "--data" in argv
    assert args._defaults.get("data") == (None if given else data)  # what the output reports as picked


def test_saved_text_encoder_keeps_its_default_data(tmp_path) -> None:
    saved = tmp_path / "enc"
    saved.mkdir()
    (saved / "plan.json").write_text(json.dumps({"model": {"spec": "pretrained:minilm"}}))
    assert _picked([str(saved), "--mode", "dynamic"]).data == "sentences"


def test_text_encoder_dynamic_smooths_on_bundled_sentences_by_default(tmp_path, capsys) -> None:
    from torchslim.data.sentences import calibration_sentences, paraphrase_pairs

    payload = _run(capsys, [
        "quantize", "pretrained:minilm", "--mode", "dynamic", "--no-onnx", "--out", str(tmp_path / "q"), "--json",
        "--no-latency", "--no-progress",
    ])
    assert payload["data"] == "sentences"
    assert payload["defaults"]["data"] == "sentences" and payload["defaults"]["smoothquant"] == 0.75
    assert any("--no-smoothquant" in line for line in payload["defaults"]["notes"])
    assert payload["quantize"]["config"]["smoothquant_alpha"] == 0.75 and payload["quantize"]["smoothed"]
    a, b = paraphrase_pairs()
    assert set(calibration_sentences(128)).isdisjoint(a + b)  # calibrated on sentences it is not scored on


def test_pretrained_classifier_static_calibrates_on_its_data(tmp_path, capsys) -> None:
    payload = _run(capsys, [
        "quantize", "pretrained:mnist_cnn", "--mode", "static", "--calibration-batches", "1", "--no-onnx",
        "--out", str(tmp_path / "q"), "--json", "--no-latency", "--no-progress",
    ])
    assert payload["data"] == "mnist" and payload["defaults"] == {"data": "mnist", "notes": payload["defaults"]["notes"]}
    assert "mnist" in payload["defaults"]["notes"][0] and "--data SPEC" in payload["defaults"]["notes"][0]
    assert payload["accuracy_after"] > payload["accuracy_before"] - 0.02  # calibrated on real digits


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
        (["--mode", "dynamic", "--smoothquant", "0.5", "--no-smoothquant"], "contradict"),
    ],
)
def test_bad_input_one_line_error(tmp_path, capsys, args: list[str], needle: str) -> None:
    out = tmp_path / "bad"
    code = main(["quantize", "zoo:lenet300", *args, "--out", str(out), "--no-latency", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("torchslim: error:") and needle in err
    assert not out.exists()
