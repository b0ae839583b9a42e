"""``factorize_`` under a latency budget: ranks from measured per-layer gain, the measured ratio
reported, unprofitable layers left whole, unreachable budgets refused with the model unchanged.

Timing tests assert contracts, never a speed: the figures are whatever this machine measured.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.cli import main
from torchslim.errors import ConfigError
from torchslim.lowrank import FactorizeConfig, factorize_
from torchslim.lowrank._latency import LayerTiming, Option, allocate, candidate_ranks, energy_lost, next_need
from torchslim.lowrank._plan import METHODS


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("latency-cache")  # the layer timings are shared by this file's tests


@pytest.fixture
def cache(monkeypatch, cache_dir):
    monkeypatch.setenv("TORCHSLIM_CACHE", str(cache_dir))
    return cache_dir


def _net() -> nn.Module:
    """A VGG-like net at 16x16: one wide 3x3 conv carries the time; the last 1x1 conv (8 -> 8) only
    gets slower as three convolutions."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 96, 3, padding=1), nn.ReLU(),
        nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(),
        nn.Conv2d(96, 8, 1), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()


X = torch.randn(1, 3, 16, 16)


def _state(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return [type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def test_plan_reports_measured_ratio_runtime_and_skipped_layers(cache) -> None:
    model = _net()
    plan = factorize_(model, method="tucker", target=ts.Budget(latency=0.8, threads=1), example_inputs=X)
    lat = plan.latency
    assert lat is not None and lat["runtime"] == "eager" and lat["threads"] == 1 and lat["budget"] == 0.8
    assert lat["measured_ratio"] > 0 and lat["measured_ratio"] <= 0.8 * (1 + lat["band"])
    assert lat["rounds"] and all(r["measured_ratio"] > 0 for r in lat["rounds"])
    skipped = {s.name: s.reason for s in plan.skipped}
    assert "8" in skipped and "not faster factorized" in skipped["8"]  # the 8 -> 8 1x1 conv
    assert sorted(lat["skipped"]) == sorted(skipped)
    assert plan.layers, "some layer was factorized"
    for x in plan.layers:
        assert x.ms_before is not None and x.ms_after is not None and x.ms_after < x.ms_before
        assert isinstance(model.get_submodule(x.name), nn.Sequential)
    assert isinstance(model[8], nn.Conv2d)
    assert model(X).shape == (1, 10)
    assert "measured latency ratio" in str(plan.table())
    json.dumps(plan.to_dict())  # the plan is JSON


def test_unprofitable_layers_alone_are_refused(cache) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    before = _state(model)
    with pytest.raises(ConfigError) as err:
        factorize_(model, method="tucker", target=ts.Budget(latency=0.5, threads=1), example_inputs=torch.randn(1, 8, 8, 8))
    msg = str(err.value)
    assert "\n" not in msg and "none of the 2 selected layers is faster factorized" in msg
    after = _state(model)
    assert before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_unreachable_budget_is_refused_in_one_line_model_unchanged(cache) -> None:
    model = _net()
    before = _state(model)
    out = model(X)
    with pytest.raises(ConfigError) as err:
        factorize_(model, method="tucker", target=ts.Budget(latency=0.02, threads=1), example_inputs=X)
    msg = str(err.value)
    assert "\n" not in msg and "closest measured ratio is" in msg and "model is unchanged" in msg
    after = _state(model)
    assert before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert torch.equal(model(X), out)


def test_latency_budget_needs_example_inputs_and_a_known_runtime() -> None:
    with pytest.raises(ConfigError, match="example inputs"):
        factorize_(_net(), method="tucker", target=ts.Budget(latency=0.5))
    with pytest.raises(ConfigError, match="runtime must be one of"):
        ts.Budget(latency=0.5, runtime="tpu")


def test_config_round_trip_and_exactly_one_target() -> None:
    cfg = FactorizeConfig(method="tucker", target=ts.Budget(latency=0.6, runtime="onnxruntime", threads=2))
    assert FactorizeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert FactorizeConfig.from_dict({"method": "tucker", "target": {"latency": 0.6}}).target == ts.Budget(latency=0.6)
    with pytest.raises(ConfigError, match="exactly one of"):
        FactorizeConfig(method="tucker", rank=4, target=ts.Budget(latency=0.6))
    with pytest.raises(ConfigError, match="must be a ts.Budget"):
        FactorizeConfig(method="tucker", target=0.6)


def test_recipe_stage_takes_a_latency_budget() -> None:
    from torchslim.recipe import load_recipe

    r = load_recipe({"stages": [{"factorize": {"method": "tucker", "target": {"latency": 0.6, "runtime": "eager"}}}]})
    assert r.stages[0].config["target"]["latency"] == 0.6


def test_macs_budget_is_the_model_scope_macs_target() -> None:
    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))

    a, b, x = mlp(), mlp(), torch.randn(2, 64)
    pa = factorize_(a, method="svd", target=ts.Budget(macs=0.5), example_inputs=x)
    pb = factorize_(b, method="svd", target_macs=0.5, scope="model", example_inputs=x)
    assert [x.ranks for x in pa.layers] == [x.ranks for x in pb.layers] and pa.latency is None


def test_allocate_saves_the_most_ms_per_energy_lost() -> None:
    # layer a: cheap energy for its ms; layer b: expensive; the greedy takes a first, then rank is given back
    a = LayerTiming("a", [[1]], 10.0, [Option((8,), 6.0, 0.05), Option((4,), 3.0, 0.2)])
    b = LayerTiming("b", [[1]], 10.0, [Option((8,), 6.0, 0.5), Option((4,), 3.0, 0.9)])
    choice, saved = allocate([a, b], need_ms=4.0)
    assert choice["a"].ranks == (8,) and choice["b"] is None and saved == pytest.approx(4.0)
    choice, saved = allocate([a, b], need_ms=9.0)
    assert choice["a"].ranks == (4,) and choice["b"] is not None and saved >= 9.0
    choice, saved = allocate([a, b], need_ms=100.0)  # out of reach: every layer at its fastest
    assert choice["a"].ranks == (4,) and choice["b"].ranks == (4,) and saved == pytest.approx(14.0)


def test_next_need_scales_then_interpolates_between_bracketing_measurements() -> None:
    # one measurement: estimated 40 ms saved, really 20 of 100 -> ask for twice the estimate per ms wanted
    assert next_need([(40.0, 0.8)], 0.6, 100.0, 80.0, 90.0) == pytest.approx(80.0)
    assert next_need([(40.0, 1.01)], 0.6, 100.0, 101.0, 90.0) == 90.0  # nothing gained: the fastest forms
    # 0.8 at 40 ms and 0.5 at 70 ms bracket 0.6: a third of the way from 70 back to 40
    assert next_need([(40.0, 0.8), (70.0, 0.5)], 0.6, 100.0, 50.0, 90.0) == pytest.approx(60.0)


def test_candidate_ranks_and_energy_lost() -> None:
    tucker = METHODS["tucker"]
    conv = nn.Conv2d(64, 128, 3)
    ladder = candidate_ranks(tucker, conv)
    assert (128, 64) not in ladder and len(set(ladder)) == len(ladder)
    assert all(r % 8 == 0 for ranks in ladder for r in ranks if r >= 16)
    e = tucker.mode_energies(conv)
    assert energy_lost(e, (128, 64)) == pytest.approx(0.0, abs=1e-9)
    assert 0 < energy_lost(e, (64, 32)) < energy_lost(e, (16, 8)) <= 2.0


def test_module_latency_is_cached_under_its_signature(cache) -> None:
    from torchslim.export.runtime_latency import module_latencies, module_latency

    seq = nn.Sequential(nn.Linear(32, 4), nn.Linear(4, 32))
    ms = module_latency(seq, (8, 32), signature={"svd": [32, 4, 32]}, runs=3, warmup=0)
    again = module_latencies({"x": (nn.Linear(32, 32), {"svd": [32, 4, 32]})}, (8, 32), runs=3, warmup=0)
    assert again == {"x": ms}  # read back from the cache under the same signature
    with pytest.raises(ConfigError, match="JSON"):
        module_latency(seq, (8, 32), signature={"x": object()})


def test_cli_json_reports_latency_and_bad_runtime_exits_2(tmp_path, cache, capsys) -> None:
    out = tmp_path / "f"
    code = main(["factorize", "zoo:conv2", "--method", "tucker", "--target-latency", "0.9", "--threads", "1",
                 "--out", str(out), "--json", "--no-latency"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    lat = payload["latency"]
    assert lat["runtime"] == "eager" and lat["threads"] == 1 and lat["measured_ratio"] > 0
    assert isinstance(lat["skipped"], list) and payload["factorize"]["latency"] == lat
    assert isinstance(ts.load(out).features[2], nn.Sequential) == ("features.2" not in lat["skipped"])

    for bad in (["--target-latency", "0.6", "--runtime", "tpu"], ["--rank", "2", "--runtime", "tpu"],
                ["--rank", "2", "--threads", "1"]):
        dest = tmp_path / "bad"
        code = main(["factorize", "zoo:conv2", "--method", "tucker", *bad, "--out", str(dest), "--no-latency"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "runtime" in err and not dest.exists()
