"""Searched per-group scales of symmetric int4 weights (scale_rule="search"): never worse than the
max|w| rules on the error they are judged by, integers in range, deterministic, refused options."""

from __future__ import annotations

import copy

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import QuantConfig, QuantizedLinear, quantize_llm_
from torchslim.quantize.gptq import _group_params, gptq_quantize, rtn_quantize
from torchslim.quantize.primitives import QScheme, unpack_int4
from torchslim.quantize.scale_search import search_scales, searches, weighted_error

transformers = pytest.importorskip("transformers")

SEARCH = QScheme(bits=4, granularity="group", group_size=32, scale_rule="search")
ABSMAX = QScheme(bits=4, granularity="group", group_size=32)


def _weights(seed: int = 0, rows: int = 24, cols: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < 0.02] *= 6  # a few outliers, of both signs
    return w


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


@pytest.mark.parametrize("weighted", [False, True])
def test_searched_scales_never_lose_to_absmax_rules(weighted: bool) -> None:
    for seed in range(3):
        w = _weights(seed).reshape(24, 4, 32)
        imp = torch.rand(4, 32, generator=torch.Generator().manual_seed(10 + seed)) ** 3 if weighted else None
        s = search_scales(w, imp, -8, 7)
        assert torch.equal(_fp16(s), s)  # stored exactly as fp16
        err = weighted_error(w, s, imp, -8, 7)
        amax = w.abs().amax(-1, keepdim=True)
        for rule in (amax / 7, amax / 7.5):
            assert (err <= weighted_error(w, _fp16(rule), imp, -8, 7)).all()
        ggml = _fp16(w.gather(-1, w.abs().argmax(-1, keepdim=True)) / -8)  # ggml's Q4_0 scale
        assert (err <= weighted_error(w, ggml, imp, -8, 7)).all()
        assert err.sum() < weighted_error(w, _fp16(amax / 7.5), imp, -8, 7).sum()  # and better on the whole


def test_quantized_linear_stores_in_range_integers_of_the_searched_scales() -> None:
    lin = torch.nn.Linear(128, 24)
    with torch.no_grad():
        lin.weight.copy_(_weights(1))
    q = QuantizedLinear.from_float(lin, SEARCH)
    ints = unpack_int4(q.qweight, 24 * 128).reshape(24, 4, 32).float()
    assert ints.min() >= -8 and ints.max() <= 7
    assert (ints == -8).any()  # the Q4_0 rule uses the 16th level
    s = q.scale.float()
    w = lin.weight.detach().reshape(24, 4, 32)
    torch.testing.assert_close(s, search_scales(w, None, -8, 7), rtol=0, atol=0)
    assert torch.equal(ints, torch.clamp(torch.round(w / s), -8, 7))  # nearest integers of the stored scale
    old = QuantizedLinear.from_float(lin, ABSMAX)
    e_new = (q.dequantized_weight() - lin.weight).square().sum()
    e_old = (old.dequantized_weight() - lin.weight).square().sum()
    assert e_new < e_old
    torch.testing.assert_close(old.scale.float(), _fp16(w.abs().amax(-1, keepdim=True) / 7.5), rtol=0, atol=0)


def test_rtn_and_gptq_are_deterministic_and_in_range() -> None:
    w = _weights(2, rows=16, cols=64)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.2, 3, 64)
    h = 2 * x.T @ x / x.shape[0]
    runs = [gptq_quantize(w, h, SEARCH) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ints, scale, zp = runs[0]
    assert ints.min() >= -8 and ints.max() <= 7 and torch.equal(zp, torch.zeros_like(zp))
    assert torch.equal(_fp16(scale), scale)
    r1, r2 = rtn_quantize(w, SEARCH), rtn_quantize(w, SEARCH)
    assert all(torch.equal(a, b) for a, b in zip(r1, r2))
    # the group's scale in GPTQ is judged with the Hessian diagonal as the weights
    block = w[:, :32].double()
    s_w, _ = _group_params(block, SEARCH, torch.diagonal(h)[:32].double())
    s_u, _ = _group_params(block, SEARCH)
    e = lambda s: weighted_error(block.float(), s.float(), torch.diagonal(h)[:32], -8, 7).sum()  # noqa: E731
    assert e(s_w) <= e(s_u)


def test_gptq_output_error_with_search_is_not_worse_than_absmax() -> None:
    w = _weights(3, rows=32, cols=128)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(6)) * torch.linspace(0.1, 4, 128)
    h = 2 * x.T @ x / x.shape[0]
    def out_err(scheme: QScheme) -> float:
        ints, s, _ = gptq_quantize(w, h, scheme)
        dq = (ints.float().reshape(32, 4, 32) * s).reshape(32, 128)
        return float(((dq - w) @ x.T).square().sum())
    assert out_err(SEARCH) < out_err(ABSMAX)


def test_which_schemes_search() -> None:
    assert searches(SEARCH)
    assert not searches(ABSMAX)
    assert not searches(QScheme(bits=8, granularity="group", group_size=32, scale_rule="search"))  # int8 keeps min-max
    assert not searches(QScheme(bits=4, symmetric=False, signed=False, granularity="group", group_size=32, scale_rule="search"))
    assert QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=32).weight_scheme().scale_rule == "search"
    assert QuantConfig(mode="weight-only", bits=4, scale_rule="absmax").weight_scheme().scale_rule == "absmax"
    assert QuantConfig(mode="static").weight_scheme().scale_rule == "absmax"  # observers decide there


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_llm_search_default_and_absmax_option(method: str) -> None:
    calib = [torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    kw = {"calibration": calib} if method == "gptq" else {}
    new, old = _tiny_llama(), _tiny_llama()
    plan = quantize_llm_(new, method=method, embedding_bits=None, **kw)
    assert plan.config.scale_rule == "search"
    quantize_llm_(old, method=method, embedding_bits=None, scale_rule="absmax", **kw)
    q_new, q_old = new.model.layers[0].mlp.down_proj, old.model.layers[0].mlp.down_proj
    ints = unpack_int4(q_new.qweight, q_new.out_features * q_new.in_features)
    assert ints.min() >= -8 and ints.max() <= 7
    assert not torch.equal(q_new.scale, q_old.scale)
    if method == "rtn":  # the old rule, as stored: max|w| / 7.5 of the float weights
        w = _tiny_llama().model.layers[0].mlp.down_proj.weight.detach()
        amax_rule = _fp16(w.abs().reshape(64, -1, 32).amax(-1, keepdim=True) / 7.5)
        assert torch.equal(q_old.scale.float(), amax_rule)
        e_new = (q_new.dequantized_weight() - w).square().sum()
        assert e_new < (q_old.dequantized_weight() - w).square().sum()


def test_bad_scale_rule_is_refused_in_one_line_and_the_model_is_unchanged() -> None:
    with pytest.raises(ConfigError, match="scale_rule must be one of absmax, search; got 'mse'") as e:
        QuantConfig(mode="weight-only", bits=4, scale_rule="mse")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="QScheme.scale_rule"):
        QScheme(bits=4, scale_rule=None)
    model = _tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="scale_rule") as e:
        quantize_llm_(model, method="rtn", scale_rule="ggml")
    assert "\n" not in str(e.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert ts  # the package imports cleanly


def test_gptq_act_order_keeps_static_groups_in_range() -> None:
    w = _weights(4, rows=16, cols=64)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(7)) * torch.linspace(3, 0.2, 64).flip(0)
    h = 2 * x.T @ x / x.shape[0]
    ints, scale, _ = gptq_quantize(w, h, SEARCH, act_order=True)
    assert ints.min() >= -8 and ints.max() <= 7
    again = gptq_quantize(w, h, SEARCH, act_order=True)
    assert torch.equal(ints, again[0]) and torch.equal(scale, again[1])
    # static groups: every scale is the one searched on the weights as given, before any update
    expect = search_scales(w.reshape(16, 2, 32), torch.diagonal(h).reshape(2, 32), -8, 7)
    torch.testing.assert_close(scale, expect, rtol=0, atol=0)


def test_rtn_with_data_weighs_the_inputs_energy() -> None:
    from torchslim.quantize.gptq import rtn_

    calib = [torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with_data, plain = _tiny_llama(), _tiny_llama()
    w = plain.model.layers[0].mlp.down_proj.weight.detach().clone()
    sq = {}
    hook = with_data.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: sq.__setitem__("x", sq.get("x", 0) + i[0].detach().reshape(-1, i[0].shape[-1]).square().sum(0)))
    with torch.no_grad():
        for b in calib:
            with_data(b)
    hook.remove()
    plan = quantize_llm_(with_data, method="rtn", calibration=calib, embedding_bits=None)
    assert plan.config.scale_rule == "search"
    quantize_llm_(plain, method="rtn", embedding_bits=None)
    imp = sq["x"].reshape(-1, 32)
    def err(q) -> float:
        return float(weighted_error(w.reshape(64, -1, 32), q.scale.float(), imp, -8, 7).sum())
    assert err(with_data.model.layers[0].mlp.down_proj) <= err(plain.model.layers[0].mlp.down_proj)
    with pytest.raises(ConfigError, match="act_order"):
        quantize_llm_(_tiny_llama(), method="rtn", act_order=True)
    assert rtn_.__doc__


def test_cli_scale_rule_flag(tmp_path, capsys) -> None:
    import json

    from torchslim.cli import main

    code = main(["quantize", "zoo:lenet300", "--mode", "weight-only", "--bits", "4", "--scale-rule", "ggml",
                 "--out", str(tmp_path / "bad"), "--json", "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "scale_rule must be one of absmax, search; got 'ggml'" in err
    assert not (tmp_path / "bad").exists()
    code = main(["quantize", "zoo:lenet300", "--mode", "weight-only", "--bits", "4", "--group-size", "4", "--scale-rule",
                 "absmax", "--out", str(tmp_path / "q"), "--json", "--no-latency", "--no-progress", "--no-onnx"])
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and payload["quantize"]["config"]["scale_rule"] == "absmax"
