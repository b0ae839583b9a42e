"""Structured pruning of RAFT (torchvision's optical flow, issue #20), and of the groups it taught
us about: channels cut by a split into parts the model sizes in Python (RAFT's hidden state and
context, a channel shuffle's two halves) keep a share of every part.

RAFT returns the list of flow estimates (one per refinement step); pruned at ratio 0.5 it keeps that
structure, trains (the loss over the estimates backpropagates), costs at most 0.6 of its MACs, and a
refused or failed prune leaves it bit-identical. Its ``CorrBlock`` keeps the correlation pyramid of
the last forward in a plain attribute; after a training step those are non-leaf tensors, which
``copy.deepcopy`` refused ("Only Tensors created explicitly by the user (graph leaves) support the
deepcopy protocol") when the pruner copied the model for a trial.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, ModelRunError
from torchslim.graph.state import state_digest

SIZE = 128  # the smallest RAFT takes: 1/8 feature maps of 16, halved 3 times by the correlation pyramid


def build(name: str) -> nn.Module:
    return ts.create_model(f"torchvision:{name}", input_shape=(3, SIZE, SIZE), seed=0)


def macs(model: nn.Module) -> int:
    return ts.profile(model, latency=False, size=False).macs


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["raft_small", "raft_large"])
def test_raft_prunes_with_outputs_losses_and_macs(name: str) -> None:
    model = build(name)
    x = ts.example_inputs(model)
    with torch.no_grad():
        ref = model(*x)
    digest = state_digest(model)
    with pytest.raises(ConfigError, match="importance returned"):  # refused after the analysis
        ts.prune_channels_(model, ratio=0.5, importance=lambda m, cg, g: torch.zeros(1))
    assert state_digest(model) == digest
    with torch.no_grad():
        assert same(model(*x), ref)

    model.train()  # a training step leaves non-leaf tensors in CorrBlock.corr_pyramid
    sum(f.abs().mean() for f in model(*x)).backward()
    model.eval().zero_grad(set_to_none=True)
    before = macs(model)
    hidden = model.update_block.hidden_state_size
    plan = ts.prune_channels_(model, ratio=0.5)
    assert plan.left_whole == []  # the hidden/context split is pruned too, in proportion
    assert model.update_block.hidden_state_size < hidden
    assert macs(model) <= 0.6 * before
    with torch.no_grad():
        out = model(*x)
    assert isinstance(out, list) and len(out) == len(ref)
    assert all(o.shape == r.shape for o, r in zip(out, ref))

    model.train()
    loss = sum(f.abs().mean() for f in model(*x))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_raft_surgery_failing_midway_leaves_model_bit_identical(fail_surgery_midway) -> None:
    model = build("raft_small")
    x = ts.example_inputs(model)
    with torch.no_grad():
        ref = model(*x)
    digest = state_digest(model)
    fail_surgery_midway(model)
    with pytest.raises(ModelRunError, match="restored unchanged"):
        ts.prune_channels_(model, ratio=0.5)
    assert state_digest(model) == digest
    with torch.no_grad():
        assert same(model(*x), ref)


# ---- groups split into parts sized in Python -----------------------------------------------------
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNet V2's unit: half the channels pass, half go through a branch, then shuffle."""

    def __init__(self, c: int, both: bool) -> None:
        super().__init__()
        self.both = both
        self.conv1 = nn.Conv2d(c // 2, c // 2, 1)
        self.conv2 = nn.Conv2d(c // 2, c // 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        left = self.conv2(x1) if self.both else x1
        return channel_shuffle(torch.cat((left, torch.relu(self.conv1(x2))), 1), 2)


class ShuffleNet(nn.Module):
    def __init__(self, c: int, both: bool, n: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[ShuffleBlock(c, both) for _ in range(n)])
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize(("c", "both", "n"), [(2, False, 1), (2, True, 2), (2, True, 3), (4, False, 1), (8, True, 2), (16, False, 3)])
def test_channel_shuffle_keeps_min_channels_in_every_tensor(c: int, both: bool, n: int) -> None:
    """Issue #20: refused with "pruning would leave 'blocks.0.conv1.weight' with no entries"."""
    torch.manual_seed(0)
    model = ShuffleNet(c, both, n).eval()
    x = torch.randn(2, 3, 8, 8)
    ts.prune_channels_(model, x, ratio=0.5)
    for p in model.parameters():
        assert all(s >= 1 for s in p.shape)
    model(x).sum().backward()


def test_split_parts_lose_channels_in_proportion() -> None:
    """One conv's output split in Python-sized parts (RAFT's context encoder): a criterion scoring one
    part lower (bound to fewer tensors) would otherwise empty it; each part keeps about half."""

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 24, 1)
            self.a1, self.a2, self.a3 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)
            self.b = nn.Conv2d(8, 16, 1)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            h, ctx = torch.split(y, [self.a1.in_channels, y.shape[1] - self.a1.in_channels], dim=1)
            h = self.a3(self.a2(self.a1(h) + h) + h) + h
            return self.fc((h + self.b(ctx)).mean((2, 3)))

    model = Split().eval()
    with torch.no_grad():
        model.conv.weight[16:] *= 0.01  # the context part scores far lower
    cg = ts.graph.groups(model, torch.randn(1, 3, 4, 4))
    (g,) = [g for g in cg if ("conv.weight", 0) in g.producers]
    assert sorted(len(s) for s in cg.segments(g)) == [8, 16]
    plan = ts.prune_channels_(model, torch.randn(1, 3, 4, 4), ratio=0.5)
    assert model.conv.out_channels == 12 and model.b.in_channels == 4
    assert {r["id"]: r["kept"] for r in plan.groups}[g.id] == 12
