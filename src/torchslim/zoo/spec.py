"""Model specs: one string names any model torchslim can build.

``torchvision:NAME``, ``timm:NAME``, ``zoo:NAME``, ``pretrained:NAME``, ``path/to/file.py:factory`` or a directory
written by ``ts.save``. The built model remembers its spec and its example inputs
(``model._torchslim``), so ``ts.example_inputs(model)`` and ``ts.save(model, dir)`` work on it.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._optional import require
from torchslim.errors import ConfigError, InputShapeError, SpecError, TorchslimError, type_error
from torchslim.graph.inputs import Inputs, as_inputs

__all__ = [
    "ModelInfo",
    "create_model",
    "example_inputs",
    "model_info",
    "parse_input_shape",
    "record_plan",
    "set_example_inputs",
]

_PREFIXES = ("torchvision", "timm", "zoo", "pretrained")
ALLOWED = (
    "torchvision:NAME (e.g. torchvision:resnet50), timm:NAME, zoo:NAME (see `torchslim list`), pretrained:minilm|mnist_cnn|efficientnet_lite0, "
    "path/to/file.py:factory, or a directory written by ts.save"
)


@dataclass
class ModelInfo:
    """What a model remembers about how it was made."""

    spec: str  # the spec string it was built from
    kind: str  # torchvision | timm | zoo | file | saved
    build: dict[str, Any]  # everything needed to build the same architecture again
    example: Inputs  # default example inputs (batch 1)
    plans: list[dict[str, Any]] = field(default_factory=list)  # compression plans applied, in order

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "build": self.build, "plans": self.plans}


def model_info(model: nn.Module) -> ModelInfo | None:
    """The :class:`ModelInfo` of a model built by :func:`create_model` (None otherwise)."""
    return model.__dict__.get("_torchslim")


def _attach(model: nn.Module, info: ModelInfo) -> nn.Module:
    model.__dict__["_torchslim"] = info
    return model


def record_plan(model: nn.Module, plan: dict[str, Any]) -> None:
    """Append a JSON-serialisable plan (``{"kind": ..., ...}``) to the model's history.

    ``ts.save`` writes the history to ``plan.json`` and ``ts.load`` replays it, in order, on the
    rebuilt architecture before loading weights. Every in-place verb that changes structure calls this.
    """
    if "kind" not in plan:
        raise ConfigError(f"a plan needs a 'kind' key; got keys {sorted(plan)}")
    info = model_info(model)
    if info is None:
        info = ModelInfo(spec="", kind="custom", build={}, example=Inputs())
        _attach(model, info)
    info.plans.append(plan)


def set_example_inputs(model: nn.Module, inputs: Any) -> nn.Module:
    """Make ``inputs`` the model's remembered example inputs (adds a ``file``-less info if needed)."""
    info = model_info(model)
    new = as_inputs(inputs)
    if info is None:
        _attach(model, ModelInfo(spec="", kind="custom", build={}, example=new))
    else:
        _attach(model, replace(info, example=new))
    return model


def example_inputs(model: nn.Module, batch_size: int | None = None) -> tuple[Any, ...] | dict[str, Any]:
    """The example inputs the model remembers, on the model's device.

    Returns a tuple of positional inputs, or a dict when the model takes keyword inputs.
    With ``batch_size``, the batch-1 inputs are repeated along their first dimension.

    Raises:
        SpecError: the model was not built by ``ts.create_model`` and has no example inputs
            (pass them explicitly, or call ``ts.set_example_inputs(model, x)``).
    """
    info = model_info(model)
    if info is None:
        raise SpecError(
            f"{type(model).__name__} does not remember example inputs: build it with ts.create_model(spec) "
            "or pass example_inputs explicitly"
        )
    from torchslim._utils import model_device

    inputs = info.example.to(model_device(model))
    if batch_size is not None:
        if batch_size < 1:
            raise InputShapeError(f"batch_size must be >= 1, got {batch_size}")

        def grow(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                return x[:1].expand(batch_size, *x.shape[1:]).contiguous()
            return x

        args, kwargs = torch.utils._pytree.tree_map(grow, (inputs.args, inputs.kwargs))
        inputs = Inputs(tuple(args), dict(kwargs))
    return dict(inputs.kwargs) if inputs.kwargs and not inputs.args else tuple(inputs.args)


def parse_input_shape(text: str) -> Inputs:
    """``'1,3,224,224'`` (or several separated by ``;``) -> float32 example inputs.

    Raises:
        InputShapeError: for anything that is not comma-separated positive integers.
    """
    shapes = []
    for part in text.split(";"):
        dims = [d for d in re.split(r"[,x ]+", part.strip()) if d]
        if not dims or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise InputShapeError(
                f"input shape {text!r} is not valid: give positive integers separated by commas, "
                "e.g. 1,3,224,224 (several inputs separated by ';')"
            )
        shapes.append(tuple(int(d) for d in dims))
    g = torch.Generator().manual_seed(0)
    return Inputs(tuple(torch.randn(s, generator=g) for s in shapes))


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# ---- resolvers -----------------------------------------------------------------------------
def _torchvision(name: str, num_classes: int | None) -> tuple[nn.Module, Inputs, dict[str, Any]]:
    import torchvision

    models = torchvision.models
    known = models.list_models()
    if name not in known:
        near = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join('torchvision:' + n for n in near)}?" if near else ""
        raise SpecError(f"torchvision has no model {name!r}{hint} (torchvision.models.list_models() lists {len(known)})")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    crop: tuple[int, ...] = (224, 224)
    try:
        weights = models.get_model_weights(name).DEFAULT
        tf = weights.transforms()
        c = getattr(tf, "crop_size", None) or getattr(tf, "resize_size", None)
        if c:
            crop = tuple(c) if len(c) == 2 else (c[0], c[0])
    except (ValueError, KeyError, AttributeError, TypeError):
        pass
    if name in models.list_models(module=models.video):
        example = Inputs((_randn(1, 3, 16, *crop),))
    elif name in models.list_models(module=models.detection) or name in models.list_models(module=models.optical_flow):
        raise SpecError(
            f"torchvision:{name} takes lists of images (detection/optical flow); use a classification or "
            "segmentation model, or wrap it in a file.py:factory spec"
        )
    else:
        example = Inputs((_randn(1, 3, *crop),))
    if name.startswith("vit_"):  # as get_model(weights=...) does: the weights fix the image size
        kwargs.setdefault("image_size", crop[0])
    if name.startswith("inception") or name == "googlenet":
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", False)
    model = models.get_model(name, weights=None, **kwargs)
    return model, example, {"name": name, "kwargs": kwargs}


def _timm(name: str, num_classes: int | None, in_chans: int | None) -> tuple[nn.Module, Inputs, dict[str, Any]]:
    timm = require("timm", "timm:NAME model specs")
    if not timm.list_models(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join('timm:' + n for n in near)}?" if near else ""
        raise SpecError(f"timm has no model {name!r}{hint}")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    model = timm.create_model(name, pretrained=False, **kwargs)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    shape = tuple(cfg.get("input_size", (3, 224, 224)))
    if in_chans is not None:
        shape = (in_chans, *shape[1:])
    return model, Inputs((_randn(1, *shape),)), {"name": name, "kwargs": kwargs}


def _zoo(name: str, input_shape: tuple[int, ...] | None, num_classes: int | None):
    from torchslim.zoo.models import create_zoo_model, zoo_entry

    entry = zoo_entry(name)
    shape = tuple(input_shape) if input_shape else tuple(entry.default_input_shape)
    classes = num_classes if num_classes is not None else entry.default_num_classes
    model = create_zoo_model(name, input_shape=shape, num_classes=classes)
    return model, Inputs((_randn(1, *shape),)), {"name": name, "input_shape": list(shape), "num_classes": classes}


def _load_file_module(path: Path) -> Any:
    mod_name = f"_torchslim_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise SpecError(f"importing {path} raised {type(exc).__name__}: {exc}") from exc
    return module


def _file(path_text: str, factory: str) -> tuple[nn.Module, Inputs, dict[str, Any]]:
    path = Path(path_text)
    if not path.is_file():
        raise SpecError(f"model file {path_text!r} does not exist (spec form: path/to/file.py:factory)")
    module = _load_file_module(path)
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise SpecError(
            f"{path_text} has no function {factory!r}; callables defined there: {', '.join(found) or 'none'}"
        )
    try:
        model = fn()
    except TorchslimError:
        raise
    except Exception as exc:
        raise SpecError(f"{path_text}:{factory}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise SpecError(f"{path_text}:{factory}() must return an nn.Module, returned {type(model).__name__}")
    ex_fn = getattr(module, "example_inputs", None)
    if callable(ex_fn):
        try:
            example = as_inputs(ex_fn())
        except TorchslimError:
            raise
        except Exception as exc:
            raise SpecError(f"{path_text}:example_inputs() raised {type(exc).__name__}: {exc}") from exc
    else:
        example = Inputs((_randn(1, 3, 224, 224),))
    return model, example, {"path": str(path.resolve()), "factory": factory}


def _data_shape(data: Any) -> tuple[tuple[int, ...] | None, int | None]:
    if data is None:
        return None, None
    if isinstance(data, str):
        from torchslim.data import load_data

        data = load_data(data)
    return tuple(data.input_shape), data.num_classes


def create_model(
    spec: str,
    *,
    data: Any = None,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """Build the model a spec string names; the model remembers its spec and example inputs.

    Args:
        spec: ``torchvision:NAME``, ``timm:NAME``, ``zoo:NAME``, ``path/to/file.py:factory``,
            or a directory written by ``ts.save``.
        data: a data spec (``'mnist'``) or ``DataBundle``; a zoo or timm model adapts its input
            channels/size and class count to it, a torchvision model its class count.
        num_classes: override the class count.
        input_shape: per-sample input shape (no batch) for zoo models, e.g. ``(1, 28, 28)``.

    Returns:
        The model in eval mode, with random weights unless the spec is a saved directory
        (torchslim never downloads weights).

    Raises:
        SpecError: the spec cannot be resolved; the message names what was tried and what is allowed.

    Example:
        >>> import torchslim as ts
        >>> m = ts.create_model("zoo:lenet300", data="mnist")
        >>> ts.example_inputs(m)[0].shape
        torch.Size([1, 1, 28, 28])
    """
    if not isinstance(spec, str):
        raise type_error("spec", spec, f"a model spec string: {ALLOWED}")
    text = spec.strip()
    data_shape, data_classes = _data_shape(data)
    classes = num_classes if num_classes is not None else data_classes
    shape = tuple(input_shape) if input_shape is not None else data_shape

    path = Path(text)
    if path.is_dir():
        from torchslim.saving import load

        return load(path)
    prefix, _, rest = text.partition(":")
    if prefix in _PREFIXES and rest:
        if prefix == "torchvision":
            model, example, build = _torchvision(rest, classes)
            if shape is not None:  # adapt the spatial size of the example (channels are fixed)
                example = Inputs((_randn(1, *shape),))
        elif prefix == "timm":
            model, example, build = _timm(rest, classes, shape[0] if shape else None)
            if shape is not None:
                example = Inputs((_randn(1, *shape),))
        elif prefix == "pretrained":
            from torchslim.zoo import pretrained_vision

            pretrained_vision.check_pretrained_name(rest)
            if pretrained_vision.is_vision(rest):  # image classifiers; text models in zoo.pretrained
                model, example_args, build = pretrained_vision.build_pretrained_vision(rest)
            else:
                from torchslim.zoo.pretrained import build_pretrained

                model, example_args, build = build_pretrained(rest)
            example = Inputs(example_args)
        else:
            model, example, build = _zoo(rest, shape, classes)
    elif text.endswith(".py") or ".py:" in text:
        file_part, sep, factory = text.rpartition(":")
        if not sep or not file_part.endswith(".py") or not factory:
            raise SpecError(f"model spec {spec!r} names a Python file but no factory; write it as {text}:build")
        model, example, build = _file(file_part, factory)
    else:
        hint = ""
        if prefix not in _PREFIXES and not rest:
            from torchslim.zoo.models import list_models

            if text in list_models():
                hint = f"; did you mean zoo:{text}?"
            else:
                hint = f"; for a torchvision model write torchvision:{text}" if text.isidentifier() else ""
        elif prefix and prefix not in _PREFIXES:
            hint = f"; unknown prefix {prefix!r}"
        raise SpecError(f"cannot resolve model spec {spec!r}{hint}; allowed: {ALLOWED}")
    model.eval()
    return _attach(model, ModelInfo(spec=text, kind=prefix if prefix in _PREFIXES else "file", build=build, example=example))


def rebuild(info: dict[str, Any]) -> nn.Module:
    """Build the architecture described by a saved ``ModelInfo.to_dict()`` (random weights)."""
    kind, build = info.get("kind"), info.get("build") or {}
    if kind == "torchvision":
        import torchvision

        kw = dict(build.get("kwargs", {}))
        return torchvision.models.get_model(build["name"], weights=None, **kw)
    if kind == "timm":
        timm = require("timm", "loading a saved timm model")
        return timm.create_model(build["name"], pretrained=False, **build.get("kwargs", {}))
    if kind == "zoo":
        from torchslim.zoo.models import create_zoo_model

        return create_zoo_model(build["name"], input_shape=tuple(build["input_shape"]), num_classes=build["num_classes"])
    if kind == "file":
        model, _, _ = _file(build["path"], build["factory"])
        return model
    if kind == "pretrained":
        from torchslim.zoo import pretrained_vision

        if pretrained_vision.is_vision(str(build.get("name", ""))):
            return pretrained_vision.rebuild_pretrained_vision(build)
        from torchslim.zoo.pretrained import rebuild_pretrained

        return rebuild_pretrained(build)
    raise SpecError(f"cannot rebuild a model of kind {kind!r}; known kinds: torchvision, timm, zoo, pretrained, file")
