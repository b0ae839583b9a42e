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
from torchslim.search._apply import apply_stages_, make_stages
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


@pytest.mark.parametrize(
    "spec,shape,method",
    [("zoo:lenet5", None, "tucker"), ("zoo:lenet5", None, "svd"), ("zoo:resnet20", (3, 16, 16), "tucker")],
)
def test_cost_model_matches_the_pruned_and_factorized_model(spec: str, shape: tuple | None, method: str) -> None:
    model = ts.create_model(spec, input_shape=shape) if shape else ts.create_model(spec)
    space = build_space(model, ranks=(0.25, 0.5, 1.0), conv_rank_method=method)
    assert {c.method for c in space.layer_ranks} == {"svd", method}  # Linear by SVD, Conv2d by `method`
    inputs = ts.example_inputs(model)
    cost = CostModel(model, inputs, space)
    base = ts.profile(model, latency=False, size=False)
    rng = random.Random(3)
    replaced = left_alone = 0
    for kept in ([rng.randint(1, c.size) for c in space.groups], cost.floor_kept(2)):
        ranks = {c.layer: rng.choice((0.25, 0.5)) for c in space.layer_ranks}
        predicted = cost.factorized(kept, ranks)
        # prune, then offer every layer to factorize_ at its rank: factorize_ decides what it leaves alone
        real = copy.deepcopy(model)
        stages = make_stages(cost.ratios_for(kept), {}, space, importance="l2", ignore=(), finetune=None,
                             factorized=ranks)
        for st in stages:  # the decomposition's quality does not change its shapes: few HOOI sweeps
            if "factorize" in st:
                st["factorize"]["max_iter"] = 1
        info = apply_stages_(real, stages, None, example_inputs=inputs)
        assert sorted(info["factorize"]["layers"]) == sorted(predicted)
        replaced += len(predicted)
        left_alone += len(info["factorize"]["skipped"])
        p = ts.profile(real, latency=False, size=False)
        predicted_cost = cost.cost(kept, ranks)
        assert predicted_cost["macs"] == pytest.approx(p.macs / base.macs, rel=1e-9)
        assert predicted_cost["params"] == pytest.approx(p.params / base.params, rel=1e-9)
        assert predicted_cost["macs"] < cost.cost(kept)["macs"]
    assert replaced and left_alone  # both sides of factorize_'s only_if_smaller rule were checked


@pytest.mark.parametrize("spec,fraction",
                         [("zoo:conv4", 0.2), ("zoo:conv4", 0.5), ("zoo:lenet5", 0.3), ("zoo:lenet5", 0.5)])
def test_repair_meets_the_budget_from_both_sides(spec: str, fraction: float) -> None:
    model = ts.create_model(spec, input_shape=(1, 12, 12)) if spec == "zoo:conv4" else ts.create_model(spec)
    space = build_space(model, ranks=(0.5, 1.0))
    cost = CostModel(model, ts.example_inputs(model), space)
    rng = random.Random(1)
    for i in range(6):
        ratios = {c.key: rng.choice(ratio_choices(space.max_ratio, space.step)) for c in space.groups}
        ranks = {c.layer: rng.choice(c.choices) for c in space.layer_ranks} if i % 3 == 2 else None
        if cost.cost([c.size for c in space.groups], ranks)["macs"] <= fraction:
            continue  # the ranks alone meet the budget: no channel can grow
        kept = cost.repair(cost.kept_for(ratios), "macs", fraction, ranks=ranks)
        assert kept is not None
        got = cost.cost(kept, ranks)["macs"]
        assert fraction * 0.98 <= got <= fraction  # within 2% under the budget, whatever the rounding
        if i:
            continue  # the cost model against the really pruned model, once
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


def test_ranks_add_one_choice_per_factorizable_layer() -> None:
    model = ts.create_model("zoo:lenet5")
    space = build_space(model, ranks=(1.0, 0.5, 0.25, 0.5))
    assert [(c.layer, c.method) for c in space.layer_ranks] == [
        ("features.0", "tucker"), ("features.3", "tucker"),
        ("classifier.0", "svd"), ("classifier.2", "svd"), ("classifier.4", "svd"),
    ]
    assert all(c.choices == (0.25, 0.5, 1.0) for c in space.layer_ranks)
    assert len(space) == len(space.groups) + 5 and "layer_ranks" in space.signature()
    assert "layer_ranks" not in build_space(model).signature()  # studies from before ranks still match
    only = build_space(model, ranks=(0.5,), rank_layers=("classifier.*",), conv_rank_method="svd")
    assert [c.layer for c in only.layer_ranks] == ["classifier.0", "classifier.2", "classifier.4"]


@pytest.mark.parametrize("bad", [{"max_ratio": 1.0}, {"max_ratio": 0.0}, {"step": 0.0}, {"bits": ()}, {"bits": (1, 8)},
                                 {"ranks": ()}, {"ranks": (0.0, 0.5)}, {"ranks": (1.5,)}, {"ranks": "0.5"},
                                 {"ranks": (0.5,), "conv_rank_method": "cp"},
                                 {"ranks": (0.5,), "rank_layers": ("nothing.*",)}])
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
