"""A GGUF file scored in llama.cpp itself (``ts.evaluate_lm("x.gguf")``, ``torchslim eval x.gguf``).

The tolerances are llama.cpp's arithmetic, measured on the tiny Llama below (its ``lm_head`` scaled
by 10 so the next-token distributions are far from uniform; perplexity about 109): its CPU
kernels multiply F16 weights with fp16-rounded activations and Q8_0 / Q4_0 weights with
activations rounded to Q8_0 blocks (int8, one scale per 32), which torch, multiplying the
dequantized float weights, does not do. Measured relative perplexity gaps (llama-cpp-python
0.3.36, AMD EPYC): F32 9e-6, F16 2e-5, Q8_0 4e-4, Q4_0 1.3e-4; the tolerances are 5-10x those.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("gguf")

# relative perplexity gap, llama.cpp vs torch on the same weights and ids (measured: see the module doc)
TOLERANCE = {"f32": 1e-4, "f16": 2e-4, "q8_0": 2e-3, "q4_0": 2e-3}


@pytest.mark.parametrize("weight_type", ["f32", "f16", "q8_0", "q4_0"])
def test_llamacpp_perplexity_of_a_tiny_gguf_equals_torch(tiny_llama, tmp_path, weight_type) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    transformers = pytest.importorskip("transformers")
    import torchslim as ts
    from torchslim.export.gguf import export_gguf

    with torch.no_grad():
        tiny_llama.lm_head.weight.mul_(10)  # sharper distributions than a random init's near-uniform ones
    path = tmp_path / f"tiny_{weight_type}.gguf"
    export_gguf(tiny_llama, path, weight_type=weight_type)
    # torch on the very numbers the file holds (the dequantized blocks; float files: the model itself)
    ref = tiny_llama if weight_type == "f32" else transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (160,), generator=torch.Generator().manual_seed(1))
    kw = {"context": 64, "stride": 32, "max_tokens": None}
    theirs = ts.evaluate_lm(str(path), ids, threads=1, **kw)
    ours = ts.evaluate_lm(ref, ids, **kw)
    assert (theirs.tokens, theirs.windows, theirs.threads) == (ours.tokens, ours.windows, 1)
    assert theirs.perplexity == pytest.approx(ours.perplexity, rel=TOLERANCE[weight_type])
    assert ours.perplexity > 30  # a random model: the comparison is not between two trivially equal numbers
    if weight_type == "q4_0":  # the file's rounding is seen: the torch side must be the dequantized weights
        assert abs(ts.evaluate_lm(tiny_llama, ids, **kw).perplexity / ours.perplexity - 1) > 5 * TOLERANCE["q4_0"]


def test_decoder_returns_logits_per_row_and_steps_a_sequence(tiny_llama, tmp_path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from torchslim.errors import ConfigError, ModelRunError
    from torchslim.export.gguf import export_gguf
    from torchslim.export.gguf_runtime import LlamaCppDecoder

    path = export_gguf(tiny_llama, tmp_path / "t.gguf").path
    dec = LlamaCppDecoder(path, threads=1, context=16)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    logits = dec(ids)  # 20 > 16: the context grows
    assert logits.shape == (2, 20, 64) and logits.dtype == torch.float32 and dec.context == 20
    with torch.no_grad():
        assert torch.allclose(logits, tiny_llama(ids).logits, atol=1e-4)
    dec.reset()
    first = dec.step(ids[:1, :12])
    rest = dec.step(ids[:1, 12:])  # appended to the KV cache: the same logits as one pass
    assert torch.allclose(torch.cat([first, rest], 1), logits[:1], atol=1e-4) and dec.tokens == 20
    with pytest.raises(ModelRunError, match=r"must lie in \[0, 64\)"):
        dec(torch.tensor([[0, 64]]))
    with pytest.raises(ConfigError, match="no tokenizer known for .*pass tokenizer="):
        dec.hf_tokenizer()  # written without tokenizer keys: the ids come from tokenizer=
    dec.close()
    last = LlamaCppDecoder(path, threads=1, context=24, logits_all=False)  # as llama.cpp generates
    assert last.greedy(ids[:1, :12]) == int(logits[0, 11].argmax())
    last.rewind(5)
    assert last.greedy(ids[:1, 5:12]) == int(logits[0, 11].argmax()) and last.tokens == 12
    last.close()


def test_lm_speed_times_a_gguf_file_in_llamacpp(tiny_llama, tmp_path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    import torchslim as ts
    from torchslim.export.gguf import export_gguf

    path = export_gguf(tiny_llama, tmp_path / "t.gguf").path
    s = ts.lm_speed(str(path), prompt_tokens=8, new_tokens=4, threads=1, runs=2, warmup=0)
    assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0 and (s.threads, s.batch) == (1, 1)
    assert s.method.startswith("llama.cpp")


def test_missing_llama_cpp_is_one_line_naming_the_pip_command(tiny_llama, tmp_path, monkeypatch) -> None:
    import torchslim as ts
    from torchslim.errors import MissingDependencyError
    from torchslim.export.gguf import export_gguf

    path = export_gguf(tiny_llama, tmp_path / "t.gguf").path
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(MissingDependencyError) as info:
        ts.evaluate_lm(str(path), torch.arange(10), context=8)
    msg = str(info.value)
    assert "\n" not in msg and "pip install llama-cpp-python" in msg


def test_cli_scores_the_shipped_gguf_in_llamacpp(smollm2, tmp_path, run_cli) -> None:
    """The reference GGUF the wheel ships, in llama.cpp, against its dequantization in torch (same ids)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    import torchslim as ts
    from torchslim.zoo.pretrained_llm import gguf_file

    text = tmp_path / "harbour.txt"
    text.write_text("".join(f"At dawn the {i}th boat left the quiet harbour for the open sea.\n" for i in range(40)))
    argv = ["eval", str(gguf_file("smollm2-135m")), "--perplexity", "--data", f"text:{text}", "--context", "32",
            "--max-tokens", "48", "--threads", "1", "--speed", "--prompt-tokens", "8", "--new-tokens", "2", "--json"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    payload = json.loads(out)
    ev, speed = payload["evaluation"], payload["speed"]
    assert (ev["context"], ev["tokens"], ev["threads"]) == (32, 47, 1)
    assert speed["decode_tokens_per_s"] > 0 and speed["threads"] == 1 and speed["method"].startswith("llama.cpp")
    torch_side = ts.evaluate_lm(smollm2, f"text:{text}", context=32, max_tokens=48)
    from torchslim.export.gguf_runtime import LlamaCppDecoder
    from torchslim.lm import text_tokens
    from torchslim.zoo.pretrained_llm import tokenizer

    dec = LlamaCppDecoder(gguf_file("smollm2-135m"), threads=1, context=8)
    assert dec.pretrained() == "smollm2-135m" and dec.hf_tokenizer() is tokenizer("smollm2-135m")
    ours, _ = text_tokens(f"text:{text}", tokenizer("smollm2-135m"), max_tokens=48)
    assert torch.equal(text_tokens(f"text:{text}", dec.llama_tokenize, max_tokens=48)[0], ours)  # llama.cpp's own ids
    dec.close()
    # Q4_1 blocks times Q8_1-rounded activations in llama.cpp vs the dequantized float model in torch
    assert ev["perplexity"] == pytest.approx(torch_side.perplexity, rel=0.02)


def test_cli_refuses_other_exported_files_in_one_line(tmp_path, run_cli) -> None:
    pte = tmp_path / "model.pte"
    pte.write_bytes(b"not really")
    code, out, err = run_cli(["eval", str(pte), "--perplexity", "--data", "shakespeare"])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("torchslim: error: "), err
    assert "GGUF file (.gguf" in lines[0]
    code, out, err = run_cli(["eval", str(tmp_path / "missing.gguf"), "--perplexity", "--data", "shakespeare"])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "no GGUF file at" in lines[0], err
