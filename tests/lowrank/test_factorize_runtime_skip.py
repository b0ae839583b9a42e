"""A rank rule checked where the model runs (#24): ``factorize_(..., energy=0.9, runtime=R)`` times
every layer the rule factorizes, as it is and factorized, in R and leaves whole the ones whose
factorized form is not faster; the recipe ``factorize`` stage does so in the recipe's deploy
runtime; ``torchslim factorize --runtime R`` without ``--target-latency`` too. The tests assert the
contract on the recorded figures, never a speed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.cli import main
from torchslim.errors import ConfigError
from torchslim.graph.state import state_digest
from torchslim.lowrank import FactorizeConfig, factorize_
from torchslim.lowrank._latency import MIN_GAIN


@pytest.fixture
def cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))


def _lenet5() -> nn.Module:
    torch.manual_seed(0)
    return ts.create_model("zoo:lenet5")


def test_energy_rule_in_onnxruntime_leaves_whole_the_layers_not_faster(cache) -> None:
    pytest.importorskip("onnxruntime")
    model = _lenet5()
    plan = factorize_(model, FactorizeConfig(method="svd", energy=0.9, runtime="onnxruntime", threads=1))
    rc = plan.runtime_check
    assert rc is not None and rc["runtime"] == "onnxruntime" and rc["threads"] == 1 and rc["batch"] == 1
    rows = {r["layer"]: r for r in rc["layers"]}
    # every layer the energy rule would factorize (and that is smaller) was timed, whole and factorized
    assert rows and set(rows) == {x.name for x in plan.layers} | set(rc["left_whole"])
    for x in plan.layers:  # the contract: a factorized layer was measured faster than the whole one
        assert x.ms_after is not None and x.ms_before is not None
        assert x.ms_after <= x.ms_before * (1 - MIN_GAIN) and rows[x.name]["faster"]
        assert isinstance(model.get_submodule(x.name), nn.Sequential)
    skipped = {s.name: s.reason for s in plan.skipped}
    for name in rc["left_whole"]:  # a layer left whole: still the original layer, its figures in the reason
        r = rows[name]
        assert not r["faster"] and r["factorized_ms"] > r["whole_ms"] * (1 - MIN_GAIN)
        assert not isinstance(model.get_submodule(name), nn.Sequential)
        assert "in onnxruntime (1 thread)" in skipped[name] and "ms whole vs" in skipped[name]
    assert "timed in onnxruntime" in str(plan.table())
    assert plan.to_dict()["runtime_check"] == rc and plan.config.runtime == "onnxruntime"


def test_the_check_uses_the_layer_cache(cache, monkeypatch) -> None:
    from torchslim.export import runtime_latency

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(1, 64)
    first = factorize_(model, rank=4, runtime="eager", example_inputs=x)
    calls = []
    real = runtime_latency.paired_latency
    monkeypatch.setattr(runtime_latency, "paired_latency", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = factorize_(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), rank=4, runtime="eager",
                       example_inputs=x)
    assert not calls  # same layers, shapes, runtime and threads: read back, not timed again
    assert again.runtime_check["layers"] == first.runtime_check["layers"]


@pytest.mark.parametrize("bad,match", [
    ({"runtime": "tpu"}, r"^FactorizeConfig\.runtime must be one of eager, compile, onnxruntime, xnnpack; got 'tpu'$"),
    ({"runtime": "eager", "threads": 0}, r"^FactorizeConfig\.threads must be an integer >= 1"),
    ({"threads": 2}, r"^FactorizeConfig\.threads .*give runtime= too$"),
])
def test_bad_runtime_is_one_line_and_the_model_is_unchanged(bad, match) -> None:
    model = _lenet5()
    before = state_digest(model)
    with pytest.raises(ConfigError, match=match) as info:
        factorize_(model, method="svd", energy=0.9, **bad)
    assert "\n" not in str(info.value) and state_digest(model) == before


def test_runtime_is_not_for_a_latency_budget_and_needs_inputs() -> None:
    with pytest.raises(ConfigError, match="latency budget names where it is measured"):
        FactorizeConfig(target=ts.Budget(latency=0.8), runtime="eager")
    FactorizeConfig(target=ts.Budget(macs=0.8), runtime="eager")  # a MACs budget is a rank rule: checked
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    before = state_digest(model)
    with pytest.raises(ConfigError, match="needs example inputs"):
        factorize_(model, rank=4, runtime="eager")
    assert state_digest(model) == before
    cfg = FactorizeConfig(energy=0.9, runtime="onnxruntime", threads=1)
    assert FactorizeConfig.from_dict(cfg.to_dict()) == cfg


def test_recipe_stage_times_in_the_deploy_runtime(cache, tmp_path) -> None:
    from torchslim.recipe import compress, load_recipe
    from torchslim.recipe.runner import deploy_runtime_of

    assert deploy_runtime_of(load_recipe("lowrank-distill")) == "onnxruntime"  # export: [onnx]
    recipe = {"name": "f", "stages": [{"factorize": {"method": "svd", "energy": 0.9}}]}
    assert deploy_runtime_of(load_recipe(recipe)) == "eager"  # no export stage: the ts.save model, eager PyTorch
    compress(_lenet5(), recipe, None, out=tmp_path / "run", progress=False, latency=False)
    (stage,) = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]
    extras = stage["extras"]
    assert extras["runtime"] == {"runtime": "eager", "threads": 1, "from": "deploy"}
    rc = extras["plan"]["runtime_check"]
    assert rc["runtime"] == "eager" and rc["threads"] == 1 and rc["layers"]
    assert {x["name"] for x in extras["plan"]["layers"]} == {r["layer"] for r in rc["layers"] if r["faster"]}
    assert set(rc["left_whole"]) <= {x["name"] for x in extras["plan"]["skipped"]}


@pytest.mark.parametrize("fields,runtime,source", [
    ({}, "onnxruntime", "deploy"),
    ({"runtime": None}, None, "none"),
    ({"runtime": "none"}, None, "none"),
    ({"runtime": "eager"}, "eager", "stage"),
    ({"only_if_smaller": False}, None, "none"),  # every selected layer factorized, whatever it costs
    ({"energy": None, "target": {"latency": 0.8}}, None, "none"),  # a latency budget says where itself
])
def test_recipe_stage_runtime_field(fields, runtime, source) -> None:
    from torchslim.recipe import load_recipe
    from torchslim.recipe.stages_quantize import _factorize_config

    cfg = load_recipe({"stages": [{"factorize": {"energy": 0.9, **fields}}]}).stages[0].config
    fcfg, src = _factorize_config(cfg, "onnxruntime")
    assert (fcfg.runtime, src) == (runtime, source)
    assert fcfg.threads == (1 if runtime is not None else None)


def test_recipe_runtime_field_is_checked() -> None:
    from torchslim.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"field 'runtime' must be 'deploy' .*got 'tpu'"):
        load_recipe({"stages": [{"factorize": {"energy": 0.9, "runtime": "tpu"}}]})
    r = load_recipe({"stages": [{"factorize": {"energy": 0.9}}]})
    assert r.stages[0].config["runtime"] == "deploy"


def test_cli_runtime_without_target_latency_lists_the_layers_left_whole(tmp_path, cache, capsys) -> None:
    out = tmp_path / "f"
    code = main(["factorize", "zoo:lenet5", "--method", "svd", "--energy", "0.9", "--runtime", "eager",
                 "--threads", "1", "--out", str(out), "--json", "--no-latency"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    rc = payload["runtime_check"]
    assert rc["runtime"] == "eager" and rc["threads"] == 1 and payload["factorize"]["runtime_check"] == rc
    skipped = {s["name"] for s in payload["factorize"]["skipped"]}
    assert set(rc["left_whole"]) <= skipped
    model = ts.load(out)
    for name in rc["left_whole"]:
        assert not isinstance(model.get_submodule(name), nn.Sequential)
