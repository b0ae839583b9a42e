"""The search space and the budget repair: one choice per coupled group, exact kept counts, budgets met."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.graph import groups
from torchslim.search import CostModel, bn_recalibrate_, build_space, parse_budget, parse_objectives
from torchslim.search.space import ratio_choices


@pytest.mark.parametrize("spec", ["zoo:lenet5", "zoo:conv4", "zoo:resnet20"])
def test_one_choice_per_coupled_group(spec: str) -> None:
    model = ts.create_model(spec)
    cg = groups(model)
    space = build_space(model)
    assert sorted(c.group for c in space.groups) == sorted(g.id for g in cg.groups if g.id not in space.left_whole)
    assert len({c.key for c in space.groups}) == len(space.groups)
    if spec == "zoo:resnet20":  # the residual streams are single choices, each binding many convs
        assert len(space.groups) == len(cg.groups) == 12
        assert max(len(c.modules) for c in space.groups) >= 8


@pytest.mark.parametrize("spec", ["zoo:lenet5", "zoo:resnet20"])
def test_ratios_keep_exact_counts_and_cost_model_matches_real_macs(spec: str) -> None:
    model = ts.create_model(spec)
    space = build_space(model)
    cost = CostModel(model, ts.example_inputs(model), space)
    rng = random.Random(0)
    kept = [rng.randint(1, c.size) for c in space.groups]
    pruned = copy.deepcopy(model)
    plan = ts.prune_channels_(pruned, ratio=0.0, ratios=cost.ratios_for(kept))
    got = {r["id"]: r["kept"] for r in plan.groups}
    assert [got[c.group] for c in space.groups] == kept
    base = ts.profile(model, latency=False, size=False)
    real = ts.profile(pruned, latency=False, size=False)
    predicted = cost.cost(kept)
    assert predicted["macs"] == pytest.approx(real.macs / base.macs, rel=1e-9)
    assert predicted["params"] == pytest.approx(real.params / base.params, rel=1e-9)


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_repair_meets_the_budget_from_both_sides(fraction: float) -> None:
    model = ts.create_model("zoo:conv4", input_shape=(1, 12, 12))
    space = build_space(model)
    cost = CostModel(model, ts.example_inputs(model), space)
    rng = random.Random(1)
    for _ in range(2):
        ratios = {c.key: rng.choice(ratio_choices(space.max_ratio, space.step)) for c in space.groups}
        kept = cost.repair(cost.kept_for(ratios), "macs", fraction)
        assert kept is not None
        got = cost.cost(kept)["macs"]
        assert got <= fraction
        assert got >= fraction - 0.05  # scaled toward the budget, not far under it
        pruned = copy.deepcopy(model)
        ts.prune_channels_(pruned, ratio=0.0, ratios=cost.ratios_for(kept))
        real = ts.profile(pruned, latency=False, size=False).macs / ts.profile(model, latency=False, size=False).macs
        assert real == pytest.approx(got, rel=1e-9)
    # shrink-only (multi-objective) leaves an under-budget sample alone
    small = cost.kept_for({c.key: 0.8 for c in space.groups})
    assert cost.repair(small, "macs", 0.9, grow=False) == small


def test_repair_reports_an_impossible_budget() -> None:
    model = ts.create_model("zoo:lenet5")
    space = build_space(model)
    cost = CostModel(model, ts.example_inputs(model), space)
    floor = cost.min_cost(1)["macs"]
    assert floor > 0.01
    assert cost.repair([c.size for c in space.groups], "macs", floor / 2) is None


def test_empty_space_is_refused() -> None:
    model = nn.Sequential(nn.Linear(6, 3))  # its only channels are the model's inputs and outputs
    with pytest.raises(ConfigError, match="search space is empty"):
        build_space(model, torch.randn(1, 6))


def test_bits_add_one_choice_per_layer() -> None:
    model = ts.create_model("zoo:lenet5")
    space = build_space(model, bits=(4, 8))
    assert [c.layer for c in space.layer_bits] == ["classifier.0", "classifier.2", "classifier.4"]
    static = build_space(model, bits=(4, 8), quant_mode="static")
    assert [c.layer for c in static.layer_bits][:2] == ["features.0", "features.3"]
    with pytest.raises(ConfigError, match="weight-only"):
        build_space(model, bits=(8, 16))


@pytest.mark.parametrize("bad", [{"max_ratio": 1.0}, {"max_ratio": 0.0}, {"step": 0.0}, {"bits": ()}, {"bits": (1, 8)}])
def test_bad_space_settings(bad: dict) -> None:
    with pytest.raises(ConfigError):
        build_space(ts.create_model("zoo:lenet5"), **bad)


def test_parse_budget_and_objectives() -> None:
    assert parse_budget("macs=0.3, latency=0.5") == {"macs": 0.3, "latency": 0.5}
    assert parse_budget(ts.Budget(params=0.4)) == {"params": 0.4}
    assert parse_objectives("accuracy,latency") == ("accuracy", "latency")
    for bad in ("macs=0", "macs=-1", "macs=1.5", "flops=0.3", "macs", "macs=abc", "macs=0.3,macs=0.2"):
        with pytest.raises(ConfigError):
            parse_budget(bad)
    for bad in ("", "speed", "accuracy,accuracy"):
        with pytest.raises(ConfigError):
            parse_objectives(bad)


def test_bn_recalibration_resets_statistics_and_restores_modes() -> None:
    model = ts.create_model("zoo:resnet20", input_shape=(3, 16, 16))
    model.eval()
    bn = model.bn1
    bn.running_mean.fill_(5.0)
    x = torch.randn(8, 3, 16, 16) * 2 + 1
    n = bn_recalibrate_(model, [(x, torch.zeros(8, dtype=torch.long))] * 3, batches=2)
    assert n == 2
    assert not model.training and bn.momentum == 0.1
    assert float(bn.running_mean.abs().max()) < 5.0
