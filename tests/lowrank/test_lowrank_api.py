"""``factorize_``: full rank is a no-op on outputs, MACs drop as the plan says (the profiler
agrees), layers that would grow are skipped, bad input leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.lowrank import FactorizeConfig, cp_max_rank, factorize_


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(1, 2)),
        nn.ReLU(),
        nn.Conv2d(12, 16, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 3 * 6, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))


def _state(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return [f"{n}:{type(m).__name__}" for n, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()
    }


def _unchanged(model: nn.Module, before: tuple[list[str], dict[str, torch.Tensor]]) -> bool:
    mods, sd = _state(model)
    return mods == before[0] and sd.keys() == before[1].keys() and all(torch.equal(sd[k], before[1][k]) for k in sd)


CONVS = ("0", "3", "5")


@pytest.mark.parametrize("method", ["svd", "tucker", "cp", "spatial", "separable"])
def test_full_rank_reproduces_every_layer(method: str) -> None:
    model = _net()
    x = _x()
    ref = model(x)
    if method == "cp":  # the exact CP rank differs per kernel: one layer at a time
        for name in CONVS:
            w = model.get_submodule(name).weight
            factorize_(model, FactorizeConfig(method="cp", rank=cp_max_rank(w.shape), modules=name, only_if_smaller=False), x)
    else:
        plan = factorize_(model, FactorizeConfig(method=method, rank=1.0, only_if_smaller=False), x)
        assert {p.name for p in plan.layers} == ({"0", "3", "5", "8", "10"} if method == "svd" else set(CONVS))
        assert all(p.ranks == p.max_ranks and p.rel_error < 1e-6 for p in plan.layers)
    assert all(isinstance(model.get_submodule(n), nn.Sequential) for n in CONVS)
    assert (model(x) - ref).abs().max() < 1e-4


@pytest.mark.parametrize(
    "cfg",
    [
        FactorizeConfig(method="svd", rank=0.25),
        FactorizeConfig(method="tucker", rank=0.5),
        FactorizeConfig(method="cp", rank=4),
        FactorizeConfig(method="spatial", energy=0.6),
        FactorizeConfig(method="separable", rank=1),
        FactorizeConfig(method="tucker", target_macs=0.4),
        FactorizeConfig(method="svd", target_params=0.5, scope="model"),
        FactorizeConfig(method="spatial", target_macs=0.6, scope="model"),
    ],
    ids=lambda c: f"{c.method}-{c.rank or c.energy or c.target_macs or c.target_params}-{c.scope}",
)
def test_macs_drop_as_claimed_and_profiler_agrees(cfg: FactorizeConfig) -> None:
    model = _net()
    x = _x()[:1]
    before = ts.profile(model, x, latency=False, size=False)
    plan = factorize_(model, cfg, x)
    after = ts.profile(model, x, latency=False, size=False)
    assert plan.layers and plan.macs_before == before.macs
    assert after.macs == plan.macs_after < before.macs  # the analytic count is the profiler's
    assert after.params == plan.params_after < before.params
    assert all(p.macs_after < p.macs_before and p.params_after < p.params_before for p in plan.layers)
    if cfg.scope == "layer" and cfg.target_macs is not None:
        assert all(p.macs_after <= cfg.target_macs * p.macs_before for p in plan.layers)
    if cfg.scope == "model":
        frac = cfg.target_macs or cfg.target_params
        got = after.macs / before.macs if cfg.target_macs else after.params / before.params
        assert frac * 0.7 < got <= frac
    assert model(x).shape == (1, 10)


def test_analytic_macs_of_a_tucker_layer() -> None:
    conv = nn.Conv2d(32, 64, 3, padding=1)
    model = nn.Sequential(conv)
    x = torch.randn(1, 32, 10, 10)
    plan = factorize_(model, FactorizeConfig(method="tucker", rank=8), x)
    hw = 10 * 10
    assert plan.layers[0].macs_before == hw * 64 * 32 * 9
    assert plan.layers[0].macs_after == hw * (32 * 8 + 8 * 8 * 9 + 8 * 64)
    assert ts.profile(model, x, latency=False, size=False).macs == plan.layers[0].macs_after


def test_layers_that_would_grow_are_left_alone_and_said_so() -> None:
    model = _net()
    plan = factorize_(model, FactorizeConfig(method="tucker", rank=1.0), _x())  # full rank: always larger
    assert not plan.layers and {s.name for s in plan.skipped} == set(CONVS)
    assert all("not less than" in s.reason for s in plan.skipped)
    assert isinstance(model[0], nn.Conv2d)
    # a depthwise conv (groups > 1) is listed, not touched
    dw = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 32, 3))
    plan = factorize_(dw, FactorizeConfig(method="tucker", rank=4), torch.randn(1, 8, 9, 9))
    assert [s.name for s in plan.skipped] == ["0"] and "groups=8" in plan.skipped[0].reason
    assert [p.name for p in plan.layers] == ["1"]


def test_vbmf_ranks_on_a_planted_low_rank_layer() -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(120, 80)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 6, generator=g) @ torch.randn(6, 120, generator=g) + 0.05 * torch.randn(80, 120, generator=g))
    plan = factorize_(nn.Sequential(lin), FactorizeConfig(method="svd", rank="vbmf"))
    assert plan.layers[0].ranks == [6]


@pytest.mark.parametrize(
    "cfg,match",
    [
        (FactorizeConfig(method="svd", rank=11), "larger than layer"),
        (FactorizeConfig(method="tucker", rank=17), "larger than layer"),
        (FactorizeConfig(method="tucker", rank=2, modules="8"), "Linear has no tucker"),
        (FactorizeConfig(method="svd", rank=2, modules="1"), "BatchNorm2d has no svd"),
        (FactorizeConfig(method="svd", rank=2, modules="conv9"), "selects no module"),
        (FactorizeConfig(method="svd", rank=2, modules="head.*"), "selects no module"),
        (FactorizeConfig(method="cp", rank=2, modules=("1", "2")), "BatchNorm2d"),
        (FactorizeConfig(method="tucker", target_macs=0.001, scope="model"), "cannot be reached"),
    ],
)
def test_bad_input_raises_and_leaves_the_model_unchanged(cfg: FactorizeConfig, match: str) -> None:
    model = _net()
    before = _state(model)
    with pytest.raises(ConfigError, match=match):
        factorize_(model, cfg, _x())
    assert _unchanged(model, before)


def test_a_layer_type_with_no_factorization_at_all() -> None:
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Flatten())
    before = _state(model)
    with pytest.raises(ConfigError, match="found no layer"):
        factorize_(model, FactorizeConfig(method="tucker", rank=2), torch.randn(1, 4, 10))
    with pytest.raises(ConfigError, match="Conv1d has no svd"):
        factorize_(model, FactorizeConfig(method="svd", rank=2, modules="0"), torch.randn(1, 4, 10))
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"energy": 0.0},
        {"energy": 1.5},
        {"energy": -0.2},
        {"rank": 0},
        {"rank": 1.5},
        {"rank": "auto"},
        {"rank": "vbmf", "method": "separable"},
        {"rank": 2, "energy": 0.9},
        {},
        {"method": "qr", "rank": 2},
        {"rank": 2, "scope": "model"},
        {"target_macs": 0.5, "scope": "global"},
        {"rank": 2, "max_iter": 0},
        {"rank": 2, "modules": 3},
    ],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        FactorizeConfig(**kwargs)


def test_config_round_trip() -> None:
    for cfg in (
        FactorizeConfig(method="cp", rank=8, modules=("features.*",), exclude="features.0", seed=3),
        FactorizeConfig(method="spatial", target_macs=0.5, scope="model", only_if_smaller=False),
        FactorizeConfig(method="tucker", rank="vbmf"),
    ):
        assert FactorizeConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown FactorizeConfig"):
        FactorizeConfig.from_dict({"rank": 2, "ranks": 3})


def test_energy_one_is_identity_on_outputs() -> None:
    model = _net()
    x = _x()
    ref = model(x)
    plan = factorize_(model, FactorizeConfig(method="svd", energy=1.0, only_if_smaller=False), x)
    assert len(plan.layers) == 5
    assert (model(x) - ref).abs().max() < 1e-4


def test_inside_of_factorized_layers_is_not_factorized_again() -> None:
    model = ts.create_model("zoo:conv2", input_shape=(1, 12, 12))
    first = factorize_(model, FactorizeConfig(method="tucker", rank=0.25))
    assert [p.name for p in first.layers] == ["features.2"]
    second = factorize_(model, FactorizeConfig(method="svd", rank=4, modules="features.*"))
    assert [p.name for p in second.layers] == ["features.0"]
    assert isinstance(model.features[2].core, nn.Conv2d)


def test_train_mode_dtype_and_requires_grad_follow_the_original() -> None:
    model = _net().double().train()
    model[3].requires_grad_(False)
    factorize_(model, FactorizeConfig(method="tucker", rank=2), _x().double())
    assert model[3].training and model[3].core.weight.dtype == torch.float64
    assert not any(p.requires_grad for p in model[3].parameters())
    assert all(p.requires_grad for p in model[0].parameters())
