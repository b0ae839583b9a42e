"""Feature taps (hooks removed, also on errors; clear errors for unknown names) and layer mapping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.distill.mapping import auto_taps, map_by_depth, map_by_name, map_layers
from torchslim.distill.taps import FeatureTaps, parse_tap
from torchslim.errors import ConfigError
from torchslim.zoo.models import create_zoo_model


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_taps_record_outputs_and_remove_their_hooks():
    model = _mlp()
    x = torch.randn(3, 4)
    with FeatureTaps(model, ["0", "1"]) as taps:
        assert _hooks(model) == 2
        y = model(x)
        torch.testing.assert_close(taps["1"], torch.relu(model[0](x)))
        assert [t.shape for t in taps.collect()] == [torch.Size([3, 8])] * 2
        assert taps["1"].requires_grad  # students keep the graph
    assert _hooks(model) == 0
    torch.testing.assert_close(model(x), y)


def test_taps_are_removed_when_the_block_raises():
    model = _mlp()
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTaps(model, ["1"]):
            raise RuntimeError("boom")
    assert _hooks(model) == 0


def test_unknown_tap_names_the_module_and_close_matches():
    model = create_zoo_model("lenet300")
    with pytest.raises(ConfigError, match=r"student \(LeNet300\) has no module named 'relu3'.*close matches: relu"):
        FeatureTaps(model, ["relu3"], role="student")
    assert _hooks(model) == 0
    with pytest.raises(ConfigError, match="tuple index"):
        parse_tap("fc1#x")


def test_tuple_items_are_selected_with_hash_index():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            out, _ = self.attn(x, x, x, need_weights=True, average_attn_weights=False)
            return out

    model = Block()
    with FeatureTaps(model, ["attn", "attn#1"], detach=True) as taps:
        model(torch.randn(2, 5, 8))
        assert taps["attn"].shape == (2, 5, 8) and taps["attn#1"].shape == (2, 2, 5, 5)
        assert not taps["attn#1"].requires_grad
    with FeatureTaps(model, ["attn#4"]) as taps, pytest.raises(ConfigError, match="item 4"):
        model(torch.randn(2, 5, 8))


def test_a_tap_that_did_not_run_says_so():
    model = _mlp()
    with FeatureTaps(model, ["2"]) as taps, pytest.raises(ConfigError, match="recorded nothing"):
        taps["2"]


def test_depth_and_name_mapping():
    assert map_by_depth(["a", "b", "c"], ["t0", "t1", "t2", "t3", "t4", "t5"]) == {"a": "t1", "b": "t3", "c": "t5"}
    assert map_by_depth(["a", "b"], ["t0"]) == {"a": "t0", "b": "t0"}
    assert map_by_name(["fc1"], ["fc1", "fc2"]) == {"fc1": "fc1"}
    assert map_layers(["x"], ["y"], {"x": "y"}) == {"x": "y"}
    with pytest.raises(ConfigError, match="teacher has no layer"):
        map_by_name(["fc9"], ["fc1"])
    with pytest.raises(ConfigError, match="both sides"):
        map_by_depth([], ["t"])
    with pytest.raises(ConfigError, match="mapping must be one of"):
        map_layers(["x"], ["y"], "width")


def test_auto_taps_find_stage_ends():
    assert auto_taps(create_zoo_model("lenet300"), (torch.zeros(2, 1, 28, 28),)) == ["relu1", "relu2"]
    resnet = create_zoo_model("resnet20", (3, 16, 16), 10)
    assert auto_taps(resnet, (torch.zeros(2, 3, 16, 16),), "maps") == ["layers.2", "layers.5", "layers"]
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 3)
    assert auto_taps(encoder, (torch.zeros(1, 4, 8),), "layers") == ["layers.0", "layers.1", "layers.2"]
    with pytest.raises(ConfigError, match="no feature layers"):
        auto_taps(nn.Sequential(nn.Linear(4, 2)), (torch.zeros(2, 4),))
