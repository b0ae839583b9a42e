"""MACs / params budgets keep widths in kernel blocks when round_to is not given (prune._widths)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

import torchslim as ts
from torchslim.prune._widths import allocate, multiple_of


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 256, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(256, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 10, 1))


def _macs(m: nn.Module, x: torch.Tensor) -> float:
    return float(ts.profile(m, x, latency=False, size=False).macs)


def test_macs_budget_keeps_widths_in_blocks_and_meets_the_budget() -> None:
    x = torch.randn(1, 3, 16, 16)
    m = _net()
    before = _macs(m, x)
    plan = ts.prune_channels_(m, x, target=ts.Budget(macs=0.5))
    assert abs(_macs(m, x) / before - 0.5) <= 0.02 * 0.5 + 1e-9
    assert plan.achieved["width_multiple"] == 16
    assert m[0].out_channels % 8 == 0 and m[2].out_channels % 16 == 0  # 64 -> blocks of 8, 256 -> of 16
    assert m[0].out_channels < 64 and m[2].out_channels < 256
    assert m[4].out_channels <= 16  # a 16-channel group is not held to blocks


def test_explicit_round_to_keeps_its_meaning() -> None:
    x = torch.randn(1, 3, 16, 16)
    m = _net()
    before = _macs(m, x)
    plan = ts.prune_channels_(m, x, target=ts.Budget(macs=0.5), round_to=1)
    assert "width_multiple" not in plan.achieved
    assert abs(_macs(m, x) / before - 0.5) <= 0.02 * 0.5 + 1e-9
    m2 = _net()
    ts.prune_channels_(m2, x, ratio=0.3)  # a plain ratio is not held to blocks
    assert m2[0].out_channels == 64 - int(64 * 0.3)


def test_allocate_moves_one_block_at_a_time() -> None:
    groups = [SimpleNamespace(size=256, head_dim=None), SimpleNamespace(size=12, head_dim=64)]
    assert multiple_of(groups[0], 8) == 8 and multiple_of(groups[1], 16) == 1
    totals = [sum(allocate(groups, [256 * r, 12 * r], 16, min_channels=1)) for r in (0.1, 0.2, 0.3, 0.4, 0.5)]
    assert totals == sorted(totals)
    for r in (0.1, 0.3, 0.5):
        counts = allocate(groups, [256 * r, 12 * r], 16, min_channels=1)
        assert (256 - counts[0]) % 16 == 0 and abs(sum(counts) - 268 * r) <= 8
    assert allocate(groups, [250.0, 11.9], 16, min_channels=40) == [208, 0]  # kept 48: min_channels in whole blocks; 12 < 40 kept whole
