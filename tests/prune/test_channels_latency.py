"""Latency-aware allocation: per-group ratios follow measured seconds per MAC, budgets still hold."""

from __future__ import annotations

import copy

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.graph.spaces import analyse
from torchslim.prune.channels import Budget, latency_scales, latency_sensitivity, prune_channels_


def _macs(model: torch.nn.Module) -> int:
    return ts.profile(model, latency=False, size=False).macs


def test_sensitivity_is_measured_per_group_and_scales_are_bounded() -> None:
    model = ts.create_model("zoo:resnet20").eval()
    x = ts.example_inputs(model)
    cg = analyse(model, x)
    sens = latency_sensitivity(model, cg, x, runs=3)
    assert sens and set(sens) <= {g.id for g in cg.groups}
    assert all(v >= 0 for v in sens.values())
    scales = latency_scales(sens, cg)
    assert all(0.25 <= v <= 4.0 for v in scales.values())


@pytest.mark.parametrize("round_to", [1, None])
def test_latency_allocation_meets_macs_budget_with_non_uniform_ratios(round_to) -> None:
    model = ts.create_model("zoo:resnet20")
    before = _macs(model)
    plan = prune_channels_(model, target=Budget(macs=0.5), allocation="latency", round_to=round_to)
    got = _macs(model) / before
    assert abs(got - 0.5) <= 0.02
    assert plan.allocation == "latency"
    kept = {round(g["kept"] / g["size"], 2) for g in plan.groups}
    if round_to == 1:  # single channels: the latency scales give many different ratios
        assert len(kept) > 2
    else:  # the default keeps widths in kernel blocks (8 from 32 channels), which leaves fewer distinct ratios
        assert len(kept) >= 2
        assert all(g["kept"] % 8 == 0 for g in plan.groups if g["size"] >= 32)
    (inp,) = ts.example_inputs(model)
    model(inp).sum().backward()


@pytest.mark.parametrize(("kwargs", "match"), [({"allocation": "fast"}, "allocation"),
                                               ({"allocation": "latency", "global_ranking": True}, "global_ranking")])
def test_bad_allocation_leaves_model_unchanged(kwargs, match) -> None:
    model = ts.create_model("zoo:resnet20")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=match):
        prune_channels_(model, ratio=0.5, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
