"""LoRA adapters on ``nn.Linear`` layers: train a low-rank update, then merge it into the weight.

Hu et al. (2021), LoRA: a frozen linear layer ``y = x W^T + b`` gains a trainable update
``scale * x A^T B^T`` with ``A`` of shape ``(r, in)`` (small random values), ``B`` of shape
``(out, r)`` (zeros, so the wrapped model starts exactly as the original) and
``scale = alpha / r``. Only ``A`` and ``B`` train: a few percent of the parameters.

* :class:`LoRALinear` wraps one layer and keeps the original ``nn.Linear`` (same ``Parameter``
  objects) as ``base``;
* :func:`add_lora_` wraps every ``nn.Linear`` inside a module (for an LLM: its decoder layers);
* :func:`merge_lora_` folds ``scale * B @ A`` into each base weight and puts the plain layers
  back: the model is the stock architecture again, with the same ``state_dict`` keys;
* :func:`remove_lora_` puts the plain layers back *without* merging (undo).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> keys = list(model.state_dict())
    >>> add_lora_(model, rank=2, seed=0)
    ['0', '2']
    >>> with torch.no_grad():
    ...     _ = model[0].lora_B.fill_(0.1)  # as if trained
    >>> x = torch.randn(3, 8)
    >>> wrapped = model(x)
    >>> merge_lora_(model)
    ['0', '2']
    >>> type(model[0]).__name__, list(model.state_dict()) == keys, torch.allclose(model(x), wrapped, atol=1e-6)
    ('Linear', True, True)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchslim._utils import is_int, is_number
from torchslim.errors import ConfigError

__all__ = ["LoRALinear", "add_lora_", "lora_layers", "lora_parameters", "merge_lora_", "remove_lora_"]


class LoRALinear(nn.Module):
    """``base(x) + scale * (x @ A^T) @ B^T``: a frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: the layer to adapt; kept as ``self.base`` (its parameters are frozen by :func:`add_lora_`).
        rank: ``r``, the rank of the update (>= 1, at most ``min(in, out)`` is useful).
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        generator: random generator for ``A``'s initial values (``B`` starts at zero).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        self.rank = int(rank)
        self.scale = float(alpha) / self.rank
        w = base.weight
        a = torch.empty(self.rank, base.in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming-uniform(a=sqrt(5)) bound of an nn.Linear
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, device=w.device, dtype=w.dtype))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads ``layer.weight`` (dtype, device) keeps working
        return self.base.weight

    def delta(self) -> torch.Tensor:
        """The weight update ``scale * B @ A``, in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def _check(rank: object, alpha: object) -> float:
    if not is_int(rank) or int(rank) < 1:  # type: ignore[call-overload]
        raise ConfigError(f"LoRA rank must be an integer >= 1; got {rank!r}")
    if alpha is None:
        return float(rank)  # type: ignore[arg-type]
    if not is_number(alpha) or not float(alpha) > 0:  # type: ignore[arg-type]
        raise ConfigError(f"LoRA alpha must be a number > 0 (or None: alpha = rank); got {alpha!r}")
    return float(alpha)  # type: ignore[arg-type]


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    """The :class:`LoRALinear` wrappers inside ``module``, by name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The ``A`` and ``B`` parameters of every wrapper inside ``module``."""
    return [p for m in lora_layers(module).values() for p in (m.lora_A, m.lora_B)]


def add_lora_(module: nn.Module, rank: int, alpha: float | None = None, *, seed: int = 0) -> list[str]:
    """Wrap every ``nn.Linear`` inside ``module`` in a :class:`LoRALinear`, in place.

    Every other parameter of ``module`` (the wrapped weights included) is frozen
    (``requires_grad=False``); :func:`merge_lora_` / :func:`remove_lora_` give it back.

    Args:
        module: where to look (an LLM's decoder-layer list, or a whole model).
        rank: rank ``r`` of every update (>= 1).
        alpha: the update is scaled by ``alpha / rank``; ``None``: ``alpha = rank`` (scale 1).
        seed: seed of the initial ``A`` values.

    Returns:
        The names (relative to ``module``) of the wrapped layers.

    Raises:
        ConfigError: a bad rank or alpha, ``module`` already holds LoRA wrappers, or no
            ``nn.Linear`` is in it. ``module`` is unchanged then.
    """
    alpha = _check(rank, alpha)
    if lora_layers(module):
        raise ConfigError("the module already holds LoRA adapters; merge_lora_ or remove_lora_ them first")
    targets = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and n]
    if not targets:
        raise ConfigError(f"no nn.Linear layer in {type(module).__name__} to put a LoRA adapter on")
    generator = torch.Generator().manual_seed(int(seed))
    wrappers = [(n, LoRALinear(m, int(rank), alpha, generator)) for n, m in targets]  # built first: all or nothing
    frozen = [p for p in module.parameters() if p.requires_grad]
    for n, w in wrappers:
        _set(module, n, w)
    for p in frozen:
        p.requires_grad_(False)
    module._lora_frozen = frozen  # type: ignore[assignment]  # what remove/merge unfreeze again
    return [n for n, _ in wrappers]


def _unwrap(module: nn.Module, merge: bool) -> list[str]:
    layers = lora_layers(module)
    for name, layer in layers.items():
        if merge:
            with torch.no_grad():
                w = layer.base.weight
                w.copy_((w.float() + layer.delta().to(w.device)).to(w.dtype))
        _set(module, name, layer.base)
    for p in module.__dict__.pop("_lora_frozen", []):
        p.requires_grad_(True)
    return list(layers)


def merge_lora_(module: nn.Module) -> list[str]:
    """Fold every adapter's update into its layer's weight and put the plain ``nn.Linear`` back.

    The base layers are the original objects (same ``Parameter`` objects, updated in place), so
    the ``state_dict`` keys are the ones before :func:`add_lora_`; parameters it froze train again.

    Returns:
        The names of the merged layers (empty when there were none).
    """
    return _unwrap(module, merge=True)


def remove_lora_(module: nn.Module) -> list[str]:
    """Put the plain ``nn.Linear`` layers back and drop the adapters, without merging (undo)."""
    return _unwrap(module, merge=False)
