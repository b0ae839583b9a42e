"""Reversible weight masks: the parametrization that pruning sets and other families recognise.

A mask is a :mod:`torch.nn.utils.parametrize` parametrization (:class:`WeightMask`) holding a
boolean buffer: the module's ``weight`` becomes ``original * mask``, where ``original`` is the
*same* ``Parameter`` object as before (optimizers keep working). Pruned entries of the original
are also set to zero, so profiles count the real non-zeros.

This is the machinery only (set, read, re-apply); choosing masks, finalizing them and their plans
are :mod:`torchslim.prune.masks`. It sits below the families so that ``prune`` (which sets masks)
and ``pack`` (which clusters pruned weights and must recognise their masks) share one definition.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 1)
    >>> set_masks_(layer, {"weight": torch.tensor([[True, False]])})
    ['weight']
    >>> get_mask(layer).tolist(), float(layer.weight[0, 1]) == 0.0
    ([[True, False]], True)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.errors import ConfigError

__all__ = [
    "WeightMask",
    "get_mask",
    "mask_module",
    "masked_weights",
    "original",
    "reapply_masks_",
    "set_masks_",
    "split_name",
]


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` with the mask as a boolean buffer (saved in the state dict)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def split_name(name: str) -> tuple[str, str]:
    """``"layer.weight"`` -> ``("layer", "weight")``."""
    module, _, pname = name.rpartition(".")
    return module, pname


def mask_module(module: nn.Module, pname: str) -> WeightMask | None:
    """The :class:`WeightMask` parametrizing ``module.<pname>``, if any."""
    plist = getattr(module, "parametrizations", None)
    if plist is None or pname not in plist:
        return None
    for p in plist[pname]:
        if isinstance(p, WeightMask):
            return p
    return None


def original(module: nn.Module, pname: str) -> torch.Tensor:
    """The stored tensor behind ``module.<pname>`` (the parametrization's original, or the tensor itself)."""
    plist = getattr(module, "parametrizations", None)
    if plist is not None and pname in plist:
        return plist[pname].original
    return getattr(module, pname)


def masked_weights(model: nn.Module) -> dict[str, nn.Module]:
    """``"layer.weight"`` -> module for every weight that carries a :class:`WeightMask`."""
    out = {}
    for name, module in model.named_modules():
        plist = getattr(module, "parametrizations", None)
        if plist is None:
            continue
        for pname in plist:
            if mask_module(module, pname) is not None:
                out[f"{name}.{pname}" if name else pname] = module
    return out


def get_mask(module: nn.Module, pname: str = "weight") -> torch.Tensor | None:
    """The boolean keep-mask of ``module.<pname>`` (``None`` when it has none)."""
    m = mask_module(module, pname)
    return None if m is None else m.mask


def set_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[str]:
    """Put keep-masks on weights (``"layer.weight"`` -> bool tensor) and zero the pruned originals.

    Registers a :class:`WeightMask` where there is none yet; returns the names that got a new one.
    Shapes are checked for every entry before anything changes.

    Raises:
        ConfigError: unknown name or a mask of the wrong shape.
    """
    modules = dict(model.named_modules())
    targets = []
    for name, mask in masks.items():
        mname, pname = split_name(name)
        module = modules.get(mname)
        if module is None or not isinstance(getattr(module, pname, None), torch.Tensor):
            raise ConfigError(f"no weight named {name!r} in the model")
        if tuple(mask.shape) != tuple(getattr(module, pname).shape):
            raise ConfigError(f"mask for {name} has shape {tuple(mask.shape)}; the weight has {tuple(getattr(module, pname).shape)}")
        targets.append((name, module, pname, mask))
    new = []
    with torch.no_grad():
        for name, module, pname, mask in targets:
            stored = original(module, pname)
            mask = mask.to(device=stored.device, dtype=torch.bool)
            holder = mask_module(module, pname)
            if holder is None:
                parametrize.register_parametrization(module, pname, WeightMask(mask))
                new.append(name)
            else:
                holder.mask.copy_(mask)
            stored.mul_(mask)
    return new


def reapply_masks_(model: nn.Module) -> None:
    """Zero every masked original again (after an optimizer step moved it through momentum)."""
    with torch.no_grad():
        for name, module in masked_weights(model).items():
            pname = split_name(name)[1]
            original(module, pname).mul_(get_mask(module, pname))
