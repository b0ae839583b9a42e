"""Which student layer learns from which teacher layer: by name, by depth, or found automatically.

Example:
    >>> map_by_depth(["s0", "s1"], ["t0", "t1", "t2", "t3"])
    {'s0': 't1', 's1': 't3'}
    >>> map_by_name(["fc1", "fc2"], ["fc1", "fc2", "fc3"])
    {'fc1': 'fc1', 'fc2': 'fc2'}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchslim._utils import evaluating, logits_of
from torchslim.errors import ConfigError

__all__ = ["map_by_depth", "map_by_name", "map_layers", "auto_taps", "MAPPINGS"]

MAPPINGS = ("depth", "name")


def map_by_depth(student: Sequence[str], teacher: Sequence[str]) -> dict[str, str]:
    """Student layer ``i`` of ``m`` learns from teacher layer ``ceil((i + 1) * n / m) - 1``.

    The uniform strategy of TinyBERT (Jiao et al. 2020): layers are spread evenly over the
    teacher's depth and the last student layer always meets the last teacher layer.

    Raises:
        ConfigError: Either list is empty.
    """
    m, n = len(student), len(teacher)
    if m == 0 or n == 0:
        raise ConfigError(f"depth mapping needs layers on both sides; got {m} student and {n} teacher layer(s)")
    return {name: teacher[-(-(i + 1) * n // m) - 1] for i, name in enumerate(student)}


def map_by_name(student: Sequence[str], teacher: Sequence[str]) -> dict[str, str]:
    """Each student layer learns from the teacher layer of the same name.

    Raises:
        ConfigError: A student layer has no teacher layer of that name.
    """
    missing = [name for name in student if name not in teacher]
    if missing:
        raise ConfigError(
            f"name mapping: the teacher has no layer(s) {missing}; teacher layers: {', '.join(teacher) or 'none'}"
        )
    return {name: name for name in student}


def map_layers(student: Sequence[str], teacher: Sequence[str], mapping: str | Mapping[str, str]) -> dict[str, str]:
    """Pair student with teacher layers: ``"depth"``, ``"name"`` or an explicit dict.

    Raises:
        ConfigError: An unknown mapping or one that cannot be built.
    """
    if isinstance(mapping, Mapping):
        return dict(mapping)
    if mapping == "depth":
        return map_by_depth(student, teacher)
    if mapping == "name":
        return map_by_name(student, teacher)
    raise ConfigError(f"mapping must be one of {', '.join(map(repr, MAPPINGS))} or a dict; got {mapping!r}")


def _signature(t: torch.Tensor) -> tuple[int, ...] | None:
    if t.dim() == 4:
        return tuple(t.shape[2:])  # spatial size of a feature map
    if t.dim() == 2:
        return (t.shape[1],)  # width of a hidden layer
    return None


def auto_taps(model: nn.Module, inputs: Any, kind: str = "features") -> list[str]:
    """Pick feature layers automatically from one probe forward (in eval mode, no grad).

    ``kind="features"`` (hint, attention transfer): walk the modules in the order their forward
    ends and group consecutive ones whose outputs have the same spatial size (feature maps) or
    width (hidden vectors); the last module of each group is a stage end and becomes a tap.
    Parents end after their children, so a stage's container wins over its last layer. Taps start
    at the first module with parameters; views of the previous tap (a flatten) and the module
    whose output is the model's output (the logits) are never taps.

    ``kind="maps"`` (attention transfer): the same, keeping feature maps ``(N, C, H, W)`` larger
    than 1x1 only.

    ``kind="layers"`` (TinyBERT): the children of the longest ``nn.ModuleList`` (the blocks of
    a transformer).

    Raises:
        ConfigError: No candidate layer was found.
    """
    if kind == "layers":
        lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise ConfigError(f"{type(model).__name__} has no nn.ModuleList of blocks; name the layers to tap")
        name, blocks = max(lists, key=lambda item: len(item[1]))
        return [f"{name}.{i}" if name else str(i) for i in range(len(blocks))]
    order: list[tuple[str, torch.Tensor]] = []
    handles = []

    def record(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                order.append((name, output))

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(record(name)))
    try:
        with evaluating(model), torch.no_grad():
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    out = logits_of(out)
    modules = dict(model.named_modules())
    out_ptr = out.data_ptr() if isinstance(out, torch.Tensor) else -1
    taps: list[str] = []
    last_sig: tuple[int, ...] | None = None
    last_ptr = -1
    started = False
    for name, value in order:
        if value.data_ptr() == out_ptr:
            break  # the logits and everything after them
        started = started or any(True for _ in modules[name].parameters())
        sig = _signature(value)
        if not started or sig is None or (kind == "maps" and (value.dim() != 4 or value[0, 0].numel() == 1)):
            continue
        if value.data_ptr() == last_ptr and sig != last_sig:
            continue  # a view of the previous tap (flatten, reshape)
        if taps and sig == last_sig:
            taps[-1] = name
        else:
            taps.append(name)
        last_sig, last_ptr = sig, value.data_ptr()
    if not taps:
        raise ConfigError(
            f"found no feature layers in {type(model).__name__} to tap automatically; name them with taps=[...]"
        )
    return taps
