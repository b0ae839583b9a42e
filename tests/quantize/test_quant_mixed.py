"""Mixed precision: sensitivity leaves the model as it was; the allocation meets the budget and applies."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import QuantConfig, quantize_
from torchslim.quantize.mixed import allocate_bits, layer_sensitivity


def test_sensitivity_and_allocation(tmp_path) -> None:
    model = ts.create_model("zoo:lenet300").eval()
    x = torch.randn(32, 1, 28, 28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = layer_sensitivity(model, x, bits=(2, 4, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for per_bits in sens.values():
        assert per_bits[2] < per_bits[4] < per_bits[8]  # more bits, less noise
    alloc = allocate_bits(model, sens, budget_ratio=0.15)
    assert alloc.size_ratio <= 0.15 and alloc.bits["fc1"] < 8  # the big layer gives up bits first
    assert allocate_bits(model, sens, budget_ratio=1.0).bits == {"fc1": 8, "fc2": 8, "fc3": 8}
    cfg = QuantConfig(mode="weight-only", layer_bits=alloc.bits, granularity="channel")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    quantize_(model, cfg)
    assert model.fc1.scheme.bits == alloc.bits["fc1"]
    y = model(x)
    ts.save(model, tmp_path / "m")
    assert torch.equal(ts.load(tmp_path / "m")(x), y)


def test_bad_mixed_input() -> None:
    model = ts.create_model("zoo:lenet300")
    sens = layer_sensitivity(model, torch.randn(4, 1, 28, 28), bits=(4, 8))
    with pytest.raises(ConfigError, match="budget_ratio"):
        allocate_bits(model, sens, budget_ratio=0.0)
    with pytest.raises(ConfigError, match="cannot be met"):
        allocate_bits(model, sens, budget_ratio=0.05)
    with pytest.raises(ConfigError, match="layer_bits"):
        QuantConfig(mode="weight-only", layer_bits={"fc1": 12})
    with pytest.raises(ConfigError, match="not quantized"):
        quantize_(model, QuantConfig(mode="weight-only", layer_bits={"fc9": 4}))
    assert type(model.fc1) is torch.nn.Linear
