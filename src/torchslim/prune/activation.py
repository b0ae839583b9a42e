"""Activation importance (Minitron-style): how strongly calibration data drives each channel.

Calibration batches run through the model once with a forward-pre hook on every ``nn.Linear``
(and every ungrouped convolution) that records, per input feature, the L2 norm of that feature
over every token (every sample and position). A channel of a prunable group then scores the sum,
over the group's tensors that *consume* it along their input dimension, of that statistic at the
channel's positions:

* the residual (hidden) width of a decoder: the inputs of ``q/k/v_proj``, ``gate/up_proj`` of
  every layer and of ``lm_head``;
* an MLP channel: the input of ``down_proj``;
* an attention head: the input of ``o_proj`` summed over the head's ``head_dim`` positions (with
  grouped-query attention a prunable unit is a key/value group: the sum covers its query heads).

The map from a channel to the input positions of a layer is the channel analysis's own
(:meth:`~torchslim.graph.channel_groups.ChannelGroups.positions`), so it holds for any model the
analysis handles, not only decoders. A group that no measured layer consumes (nothing reached it)
falls back to the L2 magnitude of its weights. Channels a model never activates (zeroed) score 0.

``ts.prune_channels_(model, importance="activation", data=...)`` measures on ``data``; any object
with a ``calibrated(model, data)`` method is given the data that way.

Example:
    >>> import torch, torchslim as ts
    >>> m = ts.create_model("zoo:lenet300")
    >>> x = torch.randn(16, 1, 28, 28)
    >>> plan = ts.prune_channels_(m, ratio=0.5, importance="activation", data=[x])
    >>> m.fc1.out_features
    150
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim._registry import register_method
from torchslim.errors import ConfigError
from torchslim.graph.spaces import ChannelGroup, ChannelGroups
from torchslim.graph.surgery import resolve
from torchslim.prune._calib import calibration_batches, run_batches
from torchslim.prune.importance import GroupImportance, MagnitudeImportance

__all__ = ["ActivationImportance", "input_norms"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _measured(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, _CONVS) and module.groups == 1


def input_norms(model: nn.Module, batches: list[Any]) -> dict[int, torch.Tensor]:
    """Per input feature of every ``nn.Linear`` (and ungrouped conv) of ``model``: the L2 norm of
    that feature over every token of ``batches``, keyed by ``id`` of the layer's weight (a weight
    tied to an embedding is found by either name). The model is run in eval mode under
    ``no_grad``; hooks are removed after, whatever happens."""
    sums: dict[int, torch.Tensor] = {}
    handles = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return
        x = x.detach().float()
        x = x.movedim(1, -1) if isinstance(module, _CONVS) else x
        sq = x.reshape(-1, x.shape[-1]).pow(2).sum(0).double().cpu()
        key = id(module.weight)
        sums[key] = sums[key] + sq if key in sums else sq

    for m in model.modules():
        if _measured(m) and isinstance(getattr(m, "weight", None), torch.Tensor):
            handles.append(m.register_forward_pre_hook(hook))
    try:
        run_batches(model, batches)
    finally:
        for h in handles:
            h.remove()
    return {k: v.sqrt() for k, v in sums.items()}


@register_method("prune.importance", "activation",
                 description="activation magnitude of each channel on calibration data, summed over its consumers (Minitron)")
class ActivationImportance(GroupImportance):
    """Activation importance (Minitron, Muralidharan 2024); see the module doc.

    Args:
        data: calibration data, when the criterion is used without ``prune_channels_(data=...)``:
            a text data spec or bundle, token ids ``(batch, tokens)``, or batches of model inputs.
        tokenizer: for a text spec (default: the model's own, for a ``pretrained:`` LLM).
        max_tokens: tokens drawn from a text spec.
    """

    def __init__(self, data: Any = None, *, tokenizer: Any = None, max_tokens: int = 2048) -> None:
        self.data = data
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.norms_: dict[int, torch.Tensor] | None = None

    def calibrated(self, model: nn.Module, data: Any = None) -> ActivationImportance:
        """A copy holding the statistics measured on ``data`` (or the data given when built).

        Raises:
            ConfigError: no data either way, or data of a kind that cannot be run.
        """
        batches = calibration_batches(model, data if data is not None else self.data, tokenizer=self.tokenizer,
                                      max_tokens=self.max_tokens, what="importance 'activation'")
        out = ActivationImportance(self.data, tokenizer=self.tokenizer, max_tokens=self.max_tokens)
        out.norms_ = input_norms(model, batches)
        return out

    def __call__(self, model: nn.Module, cg: ChannelGroups, group: ChannelGroup) -> torch.Tensor:
        if self.norms_ is None:
            raise ConfigError("importance 'activation' needs calibration data: pass data= to prune_channels_, "
                              "or build ActivationImportance(data=...)")
        score = torch.zeros(group.size, dtype=torch.float64)
        found = False
        for name, dim in group.members:
            if dim != 1:  # the input dimension of a Linear / conv weight
                continue
            module, attr = resolve(model, name)
            stat = self.norms_.get(id(getattr(module, attr)))
            if stat is None or attr != "weight":
                continue
            pos, chan = cg.positions(group, name, dim)
            if len(pos) == 0 or int(pos.max()) >= stat.numel():
                continue
            score.index_add_(0, torch.from_numpy(chan), stat[torch.from_numpy(pos)])
            found = True
        return score if found else MagnitudeImportance(2)(model, cg, group)
