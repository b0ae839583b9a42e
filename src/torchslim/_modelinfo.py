"""The record of what was applied to a model, and how to rebuild a model from it.

A model built from a spec (``ts.create_model``) carries a :class:`ModelInfo` (``model._torchslim``):
the spec, how to build the same architecture again, its example inputs and the plans applied
to it since, in order. Every in-place verb that changes structure appends its plan with
:func:`record_plan` and registers how to replay it with :func:`register_plan_kind`.
:func:`rebuild` turns a saved record back into the same architecture (weights left at their
initial values); ``ts.load`` and ``ts.unpack`` both start from it and then load their weights.

Who builds which kind of model is not known here: each kind of model spec (``zoo:``,
``torchvision:``, a saved directory, ...) is a :class:`ModelSource` registered under kind
``"model"`` by the layer that owns it (the zoo, ``saving``).

Example:
    >>> import torch
    >>> from torchslim._modelinfo import model_info, record_plan, set_example_inputs
    >>> m = set_example_inputs(torch.nn.Linear(4, 2), torch.zeros(1, 4))
    >>> record_plan(m, {"kind": "sparsify", "layers": {}})
    >>> model_info(m).kind, [p["kind"] for p in model_info(m).plans]
    ('custom', ['sparsify'])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from torchslim._registry import entries, lookup, register
from torchslim.errors import CheckpointError, ConfigError, InputShapeError, SpecError
from torchslim.graph.inputs import Inputs, as_inputs, remembered_inputs

__all__ = [
    "ModelInfo",
    "ModelSource",
    "model_info",
    "attach",
    "record_plan",
    "example_inputs",
    "set_example_inputs",
    "register_plan_kind",
    "replay_plan",
    "rebuild",
    "rebuildable",
    "Applied",
    "applied_to",
    "refuse_applied",
    "integer_layers",
    "integer_layers_note",
    "refuse_integer_layers",
    "AFTER_FLOAT",
    "FINALIZE_FIRST",
    "SKIP_THEM",
]


@dataclass
class ModelInfo:
    """What a model remembers about how it was made."""

    spec: str  # the spec string it was built from
    kind: str  # the model source that built it: torchvision | timm | zoo | pretrained | file | custom
    build: dict[str, Any]  # everything needed to build the same architecture again
    example: Inputs  # default example inputs (batch 1)
    plans: list[dict[str, Any]] = field(default_factory=list)  # compression plans applied, in order

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "build": self.build, "plans": self.plans}


@dataclass(frozen=True)
class ModelSource:
    """One kind of model spec, registered as ``register("model", NAME, ModelSource(...))``.

    Attributes:
        create: ``create(text, input_shape=..., num_classes=...)`` with ``text`` the spec after
            ``NAME:`` (the whole spec for a source that ``claims`` it); returns
            ``(model, example Inputs, build dict)``, or a finished model that already carries
            its :class:`ModelInfo` (a saved directory).
        rebuild: ``rebuild(build) -> nn.Module``: the architecture again from the ``build``
            dict ``create`` returned; None when models of this kind are never saved as such.
        claims: for a spec without a ``NAME:`` prefix: does this source take ``text``?
        priority: sources that claim are asked in this order; below 0 before the prefixes.
    """

    create: Callable[..., Any]
    rebuild: Callable[[dict[str, Any]], nn.Module] | None = None
    claims: Callable[[str], bool] | None = None
    priority: int = 0


def model_info(model: nn.Module) -> ModelInfo | None:
    """The :class:`ModelInfo` of a model built by ``ts.create_model`` (None otherwise)."""
    return model.__dict__.get("_torchslim")


def attach(model: nn.Module, info: ModelInfo) -> nn.Module:
    """Make ``info`` the record of ``model`` (replacing any) and return ``model``."""
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
        attach(model, info)
    info.plans.append(plan)


def set_example_inputs(model: nn.Module, inputs: Any) -> nn.Module:
    """Make ``inputs`` the model's remembered example inputs (adds a ``custom`` record if needed)."""
    info = model_info(model)
    new = as_inputs(inputs)
    if info is None:
        attach(model, ModelInfo(spec="", kind="custom", build={}, example=new))
    else:
        attach(model, replace(info, example=new))
    return model


def example_inputs(model: nn.Module, batch_size: int | None = None) -> tuple[Any, ...] | dict[str, Any]:
    """The example inputs the model remembers, on the model's device.

    Returns a tuple of positional inputs, or a dict when the model takes keyword inputs.
    With ``batch_size``, the batch-1 inputs are repeated along their first dimension; an input
    that is a list of tensors (a detector's images) is a batch of its items: the first is repeated.

    Raises:
        SpecError: the model was not built by ``ts.create_model`` and has no example inputs
            (pass them explicitly, or call ``ts.set_example_inputs(model, x)``).
    """
    inputs = remembered_inputs(model)  # on the model's device; SpecError when there are none
    if batch_size is not None:
        if batch_size < 1:
            raise InputShapeError(f"batch_size must be >= 1, got {batch_size}")

        def grow(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                return x[:1].expand(batch_size, *x.shape[1:]).contiguous()
            return x

        def grow_input(x: Any) -> Any:
            if type(x) is list and x and all(isinstance(t, torch.Tensor) for t in x):
                return [x[0].clone() for _ in range(batch_size)]
            return torch.utils._pytree.tree_map(grow, x)

        args = tuple(grow_input(a) for a in inputs.args)
        kwargs = {k: grow_input(v) for k, v in inputs.kwargs.items()}
        inputs = Inputs(tuple(args), dict(kwargs))
    return dict(inputs.kwargs) if inputs.kwargs and not inputs.args else tuple(inputs.args)


# ---- plans ---------------------------------------------------------------------------------------
def register_plan_kind(kind: str, replay: Callable[[nn.Module, dict[str, Any]], None], module: str | None = None) -> None:
    """Register how to replay a plan of ``kind`` onto a freshly built model (``replay(model, plan)``).

    A registry entry of kind ``"plan"``; the module that defines it registers it when imported
    (``module`` is accepted for compatibility and ignored: the registry loads every family).
    """
    parts = str(getattr(replay, "__module__", "")).split(".")
    register("plan", kind, replay, family=parts[1] if len(parts) > 1 else "")


def replay_plan(model: nn.Module, plan: Mapping[str, Any]) -> None:
    """Re-apply one saved plan (structure only; weights are loaded afterwards).

    Raises:
        CheckpointError: a plan kind this torchslim does not know.
    """
    kind = plan.get("kind")
    try:
        fn = lookup("plan", str(kind)).obj
    except ConfigError:
        known = ", ".join(e.name for e in entries("plan")) or "none"
        raise CheckpointError(
            f"saved model uses a plan of kind {kind!r}, which this torchslim does not know "
            f"(known: {known}); upgrade torchslim"
        ) from None
    fn(model, plan)


# ---- rebuild -------------------------------------------------------------------------------------
def _source(kind: str) -> ModelSource | None:
    try:
        return lookup("model", kind).obj
    except ConfigError:
        return None


def rebuildable(kind: str) -> bool:
    """Whether a model whose record has ``kind`` can be rebuilt (so saved, packed, reloaded)."""
    source = _source(kind)
    return source is not None and source.rebuild is not None


def rebuild(info: ModelInfo | Mapping[str, Any]) -> nn.Module:
    """The architecture a record describes, every plan replayed on it; weights left initial.

    Args:
        info: a :class:`ModelInfo` or its ``to_dict()`` (as saved in ``plan.json``); the rebuilt
            model remembers no example inputs (the caller sets them).

    Returns:
        The model, carrying a copy of ``info`` (so ``ts.save`` works on it again).

    Raises:
        SpecError: the record's kind cannot be rebuilt (or its source fails).
        CheckpointError: a plan of a kind this torchslim does not know.
    """
    record = info.to_dict() if isinstance(info, ModelInfo) else dict(info)
    kind = str(record.get("kind"))
    build = dict(record.get("build") or {})
    source = _source(kind)
    if source is None or source.rebuild is None:
        known = ", ".join(e.name for e in entries("model") if e.obj.rebuild is not None)
        raise SpecError(f"cannot rebuild a model of kind {kind!r}; known kinds: {known}")
    model = source.rebuild(build)
    plans = [dict(p) for p in record.get("plans") or []]
    for plan in plans:
        replay_plan(model, plan)
    return attach(model, ModelInfo(str(record.get("spec", "")), kind, build, Inputs(), plans))


# ---- what was applied to a layer -----------------------------------------------------------------
# The family a torchslim class belongs to (its module path) -> the verb that puts it on a layer,
# and how a message says so. ``_masks`` holds the mask parametrization that sparsify_, wanda_
# and sparsegpt_ set (all recorded as kind "sparsify").
_FAMILY_VERB = {
    "_masks": "sparsify_", "prune": "sparsify_", "quantize": "quantize_", "binarize": "binarize_",
    "pack": "cluster_", "lowrank": "factorize_",
}
_PAST = {
    "sparsify_": "masked", "quantize_": "quantized", "gptq_": "quantized", "binarize_": "binarized",
    "cluster_": "clustered", "factorize_": "factorized",
}
_RECORD_KIND = {"sparsify_": "sparsify", "quantize_": "quantize", "binarize_": "binarize", "cluster_": "cluster"}

# hints for :func:`refuse_applied`, formatted with verb, by (the earlier verb), name, skip (all refused names)
AFTER_FLOAT = "apply {verb} to the float model, before {by}"
FINALIZE_FIRST = "make it permanent first with ts.finalize_(model), or apply {verb} before {by}"
SKIP_THEM = "leave those layers out with skip={skip}"


@dataclass(frozen=True)
class Applied:
    """One thing a torchslim verb left on a layer (see :func:`applied_to`).

    Attributes:
        verb: the verb that did it (``"quantize_"``, ``"gptq_"``, ``"sparsify_"``, ``"binarize_"``...).
        family: the package it comes from (``"quantize"``, ``"prune"``, ``"binarize"``, ``"pack"``).
        what: what is on the layer, for messages (``"BinaryConv2d"``, ``"FakeQuantize on its weight"``).
    """

    verb: str
    family: str
    what: str

    @property
    def past(self) -> str:
        """``"quantized"``, ``"masked"``, ``"binarized"``...: what the layer was."""
        return _PAST.get(self.verb, f"changed by {self.verb}")


def _family(cls: type) -> str | None:
    parts = str(getattr(cls, "__module__", "")).split(".")
    if len(parts) < 2 or parts[0] != "torchslim":
        return None
    fam = "prune" if parts[1] == "_masks" else parts[1]
    return fam if fam in _FAMILY_VERB else None


def _names_in(layers: Any) -> set[str]:
    """The layer names a plan record lists (lists of names or parameter names, dict keys, dicts with ``name``)."""
    out: set[str] = set()
    items = layers.keys() if isinstance(layers, Mapping) else layers if isinstance(layers, (list, tuple)) else ()
    for x in items:
        name = x.get("name") if isinstance(x, Mapping) else x
        if isinstance(name, str):
            out.add(name)
            for suffix in (".weight", ".bias"):
                if name.endswith(suffix):
                    out.add(name[: -len(suffix)])
    return out


def _record(model: nn.Module, kind: str, name: str) -> Mapping[str, Any] | None:
    """The latest plan of ``kind`` in the model's record that names layer ``name``."""
    info = model_info(model)
    for plan in reversed(info.plans if info is not None else []):
        if plan.get("kind") == kind and name in _names_in(plan.get("layers")):
            return plan
    return None


def applied_to(model: nn.Module, name: str) -> list[Applied]:
    """What torchslim verbs left on layer ``name`` that is still there, from its class, the
    parametrizations on its tensors and the model's record of plans (for the verb and mode).

    A plain layer (also one whose masks or clusters were made permanent by ``ts.finalize_``, or a
    factorized layer's parts) has none.

    Example:
        >>> import torch
        >>> from torchslim._masks import set_masks_
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> applied_to(m, "0")
        []
        >>> _ = set_masks_(m, {"0.weight": torch.ones(2, 2, dtype=torch.bool)})
        >>> applied_to(m, "0")
        [Applied(verb='sparsify_', family='prune', what='a reversible WeightMask on its weight')]
    """
    from torch.nn.utils import parametrize

    module = model.get_submodule(name) if name else model
    found: list[Applied] = []
    cls = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
    fam = _family(cls)
    if fam is not None:
        found.append(Applied(_FAMILY_VERB[fam], fam, cls.__name__))
    for pname, plist in (module.parametrizations.items() if parametrize.is_parametrized(module) else ()):
        for p in plist:
            fam = _family(type(p))
            if fam is None:
                continue
            verb = _FAMILY_VERB[fam]
            what = f"{type(p).__name__} on its {pname}"
            if fam == "prune":
                what = f"a reversible {what}"
            found.append(Applied(verb, fam, what))
    out = []
    for a in found:  # the record names the verb exactly (gptq_) and the mode
        plan = _record(model, _RECORD_KIND.get(a.verb, ""), name)
        if plan is not None and a.family == "quantize":
            mode = (plan.get("config") or {}).get("mode")
            verb = "gptq_" if plan.get("algorithm") == "gptq" else a.verb
            a = Applied(verb, a.family, f"{mode}, {a.what}" if mode else a.what)
        out.append(a)
    return out


def integer_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, class name)`` of the layers that hold their weight as integers (a ``qweight``
    buffer: what ``quantize_`` / ``gptq_`` leave), in module order."""
    return [(n, type(m).__name__) for n, m in model.named_modules()
            if isinstance(getattr(m, "qweight", None), torch.Tensor) and not m.qweight.is_floating_point()]


def integer_layers_note(model: nn.Module, verb: str, *, among: Iterable[str] | None = None) -> str:
    """``""``, or a clause for an error saying which layers hold integer weights (of ``among``, or
    all) and what to do: ``verb`` works on float weights, so it comes before quantization."""
    wanted = None if among is None else set(among)
    found = [(n, c) for n, c in integer_layers(model) if wanted is None or n in wanted]
    if not found:
        return ""
    shown = ", ".join(f"{n} ({c})" for n, c in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (f"; {shown} hold integer weights (left by quantization): apply {verb} to the float model, "
            f"before quantize_ (the order the recipes use)")


def refuse_integer_layers(model: nn.Module, verb: str, *, skip: Iterable[str] = ()) -> None:
    """Refuse, before any change, a model with integer-weight layers ``verb`` would have to take
    (those not in ``skip``): one ``ConfigError`` naming them and what to do instead."""
    skipped = set(skip)
    left = [n for n, _ in integer_layers(model) if n not in skipped]
    if left:
        note = integer_layers_note(model, verb, among=left)[2:]
        raise ConfigError(f"{verb} cannot take this model: {note}, or leave them out with skip={left[:8]!r}")


def refuse_applied(
    model: nn.Module, names: Iterable[str], verb: str, hints: Mapping[str, str | None]
) -> None:
    """Refuse, before any change, layers an earlier verb left something on that ``verb`` cannot take.

    Args:
        model: the model ``verb`` was called on.
        names: the layers ``verb`` selected and would change.
        verb: the verb asking (``"binarize_"``).
        hints: family of the earlier verb (``"quantize"``, ``"prune"``, ``"binarize"``, ``"pack"``)
            -> what to do instead (a format string: :data:`AFTER_FLOAT`, :data:`FINALIZE_FIRST`,
            :data:`SKIP_THEM`, with ``{verb}``, ``{by}``, ``{past}``, ``{name}``, ``{skip}``); families
            not listed (or mapped to None) are taken.

    Raises:
        ConfigError: one line naming the verb, the first such layer, what was applied to it and by
            which verb, and what to do instead (the other refused layers are counted and listed in
            ``skip=``; long lists are cut).

    Example:
        >>> import torch
        >>> from torchslim._masks import set_masks_
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> _ = set_masks_(m, {"0.weight": torch.ones(2, 2, dtype=torch.bool)})
        >>> refuse_applied(m, ["0"], "binarize_", {"prune": FINALIZE_FIRST})
        Traceback (most recent call last):
        ...
        torchslim.errors.ConfigError: binarize_ cannot take '0': it was masked by sparsify_ (a reversible WeightMask on its weight); make it permanent first with ts.finalize_(model), or apply binarize_ before sparsify_
    """
    refused: list[tuple[str, Applied]] = []
    for name in names:
        for a in applied_to(model, name):
            if hints.get(a.family):
                refused.append((name, a))
                break
    if not refused:
        return
    name, a = refused[0]
    others = [n for n, _ in refused[1:]]
    names = [n for n, _ in refused]
    # short enough to read on one line: up to 3 more names, a skip list of up to 6
    skip = repr(names) if len(names) <= 6 else f"[{', '.join(map(repr, names[:6]))}, ...] ({len(names)} layers)"
    hint = str(hints[a.family]).format(verb=verb, by=a.verb, past=a.past, name=name, skip=skip)
    shown = ", ".join(repr(n) for n in others[:3]) + (", ..." if len(others) > 3 else "")
    more = f" (and {len(others)} more: {shown})" if others else ""
    raise ConfigError(f"{verb} cannot take {name!r}{more}: it was {a.past} by {a.verb} ({a.what}); {hint}")
