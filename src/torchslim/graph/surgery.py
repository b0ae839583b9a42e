"""Transactional surgery: slice parameters and buffers, fix module attributes, all or nothing.

``slice_model_(model, keep)`` takes, for each parameter/buffer name, the indices to keep per
dimension, builds every new tensor first, swaps them in (the same ``nn.Parameter`` objects stay
in place, so references held by users remain valid), updates the module attributes that
describe shapes (``out_channels``, ``in_features``, ``num_features``, ``groups``,
``normalized_shape``, ``embedding_dim``...), and checks the model still runs. On any failure
the model is restored exactly as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError, ModelRunError
from torchslim.graph._detection import sync_vision_attributes
from torchslim.graph._hf import ConfigSync, config_fields, head_dim_free, is_hf_model, sync_config
from torchslim.graph._mha import sync_mha
from torchslim.graph._swin import swin_attention_types, switch_swin_
from torchslim.graph.state import ModelState, preserved

__all__ = ["ConfigSync", "config_fields", "head_dim_free", "is_hf_model", "slice_model_", "sync_config",
           "sync_module_attributes"]

KeepMap = Mapping[str, Sequence[torch.Tensor | Sequence[int] | None]]

_ATTRS = (
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
    "normalized_shape", "num_channels", "num_groups", "embedding_dim", "num_parameters", "nf", "nx",
    "embed_dim", "kdim", "vdim", "num_heads", "input_size", "hidden_size",
)


def resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(owning module, attribute name) of a qualified parameter/buffer name."""
    prefix, _, attr = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), attr


def sync_module_attributes(module: nn.Module) -> None:
    """Set the shape attributes of a standard module from its (already sliced) tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        old_in = module.in_channels
        depthwise = module.groups > 1 and module.groups == old_in and not module.transposed and w.shape[1] == 1
        if module.transposed:
            module.in_channels = w.shape[0]
            module.out_channels = w.shape[1] * module.groups
        else:
            if depthwise:
                module.groups = w.shape[0] if module.out_channels == old_in else module.groups
            module.out_channels = w.shape[0]
            module.in_channels = w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, (nn.modules.batchnorm._NormBase,)):
        t = module.weight if module.weight is not None else module.running_mean
        if t is not None:
            module.num_features = t.shape[0]
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm):
        if module.weight is not None:
            old = module.num_channels
            module.num_channels = module.weight.shape[0]
            if module.num_groups == old:
                module.num_groups = module.num_channels
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 linear
        module.nx, module.nf = module.weight.shape
    elif isinstance(module, nn.MultiheadAttention):
        sync_mha(module)
    elif isinstance(module, nn.RNNBase) and hasattr(module, "weight_ih_l0"):
        module.input_size = module.weight_ih_l0.shape[1]
        module.hidden_size = module.weight_hh_l0.shape[1]
        module._init_flat_weights()  # the cached list of (same) parameters, re-read


def _snapshot(module: nn.Module) -> dict[str, Any]:
    snap = {a: getattr(module, a) for a in _ATTRS if hasattr(module, a)}
    snap["__class__"] = type(module)
    return snap


def _restore(module: nn.Module, snap: dict[str, Any]) -> None:
    module.__class__ = snap["__class__"]
    for a, v in snap.items():
        if a != "__class__":
            setattr(module, a, v)


def slice_model_(
    model: nn.Module,
    keep: KeepMap,
    *,
    example_inputs: Any = None,
    attrs: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Keep only the given indices of the named parameters/buffers, in place, transactionally.

    Args:
        model: the model to change.
        keep: ``{name: [indices or None per dimension]}``; None keeps that dimension whole.
        example_inputs: when given, the changed model is run once on them; if that fails the
            change is rolled back and :class:`ModelRunError` is raised.
        attrs: extra module attributes to set, ``{module path: {attribute: value}}`` (head
            counts and widths of attention modules).

    Raises:
        ConfigError: a name is not a parameter/buffer of the model, a dimension would become
            empty, or an index is out of range. Nothing is changed.
    """
    planned: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    for name, dims in keep.items():
        try:
            module, attr = resolve(model, name)
        except AttributeError as exc:
            raise ConfigError(f"{name!r} is not a parameter or buffer of the model") from exc
        old = getattr(module, attr, None)
        if not isinstance(old, torch.Tensor):
            raise ConfigError(f"{name!r} is not a parameter or buffer of the model")
        if id(old) in seen:  # tied tensors: slice once
            continue
        seen.add(id(old))
        if len(dims) != old.dim():
            raise ConfigError(f"{name!r} has {old.dim()} dimensions, the plan gives {len(dims)}")
        new = old.detach()
        for d, idx in enumerate(dims):
            if idx is None:
                continue
            idx_t = torch.as_tensor(idx, dtype=torch.long).cpu()
            if idx_t.numel() == 0:
                raise ConfigError(f"pruning would leave {name!r} with no entries in dimension {d}")
            if int(idx_t.max()) >= old.shape[d] or int(idx_t.min()) < 0:
                raise ConfigError(f"index out of range for {name!r} dimension {d} (size {old.shape[d]})")
            new = new.index_select(d, idx_t.to(old.device))
        planned.append((module, attr, old, new.clone()))

    modules = {id(m): m for m, _, _, _ in planned}
    swin = swin_attention_types()
    swin_touched: list[str] = []
    for name, m in model.named_modules():  # attention modules: their out_proj may be all that changed
        if isinstance(m, (nn.MultiheadAttention, *swin)) and any(id(c) in modules for c in m.modules()):
            modules[id(m)] = m
            if isinstance(m, swin):
                swin_touched.append(name)
    attrs_before = {mid: _snapshot(m) for mid, m in modules.items()}
    extra: list[tuple[nn.Module, str, Any]] = []
    for path, values in (attrs or {}).items():
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError as exc:
            raise ConfigError(f"{path!r} is not a module of the model") from exc
        for a in values:
            extra.append((mod, a, getattr(mod, a, None)))
    datas_before = [(m, a, old, old.data) for m, a, old, _ in planned]
    before = ModelState((model,))  # everything else it holds (graph.state), put back on failure
    synced = None
    try:
        switch_swin_(model, set(swin_touched))  # widths no longer tied to the input (graph._swin)
        for module, attr, old, new in planned:
            if isinstance(old, nn.Parameter):
                old.data = new
                old.grad = None
            else:
                module._buffers[attr] = new
        for m in modules.values():
            sync_module_attributes(m)
        sync_vision_attributes(model)  # widths composite blocks keep as ints (graph._detection)
        for path, values in (attrs or {}).items():
            mod = model.get_submodule(path) if path else model
            for a, v in values.items():
                setattr(mod, a, v)
        synced = sync_config(model)  # transformers: model.config follows the new widths (graph._hf)
        if example_inputs is not None:
            from torchslim._utils import evaluating
            from torchslim.graph.inputs import as_inputs, call_model

            inputs = as_inputs(example_inputs)
            # the check run leaves nothing behind (caches of the new widths included)
            with preserved(model, inputs.args, inputs.kwargs), evaluating(model), torch.no_grad():
                call_model(model, inputs)
    except Exception as exc:
        if synced is not None:
            synced[1]()  # undo the config sync
        for module, attr, old, data in datas_before:
            if isinstance(old, nn.Parameter):
                old.data = data
            else:
                module._buffers[attr] = old
        for mid, m in modules.items():
            _restore(m, attrs_before[mid])
        for mod, a, v in extra:
            setattr(mod, a, v)
        with torch.no_grad():
            before.restore()
        if isinstance(exc, ConfigError):
            raise
        raise ModelRunError(
            f"the pruned model no longer runs ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "the model was restored unchanged"
        ) from exc
