"""Trained weight sharing (Deep Compression, Han et al. 2016): per-layer k-means codebooks.

:func:`cluster_` replaces each selected weight by ``codebook[indices]``: a 1-D k-means over the
layer's *non-zero* weights finds ``2**bits`` centroids, every non-zero weight keeps the index of
its nearest centroid, and pruned zeros stay exactly zero (they get the reserved index ``2**bits``,
which always maps to 0). The weight becomes a :mod:`torch.nn.utils.parametrize` parametrization
(:class:`SharedWeight`) whose ``original`` parameter *is* the codebook, so autograd sums the
gradients of all weights of a cluster into its centroid, and the shared train loop
(``ts.fit``, ``ts.distill``) fine-tunes the centroids with no special callback, as the paper does.

The step is recorded as a ``"cluster"`` plan, so ``ts.save`` / ``ts.load`` round-trip a clustered
model; :func:`bake_clusters` (``ts.finalize_``; ``bake_`` is its deprecated name) turns the shared
weights back into plain tensors holding only codebook values.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.pack import cluster_
    >>> model = ts.create_model("zoo:lenet300")
    >>> plan = cluster_(model, bits=4)
    >>> sorted(plan.layers)
    ['fc1.weight', 'fc2.weight', 'fc3.weight']
    >>> int(torch.unique(model.fc1.weight).numel()) <= 16
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim._config import ConfigDict
from torchslim._masks import WeightMask
from torchslim._modelinfo import AFTER_FLOAT, refuse_applied
from torchslim._select import as_patterns, check_patterns, first_match, select_modules
from torchslim._utils import is_int
from torchslim.errors import CheckpointError, ConfigError

__all__ = [
    "INITS",
    "PLAN_KIND",
    "ClusterConfig",
    "ClusterPlan",
    "SharedWeight",
    "kmeans_1d",
    "cluster_",
    "bake_",
    "bake_clusters",
    "clustered_layers",
    "index_dtype",
]

INITS = ("linear", "density", "random")
PLAN_KIND = "cluster"
CLUSTERABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def check_bits(bits: Any, name: str = "bits") -> int:
    """``bits`` as an int in 1..8, else :class:`ConfigError`."""
    if not is_int(bits) or not 1 <= bits <= 8:
        raise ConfigError(f"{name} must be an integer from 1 to 8 (2 to 256 shared values per layer); got {bits!r}")
    return int(bits)


def index_dtype(bits: int) -> torch.dtype:
    """Dtype of the index buffer: it holds ``0 .. 2**bits`` (the last value marks a pruned zero)."""
    return torch.uint8 if 2**bits < 255 else torch.int16


# --------------------------------------------------------------------------- k-means


def _init_centroids(x: torch.Tensor, k: int, init: str, generator: torch.Generator) -> torch.Tensor:
    lo, hi = float(x.min()), float(x.max())
    if init == "linear":  # evenly spaced between min and max (the paper's best)
        return torch.linspace(lo, hi, k, dtype=torch.float64)
    if init == "density":  # evenly spaced on the CDF: quantiles of the weights
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        return torch.quantile(x, q) if x.numel() <= 16_000_000 else torch.quantile(x[:: x.numel() // 1_000_000 + 1], q)
    idx = torch.randperm(x.numel(), generator=generator)[:k]  # random: k of the weights (Forgy)
    c = x[idx]
    if c.numel() < k:
        c = torch.cat([c, c.new_full((k - c.numel(),), float(c.mean()) if c.numel() else 0.0)])
    return c


def kmeans_1d(
    values: torch.Tensor, k: int, *, init: str = "linear", seed: int = 0, max_iter: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on a 1-D set of values.

    Args:
        values: any shape; flattened (computed in float64).
        k: number of centroids (>= 1).
        init: ``"linear"`` (evenly spaced over [min, max]), ``"density"`` (quantiles) or ``"random"``.
        seed: seed of the ``"random"`` initialisation.
        max_iter: at most this many assignment/update rounds (stops earlier when nothing moves).

    Returns:
        ``(centroids, assignment)``: ``k`` float64 centroids in increasing order (an empty cluster
        keeps its last position) and the int64 index of the nearest centroid of every value.

    Example:
        >>> c, a = kmeans_1d(torch.tensor([0.1, 0.11, 0.9, 1.0]), 2)
        >>> a.tolist()
        [0, 0, 1, 1]
    """
    if init not in INITS:
        raise ConfigError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    x = values.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if x.numel() == 0:
        return torch.zeros(k, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    c = _init_centroids(x, k, init, torch.Generator().manual_seed(seed)).sort().values
    xs = x.sort().values  # on sorted values a cluster is a slice: sums come from prefix sums
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), xs.cumsum(0)])
    bounds = None
    for _ in range(max(1, max_iter)):
        mids = (c[1:] + c[:-1]) / 2
        # cluster j holds the values in (mids[j-1], mids[j]]: the same rule as the assignment below
        new = torch.cat([torch.zeros(1, dtype=torch.int64), torch.searchsorted(xs, mids, right=True),
                         torch.tensor([xs.numel()])])
        if bounds is not None and torch.equal(new, bounds):
            break
        bounds = new
        counts = bounds[1:] - bounds[:-1]
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c).sort().values
    assign = torch.searchsorted((c[1:] + c[:-1]) / 2, x)
    return c, assign


# --------------------------------------------------------------------------- the parametrization


class SharedWeight(nn.Module):
    """Parametrization ``codebook -> cat(codebook, [0])[indices]``: a weight of shared values.

    ``original`` (the module's former weight ``Parameter``, resized in place by
    :mod:`~torch.nn.utils.parametrize`) holds the ``2**bits`` centroids; ``indices`` (a buffer
    of the weight's shape) picks one per weight, the value ``2**bits`` meaning a pruned zero.
    Assigning a dense tensor to the weight sets each centroid to the mean of its cluster.
    """

    def __init__(self, indices: torch.Tensor, codebook: torch.Tensor) -> None:
        super().__init__()
        self.k = int(codebook.numel())
        self.bits = max(1, (self.k - 1).bit_length())
        self.register_buffer("indices", indices.detach().to(index_dtype(self.bits)).clone())
        self._fallback = codebook.detach().clone()

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        table = torch.cat([codebook, codebook.new_zeros(1)])
        return table[self.indices.long()]

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The codebook that best gives ``weight`` with the current indices: per-cluster means."""
        idx = self.indices.long().reshape(-1).to(weight.device)
        w = weight.detach().reshape(-1).to(torch.float64)
        counts = torch.bincount(idx, minlength=self.k + 1)[: self.k]
        sums = torch.bincount(idx, weights=w, minlength=self.k + 1)[: self.k]
        fallback = self._fallback.to(device=weight.device, dtype=torch.float64)
        return torch.where(counts > 0, sums / counts.clamp(min=1), fallback).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, shape={tuple(self.indices.shape)}"


def _shared(module: nn.Module, pname: str = "weight") -> SharedWeight | None:
    plist = getattr(module, "parametrizations", None)
    if plist is None or pname not in plist:
        return None
    for p in plist[pname]:
        if isinstance(p, SharedWeight):
            return p
    return None


def clustered_layers(model: nn.Module) -> dict[str, tuple[nn.Module, SharedWeight]]:
    """``"layer.weight"`` -> (module, its :class:`SharedWeight`) for every clustered weight."""
    out = {}
    for name, module in model.named_modules():
        sw = _shared(module)
        if sw is not None:
            out[f"{name}.weight" if name else "weight"] = (module, sw)
    return out


# --------------------------------------------------------------------------- config and plan


@dataclass(frozen=True)
class ClusterConfig(ConfigDict):
    """Settings of :func:`cluster_` (``cluster_(model, **cfg.to_dict())``).

    Attributes:
        bits: index bits per weight, 1..8 (``2**bits`` shared values per layer).
        init: centroid initialisation: ``"linear"``, ``"density"`` or ``"random"``.
        modules: module names, globs or ``"re:<regex>"`` to cluster (all Linear/Conv/Embedding by default).
        skip: names, globs or ``"re:"`` patterns of modules to leave as they are.
        layer_bits: per-module bits (name/glob/``re:`` -> bits), e.g. ``{"conv*": 8}``.
        seed: seed of the random initialisation.
        max_iter: at most this many k-means rounds.
    """

    bits: int = 5
    init: str = "linear"
    modules: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    layer_bits: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    max_iter: int = 300


    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        object.__setattr__(self, "modules", as_patterns(self.modules, "modules"))
        object.__setattr__(self, "skip", as_patterns(self.skip, "skip", none_ok=False))
        object.__setattr__(self, "layer_bits", dict(self.layer_bits or {}))
        as_patterns(tuple(self.layer_bits), "layer_bits")
        for pat, b in self.layer_bits.items():
            check_bits(b, f"layer_bits[{pat!r}]")
        if not is_int(self.seed):
            raise ConfigError(f"seed must be an integer; got {self.seed!r}")
        if not is_int(self.max_iter) or self.max_iter < 1:
            raise ConfigError(f"max_iter must be a positive integer; got {self.max_iter!r}")


@dataclass
class ClusterPlan:
    """What :func:`cluster_` did.

    Attributes:
        bits, init: the settings.
        layers: ``"layer.weight"`` -> ``{"bits", "numel", "nonzero", "clusters_used"}``.
    """

    bits: int
    init: str
    layers: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def shared_weights(self) -> int:
        """Non-zero weights now sharing codebook values, over all clustered layers."""
        return sum(v["nonzero"] for v in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _select(model: nn.Module, cfg: ClusterConfig) -> dict[str, tuple[nn.Module, int]]:
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, CLUSTERABLE)}
    check_patterns(tuple(cfg.layer_bits), [n for n, _ in model.named_modules()], "layer_bits")
    chosen = {}
    for name in select_modules(model, cfg.modules, cfg.skip, kinds=CLUSTERABLE):
        pattern = first_match(name, cfg.layer_bits)
        chosen[name] = (candidates[name], cfg.bits if pattern is None else cfg.layer_bits[pattern])
    if not chosen:
        from torchslim._modelinfo import integer_layers_note

        raise ConfigError(
            f"modules={list(cfg.modules) if cfg.modules is not None else None!r}, skip={list(cfg.skip)!r} select no "
            f"Linear/Conv/Embedding layer to cluster; the model's are: {', '.join(candidates) or 'none'}"
            f"{integer_layers_note(model, 'cluster_')}"
        )
    for name, (module, _) in chosen.items():
        if _shared(module) is not None:
            raise ConfigError(
                f"{name}.weight is already clustered; make it permanent first with ts.finalize_(model), "
                f"or leave it out with skip=[{name!r}]"
            )
    # a fake-quantized weight is computed from its quantizer: cluster the float model, then quantize
    refuse_applied(model, chosen, "cluster_", {"quantize": AFTER_FLOAT})
    for name, (module, _) in chosen.items():
        plist = getattr(module, "parametrizations", None)
        if plist is not None and "weight" in plist:
            others = [type(p).__name__ for p in plist["weight"] if not isinstance(p, WeightMask)]
            if others:
                raise ConfigError(
                    f"{name}.weight is already parametrized by {', '.join(others)}; cluster_ works on plain or "
                    "pruned (masked) weights only: leave it out with skip="
                )
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or not module.weight.is_floating_point():
            raise ConfigError(f"{name}.weight is not a floating-point tensor; it cannot be clustered")
    return chosen


# --------------------------------------------------------------------------- cluster_ / bake_


def _remove_parametrizations(module: nn.Module, pname: str) -> None:
    """``remove_parametrizations`` that leaves deep copies of ``module`` intact.

    A deep copy of a parametrized module shares its injected class with the original, and
    removing a parametrization deletes the property from that class: the other module's
    ``weight`` would vanish. Give the module a class of its own first.
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    parametrize.remove_parametrizations(module, pname, leave_parametrized=True)


def _attach(module: nn.Module, indices: torch.Tensor, codebook: torch.Tensor) -> None:
    plist = getattr(module, "parametrizations", None)
    if plist is not None and "weight" in plist:  # a pruning mask: bake it in, its zeros are kept below
        _remove_parametrizations(module, "weight")
    parametrize.register_parametrization(module, "weight", SharedWeight(indices, codebook))


def cluster_(
    model: nn.Module,
    config: ClusterConfig | Mapping[str, Any] | int | None = None,
    **overrides: Any,
) -> ClusterPlan:
    """Share weights: cluster every selected layer's non-zero weights to ``2**bits`` values, in place.

    Pruned weights (zeros, or entries masked by ``ts.sparsify_``) stay exactly zero and are not
    part of the codebook. Afterwards each weight is ``codebook[indices]`` with the codebook a
    trainable parameter: fine-tune it with ``ts.fit`` / ``ts.distill`` (gradients are summed
    per cluster). ``ts.save`` / ``ts.load`` keep the clustering; ``ts.pack`` writes it entropy coded.

    Args:
        model: changed in place.
        config: a :class:`ClusterConfig` (or a dict of its fields); an integer is ``bits`` (the
            older call form ``cluster_(model, 6)``).
        overrides: :class:`ClusterConfig` fields, e.g. ``cluster_(model, bits=6, skip=["fc3"])``:
        bits: index bits, 1..8 (the paper: 8 for conv layers, 5 for fc layers of AlexNet/VGG;
            6 bits for LeNet-300-100's fc layers).
        init: ``"linear"``, ``"density"`` or ``"random"`` centroid initialisation (paper, section 3.2).
        modules: names, globs or ``"re:<regex>"`` of the modules to cluster (default: every
            Linear, Conv1d/2d/3d and Embedding).
        skip: names, globs or ``"re:"`` patterns to leave alone.
        layer_bits: per-module bits overriding ``bits`` (first matching pattern wins).
        seed: seed of the ``"random"`` initialisation.
        max_iter: at most this many k-means rounds per layer.

    Returns:
        A :class:`ClusterPlan` (bits, and per layer the weights and clusters used).

    Raises:
        ConfigError: bits outside 1..8, an unknown init, a bad pattern, nothing selected, or a
            layer already clustered / parametrized otherwise. The model is unchanged then.
    """
    if config is not None and not isinstance(config, (ClusterConfig, Mapping)):
        if "bits" in overrides:
            raise ConfigError("cluster_: bits given twice (positionally and as bits=)")
        config, overrides = None, {"bits": config, **overrides}
    cfg = ClusterConfig.build(config, **overrides)
    chosen = _select(model, cfg)
    work = []
    with torch.no_grad():  # compute everything first; attach only when every layer succeeded
        for name, (module, b) in chosen.items():
            w = module.weight.detach()
            k = 2**b
            nz = w != 0
            centroids, assign = kmeans_1d(w[nz], k, init=cfg.init, seed=cfg.seed, max_iter=cfg.max_iter)
            indices = torch.full(w.shape, k, dtype=torch.int64, device=w.device)
            indices[nz] = assign.to(w.device)
            codebook = centroids.to(device=w.device, dtype=w.dtype)
            used = int(torch.unique(assign).numel())
            work.append((name, module, b, indices, codebook, w.numel(), int(nz.sum()), used))
    plan = ClusterPlan(cfg.bits, cfg.init)
    for name, module, b, indices, codebook, numel, nonzero, used in work:
        _attach(module, indices, codebook)
        plan.layers[f"{name}.weight"] = {"bits": b, "numel": numel, "nonzero": nonzero, "clusters_used": used}
    from torchslim._modelinfo import model_info, record_plan

    if model_info(model) is not None:
        record_plan(model, {"kind": PLAN_KIND, "action": "cluster", "layers": {n: v["bits"] for n, v in plan.layers.items()},
                            "init": cfg.init})
    return plan


def bake_(model: nn.Module) -> list[str]:
    """Deprecated: ``ts.finalize_(model)`` (or ``ts.finalize_(model, kinds=["clusters"])``).

    Makes every shared weight a plain tensor again and returns the baked weight names.
    """
    import warnings

    warnings.warn("bake_ is deprecated, use ts.finalize_(model) (kinds=['clusters'] for the clusters only); "
                  "bake_ goes in the next release", DeprecationWarning, stacklevel=2)
    return bake_clusters(model) or []


def bake_clusters(model: nn.Module) -> list[str] | None:
    """Make every shared weight a plain tensor again (its values stay the codebook values).

    Training afterwards updates weights one by one again (the sharing is gone); use this to hand
    the model to code that does not expect parametrizations. This is the ``"clusters"`` finalizer
    of ``ts.finalize_``.

    Returns:
        The baked weight names, or None when no weight of ``model`` is clustered.
    """
    layers = sorted(clustered_layers(model))
    if not layers:
        return None
    _bake(model, layers)
    from torchslim._modelinfo import model_info, record_plan

    if model_info(model) is not None:
        record_plan(model, {"kind": PLAN_KIND, "action": "bake", "layers": layers})
    return layers


def _bake(model: nn.Module, layers: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    for name in layers:
        module = modules[name.rpartition(".")[0]]
        if _shared(module) is not None:
            _remove_parametrizations(module, "weight")


def _replay(model: nn.Module, plan: dict[str, Any]) -> None:
    """Re-create a saved cluster step on a fresh model (placeholder codebooks; weights load after)."""
    action, layers = plan.get("action"), plan.get("layers")
    modules = dict(model.named_modules())
    names = list(layers or [])
    for name in names:
        mname, _, pname = name.rpartition(".")
        if pname != "weight" or mname not in modules or not isinstance(getattr(modules[mname], "weight", None), torch.Tensor):
            raise CheckpointError(f"cluster plan names {name!r}, which the rebuilt model does not have")
    if action == "cluster" and isinstance(layers, dict):
        for name, b in layers.items():
            b = check_bits(b, f"saved bits of {name}")
            module = modules[name.rpartition(".")[0]]
            w = module.weight
            _attach(module, torch.zeros(w.shape, dtype=torch.int64, device=w.device), w.new_zeros(2**b))
    elif action == "bake":
        _bake(model, names)
    else:
        raise CheckpointError(f"cluster plan has unknown action {action!r} (known: cluster, bake)")


def _register() -> None:
    from torchslim._modelinfo import register_plan_kind

    register_plan_kind(PLAN_KIND, _replay)
    from torchslim._finalize import register_finalizer

    register_finalizer("clusters", bake_clusters, family="pack", order=20)


_register()
