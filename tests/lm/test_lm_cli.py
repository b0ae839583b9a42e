"""``torchslim eval``: perplexity of an LM / accuracy of a classifier; exit 2 with one line on bad input."""

from __future__ import annotations

import json

import pytest

from torchslim.cli import main


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "harbour.txt"
    path.write_text("".join(f"At dawn the {i}th boat left the quiet harbour for the open sea.\n" for i in range(40)))
    return path


def test_eval_perplexity_json(smollm2, text_file, run_cli) -> None:
    code, out, err = run_cli(["eval", "pretrained:smollm2-135m", "--perplexity", "--data", f"text:{text_file}",
                             "--context", "32", "--max-tokens", "48", "--json"])
    assert code == 0, err
    payload = json.loads(out)
    ev = payload["evaluation"]
    assert (ev["context"], ev["stride"], ev["tokens"], ev["text_tokens"]) == (32, 16, 47, 48)
    assert payload["perplexity"] == pytest.approx(ev["perplexity"]) and payload["perplexity"] > 1
    assert "test (evaluation) = the end" in payload["split_rule"]


def test_eval_accuracy_of_a_saved_classifier(tmp_path, run_cli) -> None:
    import torchslim as ts

    model = ts.create_model("zoo:lenet300", data="digits", seed=0)
    ts.save(model, tmp_path / "m")
    code, out, err = run_cli(["eval", str(tmp_path / "m"), "--data", "digits", "--json"])
    assert code == 0, err
    assert 0.0 <= json.loads(out)["accuracy"] <= 1.0


@pytest.mark.parametrize("case", ["bad_model", "bad_data", "onnx_model", "digits_perplexity", "stride", "context",
                                  "text_for_a_classifier"])
def test_eval_refuses_bad_input_with_one_line(case, text_file, tmp_path, run_cli) -> None:
    onnx = tmp_path / "decoder.onnx"
    onnx.write_bytes(b"not really")
    argv = {
        "bad_model": ["eval", "pretrained:nosuch", "--perplexity", "--data", f"text:{text_file}"],
        "bad_data": ["eval", "zoo:lenet300", "--perplexity", "--data", "text:/nonexistent/file.txt"],
        "onnx_model": ["eval", str(onnx), "--perplexity", "--data", f"text:{text_file}"],
        "digits_perplexity": ["eval", "zoo:lenet300", "--perplexity", "--data", "digits"],
        "stride": ["eval", "zoo:lenet300", "--data", f"text:{text_file}", "--context", "8", "--stride", "8"],
        "context": ["eval", "zoo:lenet300", "--data", f"text:{text_file}", "--context", "1"],
        "text_for_a_classifier": ["eval", "zoo:lenet300", "--data", f"text:{text_file}", "--context", "8"],
    }[case]
    code, out, err = run_cli(argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("torchslim: error: ") and "Traceback" not in err, err
    assert out == ""
    assert onnx.read_bytes() == b"not really"


def test_eval_a_saved_llm_directory(smollm2, text_file, tmp_path, run_cli) -> None:
    """ts.save / ts.load keep the LLM (tied embeddings included) and the tokenizer it reads text with."""
    import torch

    import torchslim as ts

    ts.save(smollm2, tmp_path / "llm")
    loaded = ts.load(tmp_path / "llm")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    (ids,) = ts.example_inputs(smollm2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, smollm2(ids).logits)
    argv = ["eval", str(tmp_path / "llm"), "--perplexity", "--data", f"text:{text_file}", "--context", "16",
            "--max-tokens", "24", "--json"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    direct = ts.evaluate_lm(smollm2, f"text:{text_file}", context=16, max_tokens=24)
    assert json.loads(out)["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)


def test_decoder_llms_default_to_the_bundled_plays() -> None:
    from torchslim._cli_defaults import default_data, describe_default

    assert default_data("pretrained:smollm2-135m") == default_data("pretrained:gemma3-270m") == "shakespeare"
    assert default_data("pretrained:minilm") == "sentences" and default_data("zoo:lenet5") is None
    assert describe_default("pretrained:smollm2-135m", "shakespeare", "calibration").startswith("calibration data: shakespeare")





def test_quantize_cli_ships_an_onnx_decoder_and_a_gguf_file(tmp_path, capsys, llama_spec) -> None:
    import json

    import pytest

    pytest.importorskip("gguf")
    pytest.importorskip("onnxruntime")

    out = tmp_path / "q"
    argv = ["quantize", llama_spec(), "--mode", "weight-only", "--bits", "4", "--method", "rtn",
            "--out", str(out), "--no-latency"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    files = report["files"]
    assert files["onnx"].endswith("model.onnx") and files["gguf"].endswith("model.gguf")  # default: onnx,gguf
    for name in ("onnx", "gguf"):
        assert (out / f"model.{name}").is_file() and files[name] == str(out / f"model.{name}")
    shipped = report["shipped"]
    assert shipped["gguf"]["types"]["Q4_0"] > 0 and shipped["onnx"]["matmul_nbits"] > 0
    assert shipped["onnx"]["left_float"] == []
    # the human summary names the shipped files and their size against the float weights
    assert main([*argv, "--force", "--format", "gguf"]) == 0
    text = capsys.readouterr().out
    assert "shipped GGUF model.gguf:" in text and "x smaller than fp32 weights" in text and "model.onnx" not in text
    assert not (out / "model.onnx").exists() and (out / "model.gguf").is_file()


def test_quantize_cli_format_is_checked(tmp_path, capsys) -> None:

    assert main(["quantize", "zoo:lenet300", "--mode", "dynamic", "--format", "tflite", "--out", str(tmp_path / "a")]) == 2
    assert "--format takes onnx, gguf" in capsys.readouterr().err
    assert main(["quantize", "zoo:lenet300", "--mode", "dynamic", "--format", "gguf", "--out", str(tmp_path / "b")]) == 2
    assert "--format gguf is for decoder LLMs" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
