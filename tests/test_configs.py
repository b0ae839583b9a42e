"""Every config is a frozen ConfigDict: it round-trips through JSON, refuses unknown keys, and
takes overrides by field name (``C.build(cfg, **overrides)``, what every verb does)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from torchslim._config import ConfigDict
from torchslim.binarize import BinarizeConfig
from torchslim.distill.api import DistillConfig
from torchslim.errors import ConfigError
from torchslim.lowrank import FactorizeConfig
from torchslim.pack.cluster import ClusterConfig
from torchslim.prune import Budget, LotteryConfig, OneShotConfig, PruneConfig, SparsifyConfig
from torchslim.quantize import QuantConfig
from torchslim.search.api import SearchConfig
from torchslim.train import TrainConfig

CONFIGS = [
    QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=32, skip=("fc3",), layer_bits={"fc1": 8}),
    BinarizeConfig(method="bireal", modules=("features.*",), skip=("features.0",)),
    FactorizeConfig(method="svd", rank=8, skip=("fc3",)),
    ClusterConfig(bits=4, modules=("re:fc[12]",), layer_bits={"fc1": 6}),
    OneShotConfig(),
    SearchConfig(),
    LotteryConfig(rounds=2, overrides={"fc3": 0.1}),
    DistillConfig(loss="hint", taps=("a",), teacher_taps=("b",), train=TrainConfig(lr=0.1)),
    TrainConfig(epochs=2, grad_clip=1.0),
    PruneConfig(ratio=0.3, ratios={"layer4.*": 0.5}, skip=("fc",), round_to=8),
    PruneConfig(target=Budget(macs=0.5)),
    SparsifyConfig(sparsity=0.8, scope="global", modules=("features.*",), overrides={"fc": 0.5}),
    SparsifyConfig(pattern="2:4"),
    Budget(params=0.4, tolerance=0.05),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_round_trip_through_json(cfg: ConfigDict) -> None:
    cls = type(cfg)
    assert dataclasses.is_dataclass(cfg) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert isinstance(cfg, ConfigDict)
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_unknown_key_refused_with_the_known_fields(cfg: ConfigDict) -> None:
    cls = type(cfg)
    with pytest.raises(ConfigError, match=rf"unknown {cls.__name__} field 'no_such_field'.*known: "):
        cls.from_dict({**cfg.to_dict(), "no_such_field": 1})
    with pytest.raises(ConfigError, match="no_such_field"):
        cls.build(cfg, no_such_field=1)


def test_build_is_config_plus_overrides() -> None:
    assert QuantConfig.build(None, bits=4, mode="weight-only") == QuantConfig(bits=4, mode="weight-only")
    base = QuantConfig(mode="weight-only")
    assert QuantConfig.build(base, bits=4) == dataclasses.replace(base, bits=4)
    assert QuantConfig.build({"mode": "weight-only"}, bits=4) == QuantConfig(mode="weight-only", bits=4)
    with pytest.raises(ConfigError, match="did you mean 'bits'"):
        QuantConfig.build(base, bitz=4)
    with pytest.raises(ConfigError, match="QuantConfig, a dict of its fields or None"):
        QuantConfig.build("static")


@pytest.mark.parametrize(
    ("cls", "bad", "match"),
    [
        (PruneConfig, {"ratio": 1.5}, "ratio must be a fraction"),
        (PruneConfig, {"ratio": 0.5, "importance": "l7"}, "l7"),
        (PruneConfig, {"ratio": 0.5, "round_to": 0}, "round_to"),
        (PruneConfig, {"ratio": 0.5, "skip": ("re:(",)}, "regular expression"),
        (SparsifyConfig, {"sparsity": 2.0}, "sparsity"),
        (SparsifyConfig, {"sparsity": 0.5, "scope": "model"}, "scope"),
        (SparsifyConfig, {"pattern": "2:4", "sparsity": 0.7}, "2:4"),
        (SparsifyConfig, {}, "needs sparsity"),
    ],
)
def test_new_configs_validate_when_built(cls, bad, match) -> None:
    with pytest.raises(ConfigError, match=match):
        cls(**bad)


def test_old_field_names_warn_and_mean_the_new_one() -> None:
    with pytest.warns(DeprecationWarning, match="exclude is deprecated, use skip="):
        old = FactorizeConfig(method="svd", rank=8, exclude=("fc3",))
    assert old == FactorizeConfig(method="svd", rank=8, skip=("fc3",)) and "exclude" not in old.to_dict()
    assert FactorizeConfig.from_dict({"method": "svd", "rank": 8}).skip == ()
    with pytest.raises(ConfigError, match="pass only skip="):
        FactorizeConfig(method="svd", rank=8, exclude=("a",), skip=("b",))


def test_defaults_are_the_field_defaults() -> None:
    assert PruneConfig.defaults()["round_to"] is None and SparsifyConfig.defaults()["overrides"] == {}
    assert "exclude" not in BinarizeConfig.defaults()


def test_verbs_take_a_config_or_overrides_and_keep_their_old_call_forms() -> None:
    import torch
    from torch import nn

    from torchslim.prune import prune_channels_, sparsify_

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    x = torch.randn(2, 8)
    a, b, c = net(), net(), net()
    sparsify_(a, 0.5)
    sparsify_(b, sparsity=0.5)
    sparsify_(c, SparsifyConfig(sparsity=0.5))
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[0].weight, c[0].weight)
    a, b = net(), net()
    prune_channels_(a, x, ratio=0.5)
    prune_channels_(b, PruneConfig(ratio=0.5), example_inputs=x)
    assert a[0].out_features == b[0].out_features == 8
    m = net()
    with pytest.warns(DeprecationWarning, match="ignore= is deprecated, use skip="):
        prune_channels_(m, x, ratio=0.5, ignore=["0"])
    assert m[0].out_features == 16
    with pytest.raises(ConfigError, match="'9' selects no module"):
        prune_channels_(net(), x, ratio=0.5, skip=["9"])
