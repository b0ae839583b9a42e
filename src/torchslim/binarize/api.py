"""``ts.binarize_``: replace a model's Linear / Conv2d layers by binary ones, driven by a config.

Layer 1 is the tensor functions (:mod:`.packing`, :mod:`.kernel`); layer 2 the binary modules
(:mod:`.layers`); this module is layer 3, the one verb. The plan is recorded on the model
(kind ``"binarize"``), so ``ts.save`` / ``ts.load`` rebuild the binary layers and load their
packed weights, with identical outputs.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.binarize import BinarizeConfig, binarize_
    >>> model = ts.create_model("zoo:lenet300")
    >>> plan = binarize_(model, BinarizeConfig(method="xnor"))
    >>> plan.layers, plan.kept
    (['fc2'], {'fc1': 'first layer', 'fc3': 'last layer'})
    >>> type(model.fc2).__name__, type(model.relu1).__name__
    ('BinaryLinear', 'Hardtanh')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from torchslim._config import ConfigDict
from torchslim._modelinfo import AFTER_FLOAT, FINALIZE_FIRST, refuse_applied, register_plan_kind
from torchslim._select import matches, select_modules
from torchslim._utils import evaluating
from torchslim.binarize.layers import (
    ACTIVATION_METHODS,
    BINARY_TYPES,
    INFERENCE_BACKENDS,
    METHODS,
    BinaryConv2d,
    BinaryLinear,
)
from torchslim.errors import CheckpointError, ConfigError

__all__ = ["BinarizeConfig", "BinarizePlan", "binarize_", "binary_layers", "set_backend_", "PLAN_KIND"]

PLAN_KIND = "binarize"
_CANDIDATES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_RELUS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


def _names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"BinarizeConfig.{what} must be a module name/glob or a list of them; got {value!r}")


def _flag(value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"BinarizeConfig.{what} must be True or False; got {value!r}")


@dataclass(frozen=True)
class BinarizeConfig(ConfigDict):
    """Which layers :func:`binarize_` makes binary, and how.

    Attributes:
        method: ``"bnn"`` (Hubara 2016), ``"xnor"`` (Rastegari 2016), ``"bireal"`` (Liu 2018)
            or ``"bwn"`` (binary weights, real activations).
        keep_first: Keep the first Linear/Conv layer (in forward order) in full precision.
        keep_last: Keep the last one in full precision.
        modules: ``None`` for every Linear/Conv2d layer, or names / globs (``"features.*"``).
            A named layer of another type (Conv1d, ConvTranspose...) is an error: it has no
            binary form here.
        skip: Names, globs or ``re:`` patterns of layers to leave in full precision
            (``exclude`` is its deprecated old name).
        scale_activations: XNOR-Net's activation scale ``K`` (``"xnor"`` only).
        shortcut: Real-valued shortcut around each binary layer; ``None``: on for ``"bireal"``.
        replace_relu: Turn ``nn.ReLU``/``nn.ReLU6`` modules into ``nn.Hardtanh`` (the sign of a
            ReLU output is always +1, so binary activations need it); ``None``: on for the
            methods that binarize activations, off for ``"bwn"``.
        word_bits: Bits per stored word of packed signs, 32 or 64.

    Example:
        >>> cfg = BinarizeConfig(method="bireal", skip=("features.0",))
        >>> BinarizeConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    method: str = "xnor"
    keep_first: bool = True
    keep_last: bool = True
    modules: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    scale_activations: bool = False
    shortcut: bool | None = None
    replace_relu: bool | None = None
    word_bits: int = 32

    exclude: tuple[str, ...] | None = field(default=None, repr=False, compare=False)  # old name of skip

    def __post_init__(self) -> None:
        self._take_renamed()
        if self.method not in METHODS:
            raise ConfigError(f"BinarizeConfig.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name in ("keep_first", "keep_last", "scale_activations"):
            _flag(getattr(self, name), name)
        for name in ("shortcut", "replace_relu"):
            if getattr(self, name) is not None:
                _flag(getattr(self, name), name)
        if self.scale_activations and self.method != "xnor":
            raise ConfigError(f"BinarizeConfig.scale_activations is an XNOR-Net option; method {self.method!r} does not take it")
        if self.modules is not None:
            object.__setattr__(self, "modules", _names(self.modules, "modules"))
        object.__setattr__(self, "skip", _names(self.skip, "skip"))
        if self.word_bits not in (32, 64) or isinstance(self.word_bits, bool):
            raise ConfigError(f"BinarizeConfig.word_bits must be 32 or 64; got {self.word_bits!r}")

    @property
    def resolved_shortcut(self) -> bool:
        return self.method == "bireal" if self.shortcut is None else self.shortcut

    @property
    def resolved_replace_relu(self) -> bool:
        return self.method in ACTIVATION_METHODS if self.replace_relu is None else self.replace_relu

    _renamed: ClassVar[dict[str, str]] = {"exclude": "skip"}


@dataclass
class BinarizePlan:
    """What :func:`binarize_` did.

    Attributes:
        method: The binarization method.
        layers: Names of the layers made binary, in forward order.
        kept: Linear/Conv layers left in full precision -> why.
        activations: Names of the ReLU modules turned into Hardtanh.
        config: The :class:`BinarizeConfig` as a dict.
    """

    method: str
    layers: list[str]
    kept: dict[str, str] = field(default_factory=dict)
    activations: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def binary_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every binary layer in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BINARY_TYPES)}


def set_backend_(model: nn.Module, backend: str) -> int:
    """Choose how the binary layers run in inference: ``"float"`` (simulation), the packed
    XNOR-popcount kernel with ``"auto"``, ``"c"`` or ``"torch"``, or ``"fastest"``: per layer and
    input shape, whichever of the float op and the packed kernel (``"auto"``) measured faster at
    first use. Returns the number of layers set.

    The kernel runs in eval mode under ``no_grad`` for layers with binary activations (BWN
    layers keep the float path); training always uses the float path. Outputs are identical.

    Raises:
        ConfigError: an unknown backend, or ``"c"`` where the C kernel cannot be built.
    """
    if backend not in INFERENCE_BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(INFERENCE_BACKENDS)}; got {backend!r}")
    if backend == "c":
        from torchslim.binarize.kernel import resolve_backend

        resolve_backend("c", torch.device("cpu"))
    layers = binary_layers(model)
    for layer in layers.values():
        layer.backend = backend
        layer.routes.clear()
    return len(layers)


# --------------------------------------------------------------------------- choosing layers


def _forward_order(model: nn.Module, names: list[str], example_inputs: Any) -> list[str]:
    """``names`` in the order their modules first run on ``example_inputs`` (registration order
    when there are no inputs or the forward fails; modules that never run go last)."""
    if example_inputs is None:
        from torchslim._modelinfo import model_info

        info = model_info(model)
        if info is None or not info.example.args and not info.example.kwargs:
            return names
        example_inputs = info.example
    from torchslim.graph.inputs import as_inputs, call_model

    modules = dict(model.named_modules())
    seen: list[str] = []
    handles = []
    for name in names:
        handles.append(modules[name].register_forward_pre_hook(lambda m, a, n=name: seen.append(n) if n not in seen else None))
    try:
        from torchslim._utils import model_device

        inputs = as_inputs(example_inputs).to(model_device(model))
        with evaluating(model), torch.no_grad():
            call_model(model, inputs)
    except Exception:  # noqa: BLE001 - order is a nicety; fall back to registration order
        return names
    finally:
        for h in handles:
            h.remove()
    return seen + [n for n in names if n not in seen]


def _select(model: nn.Module, cfg: BinarizeConfig, example_inputs: Any) -> tuple[list[str], dict[str, str]]:
    select_modules(model, cfg.modules, cfg.skip, kinds=None)  # a pattern that selects nothing: refused first
    all_layers = [n for n, m in model.named_modules() if isinstance(m, _CANDIDATES) and not isinstance(m, BINARY_TYPES) and n]
    already = [n for n, m in model.named_modules() if isinstance(m, BINARY_TYPES)]
    modules = dict(model.named_modules())
    if cfg.modules is not None:
        chosen = []
        for pat in cfg.modules:
            hits = [n for n in all_layers + already if matches(n, pat)]
            other = [n for n, m in modules.items() if n and matches(n, pat) and n not in hits]
            if not hits:
                kinds = sorted({type(modules[n]).__name__ for n in other})
                why = f"it names {', '.join(kinds)} modules, which have no binary form (Linear and Conv2d do)" if other else "it matches no module"
                raise ConfigError(f"BinarizeConfig.modules entry {pat!r} selects no Linear/Conv2d layer: {why}")
            chosen += [n for n in hits if n not in chosen]
    else:
        chosen = [n for n in all_layers if isinstance(modules[n], (nn.Linear, nn.Conv2d))] + already
    for n in chosen:
        m = modules[n]
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or isinstance(m, (nn.LazyLinear, nn.LazyConv2d)):
            raise ConfigError(f"layer {n!r} is a {type(m).__name__}, which has no binary form (Linear and Conv2d do)")
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise ConfigError(f"layer {n!r} uses padding_mode={m.padding_mode!r}; binary convolutions support zero padding only")
    order = _forward_order(model, [n for n in all_layers if isinstance(modules[n], (nn.Linear, nn.Conv2d))] + already, example_inputs)
    kept: dict[str, str] = {}
    if order and cfg.keep_first:
        kept[order[0]] = "first layer"
    if order and cfg.keep_last and order[-1] not in kept:
        kept[order[-1]] = "last layer"
    for n in chosen:
        if n in kept:
            continue
        if any(matches(n, pat) for pat in cfg.skip):
            kept[n] = "excluded"
        elif n in already:
            kept[n] = "already binary"
    layers = [n for n in order if n in chosen and n not in kept]
    for n in all_layers:
        if n not in kept and n not in layers:
            kept[n] = "not selected" if isinstance(modules[n], (nn.Linear, nn.Conv2d)) else f"{type(modules[n]).__name__} has no binary form"
    if not layers:
        reasons = ", ".join(f"{n}: {r}" for n, r in kept.items()) or "the model has no Linear/Conv2d layer"
        raise ConfigError(f"no layer to binarize ({reasons}); check modules=, skip=, keep_first= and keep_last=")
    # a binary layer takes over the float layer's weight Parameter: a weight computed by a mask,
    # a fake-quantizer or a codebook is not one, and what they did would be lost
    refuse_applied(model, layers, "binarize_", _CANNOT_TAKE)
    return layers, kept


# what binarize_ cannot take from an earlier verb, and what to do instead
_CANNOT_TAKE = {
    "quantize": "a layer is binary or quantized, not both: " + AFTER_FLOAT,
    "prune": FINALIZE_FIRST,
    "pack": FINALIZE_FIRST,
}


def _relus(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in _RELUS and n]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _binary_from(module: nn.Module, cfg: BinarizeConfig) -> nn.Module:
    opts = {"scale_activations": cfg.scale_activations, "shortcut": cfg.resolved_shortcut, "word_bits": cfg.word_bits}
    if isinstance(module, nn.Conv2d):
        return BinaryConv2d.from_float(module, cfg.method, **opts)
    return BinaryLinear.from_float(module, cfg.method, **opts)


def _apply(model: nn.Module, cfg: BinarizeConfig, layers: Sequence[str], activations: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    new = {n: _binary_from(modules[n], cfg) for n in layers}  # builds everything before any swap
    acts = {n: nn.Hardtanh() for n in activations}
    for n, m in {**new, **acts}.items():
        _set_module(model, n, m)


def binarize_(
    model: nn.Module, config: BinarizeConfig | None = None, *, example_inputs: Any = None, **overrides: Any
) -> BinarizePlan:
    """Replace ``model``'s Linear / Conv2d layers by binary ones, in place.

    The binary layers share the replaced layers' ``weight`` and ``bias`` Parameters (they become
    the latent weights), so an optimizer built before keeps working. "First" and "last" follow
    the forward order on ``example_inputs`` (default: the inputs ``ts.create_model`` attached;
    registration order when there are none). Train the result with ``ts.fit`` (gradients pass
    the straight-through estimator); ``ts.save`` stores the binary weights packed.

    Args:
        model: changed in place.
        config: a :class:`BinarizeConfig` (default: XNOR-Net, first and last layers kept).
        example_inputs: inputs to find the forward order of the layers.
        overrides: :class:`BinarizeConfig` fields to change (``binarize_(model, method="bireal")``).

    Returns:
        A :class:`BinarizePlan`.

    Raises:
        ConfigError: a bad config, a selected layer with no binary form (Conv1d, ConvTranspose,
            padding modes other than zeros), a selected layer another verb changed in a way
            binarize_ cannot take (quantized; masked or clustered until ``ts.finalize_``), or no
            layer left to binarize. The model is unchanged then.
    """
    cfg = BinarizeConfig.build(config, **overrides)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"binarize_ needs an nn.Module; got {type(model).__name__}")
    layers, kept = _select(model, cfg, example_inputs)
    activations = _relus(model) if cfg.resolved_replace_relu else []
    _apply(model, cfg, layers, activations)
    from torchslim._modelinfo import model_info, record_plan

    if model_info(model) is not None:
        record_plan(model, {"kind": PLAN_KIND, "config": cfg.to_dict(), "layers": list(layers), "activations": list(activations)})
    return BinarizePlan(cfg.method, list(layers), kept, list(activations), cfg.to_dict())


def _replay(model: nn.Module, plan: dict[str, Any]) -> None:
    """Re-create saved binary layers on a freshly built model (weights load afterwards)."""
    try:
        cfg = BinarizeConfig.from_dict(plan.get("config", {}))
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"binarize plan has an invalid config: {exc}") from exc
    modules = dict(model.named_modules())
    layers, activations = list(plan.get("layers", [])), list(plan.get("activations", []))
    for n in layers:
        if not isinstance(modules.get(n), (nn.Linear, nn.Conv2d)):
            raise CheckpointError(f"binarize plan names layer {n!r}, which the rebuilt model has not as Linear/Conv2d")
    for n in activations:
        if n not in modules:
            raise CheckpointError(f"binarize plan names activation {n!r}, which the rebuilt model does not have")
    _apply(model, cfg, layers, activations)


register_plan_kind(PLAN_KIND, _replay)
