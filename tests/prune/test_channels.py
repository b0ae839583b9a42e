"""Structured channel pruning: shapes really shrink, zeroed channels prune without changing
outputs, budgets are met, plans replay through save/load, bad input changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, UnsupportedOpError
from torchslim.graph import groups
from torchslim.prune.channels import Budget, prune_channels_

ZOO = ["lenet300", "lenet5", "conv4", "vgg11_bn", "resnet20", "mobilenetv2_small"]
TORCHVISION = ["resnet18", "mobilenet_v3_small", "densenet121", "convnext_tiny", "shufflenet_v2_x1_0",
               "efficientnet_b0", "regnet_y_400mf", "regnet_x_400mf", "squeezenet1_1", "googlenet", "swin_t"]


def _macs(model: nn.Module) -> int:
    return ts.profile(model, latency=False, size=False).macs


@pytest.mark.parametrize("spec", [f"zoo:{n}" for n in ZOO] + [f"torchvision:{n}" for n in TORCHVISION])
def test_half_ratio_runs_forward_backward_and_cuts_macs(spec: str) -> None:
    model = ts.create_model(spec)
    (x,) = ts.example_inputs(model)
    before, out_before = _macs(model), model(x).shape
    params_before = sum(p.numel() for p in model.parameters())
    ids = {n: id(m) for n, m in model.named_modules()}
    prune_channels_(model, ratio=0.5)
    out = model(x)
    out.sum().backward()
    assert out.shape == out_before
    assert _macs(model) <= 0.6 * before
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert {n: id(m) for n, m in model.named_modules()} == ids  # same module objects


def _zero_outgoing(model: nn.Module, cg, group, idx: list[int], zero_channels) -> None:
    """Zero every consumer weight (dimension 1 of >=2-D weights) that reads the chosen channels."""
    chans = {group.channels[i] for i in idx}
    params = dict(model.named_parameters())
    for name, dim in group.members:
        t = params.get(name)
        if t is not None and t.dim() >= 2 and dim == 1:
            zero_channels(model, cg, name, dim, chans)


@pytest.mark.parametrize("spec", ["zoo:lenet5", "zoo:conv4", "zoo:vgg11_bn", "zoo:resnet20", "zoo:mobilenetv2_small",
                                  "torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:densenet121",
                                  "torchvision:regnet_x_400mf"])
def test_channels_with_zeroed_outgoing_weights_prune_without_changing_outputs(spec: str, zero_channels) -> None:
    model = ts.create_model(spec).eval()
    (x,) = ts.example_inputs(model, batch_size=2)
    cg = groups(model, x)
    removed: set[int] = set()
    for g in cg.groups:
        take = list(range(0, g.size, 3))[: max(1, g.size // 3)]
        if len(take) >= g.size:
            continue
        _zero_outgoing(model, cg, g, take, zero_channels)
        removed.update(g.channels[i] for i in take)
    with torch.no_grad():
        ref = model(x)
    from torchslim.graph.surgery import slice_model_

    slice_model_(model, cg.keep_indices(removed), example_inputs=x)
    with torch.no_grad():
        got = model(x)
    assert (got - ref).abs().max().item() < 1e-5
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in ts.create_model(spec).parameters())


def test_identity_ratio_zero_is_a_no_op() -> None:
    model = ts.create_model("zoo:resnet20")
    state = copy.deepcopy(model.state_dict())
    plan = prune_channels_(model, ratio=0.0)
    assert plan.removed_channels == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_round_to_and_min_channels() -> None:
    model = ts.create_model("zoo:vgg11_bn")
    plan = prune_channels_(model, ratio=0.6, round_to=8, min_channels=16)
    for g in plan.groups:
        assert g["kept"] % 8 == 0 or g["kept"] == g["size"]
        assert g["kept"] >= 16
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_macs_budget_is_met_within_two_percent(fraction: float) -> None:
    model = ts.create_model("zoo:resnet20")
    before = _macs(model)
    plan = prune_channels_(model, target=Budget(macs=fraction))
    got = _macs(model) / before
    assert abs(got - fraction) <= 0.02 * fraction + 1e-9 or (got <= fraction and fraction - got <= 0.02)
    assert plan.achieved["macs"] == pytest.approx(got, rel=1e-6)


def test_global_ranking_and_per_module_ratios() -> None:
    model = ts.create_model("zoo:vgg11_bn")
    plan = prune_channels_(model, ratio=0.4, global_ranking=True)
    kept = [g["kept"] / g["size"] for g in plan.groups]
    assert max(kept) - min(kept) > 0.05  # not uniform
    assert plan.removed_channels == pytest.approx(0.4 * plan.total_channels, abs=len(plan.groups) + 1)
    model = ts.create_model("zoo:resnet20")
    last_conv = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]
    plan = prune_channels_(model, ratio=0.0, ratios={last_conv.rsplit(".", 1)[0] + ".*": 0.5})
    assert 0 < plan.removed_channels < plan.total_channels // 4
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in ts.create_model("zoo:resnet20").parameters())


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "fpgm", "random", "lamp"])
def test_every_registered_criterion_prunes(importance: str) -> None:
    model = ts.create_model("zoo:resnet20")
    before = _macs(model)
    prune_channels_(model, ratio=0.3, importance=importance)
    assert _macs(model) < before
    assert f"prune.importance.{importance}" in ts.list_methods("prune.importance")


def test_taylor_needs_data_and_uses_gradients() -> None:
    data = ts.load_data("mnist")
    model = ts.create_model("zoo:lenet5", data=data)
    with pytest.raises(ConfigError, match="needs gradients"):
        prune_channels_(model, ratio=0.3, importance="taylor")
    prune_channels_(model, ratio=0.3, importance="taylor", data=data.loader("train", batch_size=64))
    assert model.features[0].out_channels < 6
    assert all(p.grad is None for p in model.parameters())


def test_ignored_modules_keep_their_channels() -> None:
    model = ts.create_model("zoo:lenet300")
    prune_channels_(model, ratio=0.5, skip=["fc2"])
    # fc2 is left whole: neither the channels it reads (fc1's outputs) nor its own outputs change
    assert (model.fc1.out_features, model.fc2.in_features, model.fc2.out_features) == (300, 300, 100)
    model = ts.create_model("zoo:lenet300")
    prune_channels_(model, ratio=0.5)
    assert (model.fc1.out_features, model.fc2.out_features) == (150, 50)


def test_save_load_replays_the_plan(tmp_path) -> None:
    model = ts.create_model("zoo:resnet20")
    prune_channels_(model, ratio=0.4)
    out = ts.save(model, tmp_path / "pruned")
    loaded = ts.load(out)
    (x,) = ts.example_inputs(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 0.5, "importance": "l3"}, "unknown prune.importance"),
        ({"target": Budget(macs=0.001)}, "cannot be met"),
        ({}, "exactly one"),
        ({"ratio": 0.5, "round_to": 0}, "round_to"),
    ],
)
def test_bad_input_leaves_model_unchanged(kwargs, match) -> None:
    model = ts.create_model("zoo:resnet20")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=match):
        prune_channels_(model, **kwargs)
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_budget_validation() -> None:
    with pytest.raises(ConfigError):
        Budget()
    with pytest.raises(ConfigError):
        Budget(macs=0.5, params=0.5)
    with pytest.raises(ConfigError):
        Budget(macs=1.5)
    assert Budget.from_dict(Budget(params=0.4).to_dict()) == Budget(params=0.4)


def test_unsupported_op_names_op_and_module_and_can_be_ignored() -> None:
    lib = torch.library.Library("torchslim_prune_test", "FRAGMENT")
    lib.define("scramble(Tensor x) -> Tensor")
    lib.impl("scramble", lambda x: x.flip(-1) * 1.0, "CompositeExplicitAutograd")

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.mid = nn.Identity()
            self.b = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.ops.torchslim_prune_test.scramble(self.a(x)))

    model = Odd()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedOpError, match=r"torchslim_prune_test.scramble.*module '\(top\)'"):
        prune_channels_(model, torch.randn(1, 4), ratio=0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    prune_channels_(model, torch.randn(1, 4), ratio=0.5, skip=[""])
    assert model.a.out_features == 8


def test_groups_are_printable() -> None:
    model = ts.create_model("zoo:resnet20")
    cg = groups(model, ts.example_inputs(model))
    text = repr(cg)
    assert "ChannelGroup" in text and len(cg) >= 3
    from rich.console import Console

    con = Console(record=True, width=140)
    con.print(cg.table())
    assert "channels" in con.export_text()


def test_cli_prune_json_and_saved_dir(capsys, tmp_path) -> None:
    import json

    from torchslim.cli import main

    out = tmp_path / "p"
    code = main(["prune", "zoo:lenet300", "--data", "mnist", "--ratio", "0.5", "--out", str(out), "--json",
                 "--no-latency", "--finetune-epochs", "1", "--no-progress"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(stdout)
    assert d["after"]["params"] < d["before"]["params"]
    assert d["after"]["macs"] < 0.6 * d["before"]["macs"]
    assert 0 <= d["accuracy_after"] <= 1 and d["accuracy_before"] is not None
    assert d["prune"]["removed_channels"] == 150 + 50
    loaded = ts.load(out)
    assert loaded.fc1.out_features == 150


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--ratio", "1.5"], "ratio"),
        (["--ratio", "0.5", "--importance", "nope"], "unknown prune.importance"),
        ([], "exactly one"),
        (["--target-macs", "0.0001"], "cannot be met"),
    ],
)
def test_cli_prune_bad_input(capsys, tmp_path, argv, needle) -> None:
    from torchslim.cli import main

    code = main(["prune", "zoo:resnet20", "--out", str(tmp_path / "x"), "--no-latency", *argv])
    _, err = capsys.readouterr()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "x").exists()
