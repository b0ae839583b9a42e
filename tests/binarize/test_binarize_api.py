"""``binarize_``: layer choice, bad input, save/load round trips, training, distillation, summary."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as ts
from torchslim._modelinfo import model_info
from torchslim.binarize import (
    BinarizeConfig,
    BinaryConv2d,
    BinaryLinear,
    binarize_,
    binary_layers,
    set_backend_,
    summary,
)
from torchslim.errors import ConfigError

METHODS = ["bnn", "xnor", "bireal", "bwn"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _snapshot(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    types = [(n, type(m).__name__) for n, m in model.named_modules()]
    return types, {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, snap: tuple) -> bool:
    types, sd = snap
    now = model.state_dict()
    return types == [(n, type(m).__name__) for n, m in model.named_modules()] and set(now) == set(sd) and all(
        torch.equal(now[k], v) for k, v in sd.items()
    )


# --------------------------------------------------------------------------- config


def test_config_round_trip_and_validation():
    cfg = BinarizeConfig(method="xnor", modules=["features.*"], skip="classifier.0", scale_activations=True, word_bits=64)
    assert cfg.modules == ("features.*",) and cfg.skip == ("classifier.0",)
    with pytest.warns(DeprecationWarning, match="exclude is deprecated, use skip="):
        old = BinarizeConfig(method="xnor", modules=["features.*"], exclude="classifier.0", scale_activations=True, word_bits=64)
    assert old == cfg and "exclude" not in old.to_dict()
    assert BinarizeConfig.from_dict(cfg.to_dict()) == cfg
    for bad, match in [
        ({"method": "ternary"}, "bnn, xnor, bireal, bwn"),
        ({"method": "bnn", "scale_activations": True}, "XNOR-Net option"),
        ({"word_bits": 16}, "32 or 64"),
        ({"keep_first": "yes"}, "True or False"),
        ({"modules": 3}, "module name"),
    ]:
        with pytest.raises(ConfigError, match=match):
            BinarizeConfig(**bad)
    with pytest.raises(ConfigError, match="unknown BinarizeConfig field"):
        BinarizeConfig.from_dict({"method": "bnn", "bits": 1})
    assert BinarizeConfig(method="bireal").resolved_shortcut and not BinarizeConfig(method="xnor").resolved_shortcut
    assert BinarizeConfig(method="bnn").resolved_replace_relu and not BinarizeConfig(method="bwn").resolved_replace_relu


# --------------------------------------------------------------------------- choosing layers


def test_first_and_last_layers_are_kept_by_default():
    model = ts.create_model("zoo:lenet5")
    plan = binarize_(model, BinarizeConfig(method="xnor"))
    assert plan.layers == ["features.3", "classifier.0", "classifier.2"]
    assert plan.kept == {"features.0": "first layer", "classifier.4": "last layer"}
    assert isinstance(model.features[3], BinaryConv2d) and isinstance(model.classifier[2], BinaryLinear)
    assert type(model.features[0]) is nn.Conv2d and type(model.classifier[4]) is nn.Linear
    assert all(type(model.get_submodule(n)) is nn.Hardtanh for n in plan.activations) and len(plan.activations) == 4


def test_keep_first_last_modules_and_exclude():
    model = ts.create_model("zoo:lenet5")
    plan = binarize_(model, BinarizeConfig(method="bnn", keep_first=False, keep_last=False, exclude=("classifier.0",)))
    assert plan.layers == ["features.0", "features.3", "classifier.2", "classifier.4"]
    assert plan.kept == {"classifier.0": "excluded"}
    model = ts.create_model("zoo:lenet5")
    plan = binarize_(model, BinarizeConfig(method="bwn", modules=["features.*"]))
    assert plan.layers == ["features.3"] and plan.activations == []  # BWN keeps ReLU
    assert type(model.features[1]) is nn.ReLU


def test_forward_order_decides_first_and_last():
    class Reversed(nn.Module):  # registered last-to-first
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(16, 3)
            self.mid = nn.Linear(16, 16)
            self.stem = nn.Linear(8, 16)

        def forward(self, x):
            return self.head(torch.tanh(self.mid(torch.tanh(self.stem(x)))))

    model = Reversed()
    plan = binarize_(model, BinarizeConfig(method="xnor"), example_inputs=torch.randn(2, 8))
    assert plan.layers == ["mid"] and plan.kept == {"stem": "first layer", "head": "last layer"}


@pytest.mark.parametrize(
    "cfg,match",
    [
        (BinarizeConfig(modules=["conv1d"]), "Conv1d, which has no binary form"),
        (BinarizeConfig(modules=["nothing*"]), "selects no module"),
        (BinarizeConfig(modules=["fc"]), "no layer to binarize"),  # fc is the last layer, kept
    ],
)
def test_bad_selection_raises_and_leaves_the_model_unchanged(cfg, match):
    model = nn.Sequential()
    model.add_module("conv1d", nn.Conv1d(2, 4, 3))
    model.add_module("relu", nn.ReLU())
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(24, 3))
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match=match):
        binarize_(model, cfg, example_inputs=torch.randn(1, 2, 8))
    assert _same(model, snap)


def test_binarizing_twice_has_nothing_left_and_changes_nothing():
    model = ts.create_model("zoo:lenet300")
    binarize_(model, BinarizeConfig(method="bnn"))
    snap, plans = _snapshot(model), len(model_info(model).plans)
    with pytest.raises(ConfigError, match="fc2: already binary"):
        binarize_(model, BinarizeConfig(method="xnor"))
    assert _same(model, snap) and len(model_info(model).plans) == plans


def test_bad_arguments():
    with pytest.raises(ConfigError, match="BinarizeConfig"):
        binarize_(nn.Linear(2, 2), "bnn")
    with pytest.raises(ConfigError, match="unknown BinarizeConfig field 'methd' \\(did you mean 'method'"):
        binarize_(nn.Linear(2, 2), methd="bnn")
    with pytest.raises(ConfigError, match="float, auto, c, torch"):
        set_backend_(nn.Linear(2, 2), "gpu")


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", ["zoo:lenet300", "zoo:lenet5"])
def test_save_load_round_trip_is_exact(tmp_path, method, spec):
    model = ts.create_model(spec)
    binarize_(model, BinarizeConfig(method=method, scale_activations=method == "xnor", word_bits=64 if method == "bnn" else 32))
    with torch.no_grad():  # move the latent weights off their initial values
        for layer in binary_layers(model).values():
            layer.weight.add_(torch.randn_like(layer.weight) * 0.01)
    model.eval()
    ts.save(model, tmp_path / "m")
    loaded = ts.load(tmp_path / "m")
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    ts.save(loaded, tmp_path / "again")  # a reloaded model saves to the same bytes
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------- training


def _batch_loss(model: nn.Module, data) -> float:
    x, y = next(iter(data.loader("train", batch_size=256, shuffle=False)))
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("method", METHODS)
def test_fit_reduces_the_loss_through_the_ste(method):
    data = ts.load_data("digits")
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet300", data=data)
    binarize_(model, BinarizeConfig(method=method))
    signs = model.fc2.weight.detach().sign().clone()
    before = _batch_loss(model, data)
    ts.fit(model, data, ts.TrainConfig(epochs=2, lr=1e-3, optimizer="adam", max_steps_per_epoch=15, device="cpu"), progress=False)
    after = _batch_loss(model, data)
    assert after < 0.9 * before
    assert not torch.equal(model.fc2.weight.detach().sign(), signs)  # binary weights flipped


@pytest.mark.skipif(importlib.util.find_spec("torchslim.distill") is None, reason="no distill family")
def test_distilling_from_the_float_model():
    from torchslim.distill import DistillConfig, distill

    data = ts.load_data("digits")
    torch.manual_seed(0)
    teacher = ts.create_model("zoo:lenet300", data=data)
    ts.fit(teacher, data, ts.TrainConfig(epochs=1, lr=1e-3, optimizer="adam", max_steps_per_epoch=20, device="cpu"), progress=False)
    student = copy.deepcopy(teacher)
    binarize_(student, BinarizeConfig(method="xnor"))
    before = _batch_loss(student, data)
    cfg = DistillConfig(loss="kd", train=ts.TrainConfig(epochs=1, lr=1e-3, optimizer="adam", max_steps_per_epoch=15, device="cpu"))
    result = distill(student, teacher, data, cfg, progress=False)
    assert result.train.epochs_run == 1 and _batch_loss(student, data) < before
    assert isinstance(student.fc2, BinaryLinear) and type(teacher.fc2) is nn.Linear


# --------------------------------------------------------------------------- summary


def test_summary_counts_binary_macs_and_packed_bytes():
    model = ts.create_model("zoo:lenet5")
    binarize_(model, BinarizeConfig(method="xnor"))
    s = summary(model)
    by = {r.name: r for r in s.layers}
    assert by["features.3"].binary_macs == 16 * 10 * 10 * 6 * 25  # output pixels x fan-in
    assert by["classifier.0"].binary_macs == 400 * 120
    assert 0 < s.binary_mac_share < 1 and s.total_macs == s.profile.macs
    assert by["classifier.0"].packed_bytes == 120 * 13 * 4 + 120 * 4  # 400 signs -> 13 words, + alpha
    assert s.compression > 20
    model = ts.create_model("zoo:lenet5")
    binarize_(model, BinarizeConfig(method="bwn"))
    s = summary(model)
    assert s.binary_macs == 0 and s.binary_weight_macs > 0
