"""Contracts of the zoo registry and of every registered model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.errors import ConfigError, InputShapeError, SpecError
from torchslim.zoo import models as zoo
from torchslim.zoo.models import create_zoo_model, list_models, register_model, zoo_entry

# Exact parameter counts for each model's default input and class count.
PARAM_COUNTS = {
    "lenet300": 266_610,  # LeNet-300-100 on MNIST, as in the literature
    "lenet5": 61_706,
    "conv2": 4_301_642,  # lottery-ticket paper: 4.3M
    "conv4": 2_425_930,  # paper: 2.4M
    "conv6": 2_262_602,  # paper says 1.7M; its 1.1M conv weights match ours (1,145,408)
    "vgg11_bn": 9_228_362,
    "vgg16_bn": 14_724_042,  # ~15M for CIFAR
    "resnet20": 272_474,  # 0.27M (option-B projections add 2,752 over option A)
    "resnet56": 855_770,  # 0.86M
    "mobilenetv2_small": 700_490,
}
# Five 2x2 pools need 32x32 inputs.
NOT_FOR_MNIST = {"vgg11_bn", "vgg16_bn"}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_expected_model_is_registered():
    assert set(PARAM_COUNTS) <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_model_builds_and_forwards_default_input(name):
    entry = zoo_entry(name)
    model = create_zoo_model(name).eval()
    out = model(torch.randn(2, *entry.default_input_shape))
    assert out.shape == (2, entry.default_num_classes)
    assert torch.isfinite(out).all()
    assert model.training is False


@pytest.mark.parametrize("name", list_models())
def test_model_construction_is_deterministic_under_manual_seed(name):
    torch.manual_seed(3)
    a = create_zoo_model(name).state_dict()
    torch.manual_seed(3)
    b = create_zoo_model(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list_models())
def test_model_on_mnist_shapes(name):
    if name in NOT_FOR_MNIST:
        with pytest.raises(InputShapeError, match="32x32"):
            create_zoo_model(name, (1, 28, 28), 10)
        return
    model = create_zoo_model(name, (1, 28, 28), 10).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(("name", "count"), sorted(PARAM_COUNTS.items()))
def test_exact_parameter_counts(name, count):
    assert _params(create_zoo_model(name)) == count


def test_models_adapt_to_channels_size_and_classes():
    model = create_zoo_model("resnet20", (4, 48, 40), 7).eval()
    assert model(torch.randn(2, 4, 48, 40)).shape == (2, 7)
    model = create_zoo_model("conv4", (1, 16, 16), 3).eval()
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    model = create_zoo_model("lenet300", (1, 40), 10).eval()  # an MLP takes any shape
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)


def test_resnet_uses_projection_shortcuts_where_shape_changes():
    model = create_zoo_model("resnet20")
    projections = [
        b for b in model.modules() if isinstance(b, zoo.BasicBlock) and isinstance(b.shortcut, nn.Sequential)
    ]
    assert len(projections) == 2
    conv, bn = projections[0].shortcut
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(bn, nn.BatchNorm2d)


def test_mobilenet_blocks_and_width_multiplier():
    model = create_zoo_model("mobilenetv2_small")
    blocks = [m for m in model.modules() if isinstance(m, zoo.InvertedResidual)]
    assert len(blocks) == 17
    assert sum(b.use_residual for b in blocks) == 10
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise) and len(depthwise) == 17
    wide = create_zoo_model("mobilenetv2_small", width_mult=1.0)
    assert _params(wide) > _params(model)
    with pytest.raises(ConfigError, match="width_mult"):
        create_zoo_model("mobilenetv2_small", width_mult=0)
    with pytest.raises(ConfigError, match="does not accept"):
        create_zoo_model("lenet5", depth=3)


def test_list_models_filters_with_glob():
    assert list_models("conv*") == ["conv2", "conv4", "conv6"]
    assert list_models("resnet*") == ["resnet20", "resnet56"]
    assert list_models("nothing*") == []
    assert list_models() == sorted(list_models())


def test_unknown_model_suggests_a_close_name():
    with pytest.raises(SpecError, match="Did you mean 'lenet5'") as info:
        create_zoo_model("lenet_5")
    assert isinstance(info.value, ValueError)
    assert "resnet20" in str(info.value)  # lists the known models


@pytest.mark.parametrize(
    ("name", "shape", "fragment"),
    [
        ("lenet5", (1, 8, 8), "at least 12x12"),
        ("lenet5", (784,), r"\(C, H, W\)"),
        ("conv6", (3, 4, 4), "at least 8x8"),
        ("vgg16_bn", (3, 16, 16), "at least 32x32"),
        ("resnet20", (3, 32), r"\(C, H, W\)"),
        ("resnet20", (3, 0, 32), "positive integers"),
    ],
)
def test_bad_input_shapes_raise_input_shape_error(name, shape, fragment):
    with pytest.raises(InputShapeError, match=fragment):
        create_zoo_model(name, shape, 10)


def test_bad_num_classes_raises_config_error():
    with pytest.raises(ConfigError, match="num_classes"):
        create_zoo_model("lenet300", num_classes=0)


def test_register_model_adds_a_listable_entry_and_refuses_duplicates():
    name = "test_only_tiny_mlp"

    @register_model(name, default_input_shape=(4,), default_num_classes=2, paper="none")
    def tiny(input_shape, num_classes):
        """A tiny MLP for this test."""
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes))

    try:
        entry = zoo_entry(name)
        assert entry.description == "A tiny MLP for this test." and entry.default_input_shape == (4,)
        assert name in list_models("test_only_*")
        assert create_zoo_model(name)(torch.zeros(3, 4)).shape == (3, 2)
        with pytest.raises(ConfigError, match="already registered"):
            register_model(name)(tiny)
    finally:
        zoo._REGISTRY.pop(name, None)
