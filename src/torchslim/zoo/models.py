"""Reference models for compression experiments, and the registry that names them.

Every model adapts to its input (channels and size) and class count. Register your own with
:func:`register_model`; build any of them with :func:`create_zoo_model`.

Example:
    >>> import torch
    >>> model = create_zoo_model("lenet300")          # LeNet-300-100 for 1x28x28 MNIST digits
    >>> sum(p.numel() for p in model.parameters())
    266610
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError, InputShapeError, SpecError

__all__ = [
    "ZooEntry",
    "register_model",
    "list_models",
    "zoo_entry",
    "create_zoo_model",
    "LeNet300",
    "LeNet5",
    "ConvNet",
    "VGG",
    "BasicBlock",
    "CifarResNet",
    "InvertedResidual",
    "MobileNetV2Small",
]

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ZooEntry:
    """One registered zoo model.

    Attributes:
        name: Registry name (``"lenet300"``).
        factory: ``factory(input_shape, num_classes, **kwargs) -> nn.Module``.
        default_input_shape: Input shape of one sample the model is designed for.
        default_num_classes: Class count used when none is given.
        description: One line saying what the model is.
        paper: The paper the architecture comes from (empty if none).
    """

    name: str
    factory: ModelFactory
    default_input_shape: tuple[int, ...]
    default_num_classes: int
    description: str = ""
    paper: str = ""


_REGISTRY: dict[str, ZooEntry] = {}


def register_model(
    name: str,
    *,
    default_input_shape: Sequence[int] = (3, 32, 32),
    default_num_classes: int = 10,
    description: str = "",
    paper: str = "",
    overwrite: bool = False,
) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that registers a model factory under ``name``.

    Args:
        name: Registry name; must not be taken unless ``overwrite`` is set.
        default_input_shape: Shape of one input sample (no batch dimension).
        default_num_classes: Default number of output classes.
        description: One line for listings (defaults to the first docstring line).
        paper: Citation of the architecture's source.
        overwrite: Replace an existing entry of the same name.

    Raises:
        ConfigError: The name is taken, or a default is invalid.

    Example:
        A factory takes the input shape and class count and returns a new module::

            @register_model("tiny_mlp", default_input_shape=(4,), default_num_classes=2)
            def tiny_mlp(input_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))

            create_zoo_model("tiny_mlp")(torch.zeros(1, 4)).shape  # torch.Size([1, 2])
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a zoo model name must be a non-empty string; got {name!r}")
    shape = _check_shape(default_input_shape, "default_input_shape")
    classes = _check_classes(default_num_classes, "default_num_classes")

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY and not overwrite:
            raise ConfigError(f"zoo model {name!r} is already registered; pass overwrite=True to replace it")
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ZooEntry(
            name, factory, shape, classes, description or (doc[0] if doc else ""), paper
        )
        return factory

    return decorate


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a glob ``pattern``.

    Example:
        >>> list_models("resnet*")
        ['resnet20', 'resnet56']
    """
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def zoo_entry(name: str) -> ZooEntry:
    """The registry entry of ``name``.

    Raises:
        SpecError: No model of that name; the message lists the known ones and the closest match.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SpecError(f"unknown zoo model {name!r}.{hint} Known models: {', '.join(list_models())}")
    return entry


def create_zoo_model(
    name: str,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a zoo model for an input shape and class count (the entry's defaults when ``None``).

    Args:
        name: Registry name (see :func:`list_models`).
        input_shape: Shape of one input sample without the batch dimension, e.g. ``(1, 28, 28)``.
        num_classes: Number of output classes.
        **kwargs: Extra arguments of the model's factory (e.g. ``width_mult`` of
            ``mobilenetv2_small``).

    Returns:
        A new model in training mode, on the CPU, initialised from torch's global generator
        (seed it with ``torch.manual_seed`` for a reproducible model).

    Raises:
        SpecError: Unknown name.
        InputShapeError: The input has the wrong rank for the model or is too small.
        ConfigError: Invalid ``num_classes`` or factory arguments.
    """
    entry = zoo_entry(name)
    shape = entry.default_input_shape if input_shape is None else _check_shape(input_shape, "input_shape")
    classes = entry.default_num_classes if num_classes is None else _check_classes(num_classes, "num_classes")
    try:
        return entry.factory(shape, classes, **kwargs)
    except TypeError as exc:
        if kwargs:
            raise ConfigError(
                f"zoo model {name!r} does not accept the arguments {sorted(kwargs)}: {exc}"
            ) from exc
        raise
    except RuntimeError as exc:  # a shape that fails inside the feature extractor
        raise InputShapeError(
            f"zoo model {name!r} cannot take inputs of shape {shape} (default {entry.default_input_shape}): {exc}"
        ) from exc


def _check_shape(shape: Sequence[int], what: str) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise InputShapeError(
            f"{what} must be a non-empty sequence of positive integers, e.g. (3, 32, 32); got {shape!r}"
        )
    return dims


def _check_classes(num_classes: int, what: str) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"{what} must be a positive integer; got {num_classes!r}")
    return num_classes


def _image_shape(model: str, shape: tuple[int, ...], min_side: int) -> tuple[int, int, int]:
    """Check a ``(C, H, W)`` input shape with ``H, W >= min_side`` and return it."""
    if len(shape) != 3:
        raise InputShapeError(
            f"zoo model {model!r} takes images of shape (C, H, W); got input_shape {shape} ({len(shape)} dims)"
        )
    if min(shape[1:]) < min_side:
        raise InputShapeError(
            f"zoo model {model!r} needs images of at least {min_side}x{min_side} pixels; got "
            f"{shape[1]}x{shape[2]} (input_shape {shape})"
        )
    return shape  # type: ignore[return-value]


def _flat_features(features: nn.Module, shape: tuple[int, ...]) -> int:
    """Number of features ``features`` produces for one sample of ``shape`` (one run on zeros)."""
    with torch.no_grad():
        return int(features(torch.zeros(1, *shape)).numel())


def _init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal convs (fan-out, ReLU), zero conv biases, BatchNorm as identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- LeNets


class LeNet300(nn.Module):
    """LeNet-300-100: an MLP with hidden layers of 300 and 100 units (LeCun et al. 1998).

    Args:
        input_shape: Shape of one sample; it is flattened, so any shape works.
        num_classes: Number of output classes.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(math.prod(input_shape), 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(self.flatten(x))))))


class LeNet5(nn.Module):
    """LeNet-5: conv 6@5x5 (pad 2) - pool - conv 16@5x5 - pool - FC 120 - FC 84 - FC classes.

    Needs images of at least 12x12 (the second 5x5 conv must leave two pixels to pool).
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        channels = _image_shape("lenet5", tuple(input_shape), 12)[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(_flat_features(self.features, tuple(input_shape)), 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register_model(
    "lenet300",
    default_input_shape=(1, 28, 28),
    description="LeNet-300-100 MLP (266,610 params on MNIST)",
    paper="LeCun et al. 1998, Gradient-based learning applied to document recognition",
)
def lenet300(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-300-100 MLP."""
    return LeNet300(input_shape, num_classes)


@register_model(
    "lenet5",
    default_input_shape=(1, 28, 28),
    description="LeNet-5 CNN (61,706 params on MNIST); needs >= 12x12 inputs",
    paper="LeCun et al. 1998, Gradient-based learning applied to document recognition",
)
def lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-5 CNN."""
    return LeNet5(input_shape, num_classes)


# --------------------------------------------------------------------------- Conv-2/4/6


class ConvNet(nn.Module):
    """Conv-2/4/6 of the lottery-ticket paper (Frankle & Carbin 2019, Figure 2).

    ``blocks`` blocks of two 3x3 convs (padding 1, ReLU) and a 2x2 max pool, with 64, 128 and 256
    channels, then FC 256 - FC 256 - FC classes. On CIFAR-10 (3x32x32): Conv-2 has 4,301,642
    parameters, Conv-4 2,425,930, Conv-6 2,262,602. The paper's table says 4.3M, 2.4M and 1.7M;
    its Conv-6 total does not match a 4x4x256 flatten, while its 1.1M conv weights do.

    Args:
        blocks: 1, 2 or 3 (Conv-2, Conv-4, Conv-6).
        input_shape: ``(C, H, W)``, with ``H, W >= 2 ** blocks``.
        num_classes: Number of output classes.
    """

    def __init__(self, blocks: int, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> None:
        super().__init__()
        in_ch = _image_shape(f"conv{2 * blocks}", tuple(input_shape), 2**blocks)[0]
        layers: list[nn.Module] = []
        for out_ch in (64, 128, 256)[:blocks]:
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(out_ch, out_ch, 3, padding=1),
            ]
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(_flat_features(self.features, tuple(input_shape)), 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


_LTH = "Frankle & Carbin 2019, The Lottery Ticket Hypothesis (Figure 2)"


@register_model("conv2", description="Conv-2 (64-64-pool), FC 256-256; 4.30M params on CIFAR-10", paper=_LTH)
def conv2(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Conv-2 of the lottery-ticket paper."""
    return ConvNet(1, input_shape, num_classes)


@register_model("conv4", description="Conv-4 (64-64-pool-128-128-pool), FC 256-256; 2.43M params", paper=_LTH)
def conv4(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Conv-4 of the lottery-ticket paper."""
    return ConvNet(2, input_shape, num_classes)


@register_model("conv6", description="Conv-6 (64/128/256 x2, pools), FC 256-256; 2.26M params", paper=_LTH)
def conv6(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Conv-6 of the lottery-ticket paper."""
    return ConvNet(3, input_shape, num_classes)


# --------------------------------------------------------------------------- VGG

_VGG_CFG: dict[str, list[int | str]] = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG with BatchNorm for small images (CIFAR style; Simonyan & Zisserman 2015).

    3x3 conv - BN - ReLU stacks with five 2x2 max pools, then a global average pool and one
    ``Linear(512, classes)``. Needs images of at least 32x32.

    Args:
        cfg: Channel counts, ``"M"`` for a max pool.
        input_shape: ``(C, H, W)``.
        num_classes: Number of output classes.
        name: Registry name used in error messages.
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        name: str = "vgg",
    ) -> None:
        super().__init__()
        pools = sum(1 for c in cfg if c == "M")
        in_ch = _image_shape(name, tuple(input_shape), 2**pools)[0]
        layers: list[nn.Module] = []
        for c in cfg:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(in_ch, int(c), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(c)),
                    nn.ReLU(),
                ]
                in_ch = int(c)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_ch, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


_VGG_PAPER = "Simonyan & Zisserman 2015, Very Deep Convolutional Networks (CIFAR variant)"


@register_model(
    "vgg11_bn", description="VGG-11 with BatchNorm for 32x32 images (9.2M params)", paper=_VGG_PAPER
)
def vgg11_bn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """VGG-11-BN for small images."""
    return VGG(_VGG_CFG["vgg11_bn"], input_shape, num_classes, name="vgg11_bn")


@register_model(
    "vgg16_bn", description="VGG-16 with BatchNorm for 32x32 images (14.7M params)", paper=_VGG_PAPER
)
def vgg16_bn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """VGG-16-BN for small images."""
    return VGG(_VGG_CFG["vgg16_bn"], input_shape, num_classes, name="vgg16_bn")


# --------------------------------------------------------------------------- CIFAR ResNets


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut; a 1x1 conv + BN projection when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images (He et al. 2016, section 4.2): depth ``6n + 2``.

    A 3x3 conv with 16 channels, three stages of ``n`` basic blocks with 16, 32 and 64 channels
    (the second and third start with stride 2), global average pool, ``Linear(64, classes)``.
    Shortcuts that change shape are 1x1 conv + BN projections (the paper's option B; its CIFAR
    models use option A, zero padding, so this has slightly more parameters).

    Args:
        n: Blocks per stage (3 for ResNet-20, 9 for ResNet-56).
        input_shape: ``(C, H, W)``; any size works.
        num_classes: Number of output classes.
    """

    def __init__(self, n: int, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> None:
        super().__init__()
        channels = _image_shape(f"resnet{6 * n + 2}", tuple(input_shape), 1)[0]
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        in_ch = 16
        for stage, out_ch in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(in_ch, out_ch, stride=2 if stage > 0 and i == 0 else 1))
                in_ch = out_ch
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(x)))


_RESNET_PAPER = "He et al. 2016, Deep Residual Learning for Image Recognition (CIFAR ResNets)"


@register_model("resnet20", description="ResNet-20 for 32x32 images (0.27M params)", paper=_RESNET_PAPER)
def resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-20 (3 basic blocks per stage, projection shortcuts)."""
    return CifarResNet(3, input_shape, num_classes)


@register_model("resnet56", description="ResNet-56 for 32x32 images (0.86M params)", paper=_RESNET_PAPER)
def resnet56(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-56 (9 basic blocks per stage, projection shortcuts)."""
    return CifarResNet(9, input_shape, num_classes)


# --------------------------------------------------------------------------- MobileNetV2


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never going down by more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand - 3x3 depthwise - 1x1 linear projection (+ input if same shape)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Small(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) for small images, with a width multiplier.

    The standard stage table (expansion t, channels c, blocks n, stride s), scaled by
    ``width_mult``, with CIFAR strides: the stem conv and the second stage use stride 1, so a
    32x32 input reaches the head at 4x4. Inverted residuals with expansion 6 (1 in the first
    stage), depthwise 3x3 convs, linear bottlenecks, and residual adds where stride is 1 and the
    channels match. Head: 1x1 conv to 1280 channels, global average pool, ``Linear(1280, classes)``.

    Args:
        input_shape: ``(C, H, W)``; any size works.
        num_classes: Number of output classes.
        width_mult: Channel multiplier (0.5 by default).
    """

    STAGES = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(
        self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width_mult: float = 0.5
    ) -> None:
        super().__init__()
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ConfigError(f"width_mult must be a positive number; got {width_mult!r}")
        channels = _image_shape("mobilenetv2_small", tuple(input_shape), 1)[0]
        in_ch = _make_divisible(32 * width_mult)
        layers: list[nn.Module] = [
            nn.Conv2d(channels, in_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_ch),
            nn.ReLU6(),
        ]
        for t, c, n, s in self.STAGES:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers += [nn.Conv2d(in_ch, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model(
    "mobilenetv2_small",
    description="MobileNetV2 (width 0.5) with CIFAR strides for 32x32 images",
    paper="Sandler et al. 2018, MobileNetV2: Inverted Residuals and Linear Bottlenecks",
)
def mobilenetv2_small(input_shape: tuple[int, ...], num_classes: int, width_mult: float = 0.5) -> nn.Module:
    """Small MobileNetV2 for 32x32 images."""
    return MobileNetV2Small(input_shape, num_classes, width_mult)
