"""GroupNorm with 1 < groups < C prunes by position within a group (as grouped convolutions do)."""

from __future__ import annotations

import torch
from torch import nn

import torchslim as ts


def test_group_norm_keeps_its_groups_and_prunes_equally_in_each() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
                          nn.Conv2d(32, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    x = torch.randn(2, 3, 16, 16)
    ts.set_example_inputs(model, (x,))
    before = ts.profile(model, latency=False, size=False).macs
    plan = ts.prune_channels_(model, ratio=0.5)
    assert plan.left_whole == []
    assert (model[1].num_groups, model[1].num_channels, model[0].out_channels) == (8, 16, 16)
    assert (model[4].num_groups, model[4].num_channels, model[3].out_channels) == (4, 8, 8)
    assert ts.profile(model, latency=False, size=False).macs <= 0.35 * before
    model.train()
    model(x).sum().backward()
