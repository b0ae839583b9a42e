"""``ts.factorize_``: replace layers by products of smaller ones, driven by a ``FactorizeConfig``.

Layer 1 is the tensor functions (:func:`~torchslim.lowrank.svd.svd_factorize`,
:func:`~torchslim.lowrank.tucker.tucker2`, :func:`~torchslim.lowrank.cp.cp`,
:func:`~torchslim.lowrank.spatial.spatial_svd`,
:func:`~torchslim.lowrank.separable.separable_factors`); layer 2 the method objects that turn a
layer into an ``nn.Sequential`` of standard layers; this module is layer 3, the one verb. The
returned :class:`FactorizePlan` says per layer the ranks, the cost before/after and the
kernel's relative error, and lists the layers left alone with the reason. The plan is recorded
on the model, so ``ts.save`` / ``ts.load`` rebuild the factorized structure.

A latency budget (``target=ts.Budget(latency=0.6, runtime="onnxruntime", threads=2)``) chooses
ranks by measured gain in that runtime, not by MACs: see :mod:`torchslim.lowrank._latency`.
Any other rank rule can be checked where the model runs: with ``runtime="onnxruntime"`` (or
``eager``, ``compile``, ``xnnpack``) every layer the rule factorizes is timed there as it is and
factorized at the chosen ranks, on the input shape it really gets, and a layer whose factorized
form is not at least 5% faster is left whole, the measured milliseconds in ``plan.skipped``
(``plan.runtime_check`` has the figures). The recipe ``factorize`` stage does this by default in
the recipe's deploy runtime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from torchslim._config import ConfigDict
from torchslim._modelinfo import AFTER_FLOAT, refuse_applied, register_plan_kind
from torchslim._select import select_modules
from torchslim._utils import is_int, is_number
from torchslim.errors import CheckpointError, ConfigError, SpecError
from torchslim.lowrank import _plan
from torchslim.profile.budget import Budget

__all__ = ["FactorizeConfig", "FactorizePlan", "LayerFactorization", "SkippedLayer", "factorize_", "METHODS"]

METHODS = tuple(_plan.METHODS)
PLAN_KIND = "factorize"


def _names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"FactorizeConfig.{what} must be a module name/glob or a list of them; got {value!r}")


def _fraction(value: Any) -> bool:
    return is_number(value) and 0.0 < float(value) <= 1.0


@dataclass(frozen=True)
class FactorizeConfig(ConfigDict):
    """How :func:`factorize_` chooses layers and ranks. Give exactly one of ``rank``,
    ``energy``, ``target_macs``, ``target_params``, ``target``.

    Attributes:
        method: ``"svd"`` (Linear, or Conv2d as a matrix), ``"tucker"`` (Tucker-2, Kim 2016),
            ``"cp"`` (Lebedev 2015), ``"spatial"`` (kxk -> kx1 + 1xk) or ``"separable"``
            (depthwise + pointwise; the rank is the depth multiplier).
        rank: An integer rank (Tucker-2: both channel ranks, each clamped to its mode), a float
            in (0, 1] as a fraction of each layer's full rank (CP: of ``max(O, I)``, since its
            exact rank bound is far above any useful rank), or ``"vbmf"`` (empirical VBMF on
            each channel-mode unfolding, Kim 2016; CP takes the larger; not for ``separable``).
        energy: Keep this fraction (0, 1] of the squared singular values, per mode.
        target_macs: Largest ranks whose MACs stay within this fraction (0, 1] of the layer's
            (``scope="layer"``) or, with one energy level for all layers, of the model's.
        target_params: The same for parameters.
        target: A :class:`~torchslim.profile.budget.Budget`. ``latency=F``: ranks chosen by the
            measured speed of each layer's factorized forms in the budget's runtime / threads /
            memory format (layers not faster factorized are left whole), then the whole model
            timed against the original until its latency ratio is within the budget (at least a
            5% band: shared CPUs vary that much); ``macs=F`` / ``params=F``: as ``target_macs`` /
            ``target_params`` with ``scope="model"``.
        runtime: With a rank rule (``rank``, ``energy``, ``target_macs``, ``target_params``, a MACs /
            params ``target``): time every layer the rule factorizes, as it is and factorized at
            the chosen ranks, in this runtime (``eager``, ``compile``, ``onnxruntime``,
            ``xnnpack``) on the input shape it gets in a forward of the example inputs (their
            batch), and leave whole each layer whose factorized form is not at least 5% faster
            (lower ranks are not tried: the rule's promise would break). Needs example inputs. Not
            with a latency budget, which names its runtime itself. ``None``: no timing.
        threads: Intra-op threads of those timings (``None``: torch's current setting).
        scope: ``"layer"`` or ``"model"`` (only with a target).
        modules: ``None`` for every layer the method applies to, or names / globs (``"features.*"``).
        skip: Names, globs or ``re:`` patterns of layers to leave alone (``exclude`` is its
            deprecated old name).
        only_if_smaller: Leave a layer alone (and list it in ``plan.skipped``) when its
            factorized form would not have fewer MACs and fewer parameters.
        max_iter: Iterations of CP-ALS (Tucker-2's HOOI uses at most 50).
        seed: Seed of CP-ALS's random initial columns.

    Example:
        >>> cfg = FactorizeConfig(method="tucker", rank="vbmf", skip=("features.0",))
        >>> FactorizeConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    method: str = "svd"
    rank: int | float | str | None = None
    energy: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    target: Budget | None = None
    scope: str = "layer"
    modules: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    only_if_smaller: bool = True
    max_iter: int = 100
    seed: int = 0
    runtime: str | None = None
    threads: int | None = None

    exclude: tuple[str, ...] | None = field(default=None, repr=False, compare=False)  # old name of skip

    def __post_init__(self) -> None:
        self._take_renamed()
        if self.method not in METHODS:
            raise ConfigError(f"FactorizeConfig.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if isinstance(self.target, dict):
            object.__setattr__(self, "target", Budget.from_dict(self.target))
        if self.target is not None and not isinstance(self.target, Budget):
            raise ConfigError(f"FactorizeConfig.target must be a ts.Budget (or a dict of its fields); got {self.target!r}")
        given = [k for k in ("rank", "energy", "target_macs", "target_params", "target") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                "FactorizeConfig needs exactly one of rank=, energy=, target_macs=, target_params=, target=; "
                f"got {', '.join(given) or 'none'}"
            )
        r = self.rank
        if r is not None:
            if isinstance(r, str):
                if r != "vbmf":
                    raise ConfigError(f"FactorizeConfig.rank as a string must be 'vbmf'; got {r!r}")
                if self.method == "separable":
                    raise ConfigError("rank='vbmf' is not defined for method 'separable'; use rank=M, energy= or a target")
            elif is_int(r):
                if r < 1:
                    raise ConfigError(f"FactorizeConfig.rank must be >= 1; got {r}")
            elif isinstance(r, float):
                if not _fraction(r):
                    raise ConfigError(f"FactorizeConfig.rank as a fraction of full rank must be in (0, 1]; got {r}")
            else:
                raise ConfigError(f"FactorizeConfig.rank must be an int, a float in (0, 1] or 'vbmf'; got {r!r}")
        for name in ("energy", "target_macs", "target_params"):
            v = getattr(self, name)
            if v is not None:
                if not _fraction(v):
                    raise ConfigError(f"FactorizeConfig.{name} must be a number in (0, 1]; got {v!r}")
                object.__setattr__(self, name, float(v))
        if self.scope not in ("layer", "model"):
            raise ConfigError(f"FactorizeConfig.scope must be 'layer' or 'model'; got {self.scope!r}")
        if self.scope == "model" and self.target_macs is None and self.target_params is None and self.target is None:
            raise ConfigError("FactorizeConfig.scope='model' needs target_macs=, target_params= or target=")
        if self.modules is not None:
            object.__setattr__(self, "modules", _names(self.modules, "modules"))
        object.__setattr__(self, "skip", _names(self.skip, "skip"))
        if not isinstance(self.only_if_smaller, bool):
            raise ConfigError(f"FactorizeConfig.only_if_smaller must be True or False; got {self.only_if_smaller!r}")
        if not is_int(self.max_iter) or self.max_iter < 1:
            raise ConfigError(f"FactorizeConfig.max_iter must be an integer >= 1; got {self.max_iter!r}")
        if not is_int(self.seed):
            raise ConfigError(f"FactorizeConfig.seed must be an integer; got {self.seed!r}")
        if self.runtime is not None or self.threads is not None:
            if self.runtime is None:
                raise ConfigError("FactorizeConfig.threads says how factorized layers are timed; give runtime= too")
            if self.target is not None and self.target.metric == "latency":
                raise ConfigError("FactorizeConfig.runtime / threads are for rank rules; a latency budget names where "
                                  "it is measured itself (ts.Budget(latency=..., runtime=..., threads=...))")
            from torchslim.export.runtime_latency import check_runtime

            try:
                _, _, threads = check_runtime(self.runtime, None, self.threads)
            except ConfigError as exc:
                raise ConfigError(f"FactorizeConfig.{exc}") from None
            object.__setattr__(self, "threads", threads)

    _renamed: ClassVar[dict[str, str]] = {"exclude": "skip"}


@dataclass
class LayerFactorization:
    """One replaced layer: its ranks, cost before/after and the kernel's relative error."""

    name: str
    type: str
    method: str
    ranks: list[int]
    max_ranks: list[int]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    rel_error: float
    ms_before: float | None = None  # measured alone (all calls) in a latency budget's runtime or config.runtime
    ms_after: float | None = None


@dataclass
class SkippedLayer:
    """A layer left alone, and why."""

    name: str
    type: str
    reason: str


@dataclass
class FactorizePlan:
    """What :func:`factorize_` did. Model totals of MACs are ``None`` without example inputs."""

    config: FactorizeConfig
    layers: list[LayerFactorization] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    energy: float | None = None  # the energy level a model-scope target settled on
    latency: dict[str, Any] | None = None  # a latency budget: the measured ratio, runtime, threads, rounds
    runtime_check: dict[str, Any] | None = None  # a rank rule timed in config.runtime: per-layer ms, left whole

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        return d

    def record(self) -> dict[str, Any]:
        """The JSON recorded on the model for ``ts.load`` to replay."""
        return {
            "kind": PLAN_KIND,
            "config": self.config.to_dict(),
            "layers": [{"name": x.name, "method": x.method, "ranks": list(x.ranks)} for x in self.layers],
        }

    def table(self) -> Any:
        """A table, one row per replaced layer, then the skipped ones: prints as plain text, renders as rich."""
        from rich.table import Table

        from torchslim._text import printable

        title = f"factorize ({self.config.method}): {len(self.layers)} replaced, {len(self.skipped)} left alone"
        if self.latency is not None:
            from torchslim.lowrank._latency import speedup_words

            title += f"; {speedup_words(self.latency)}"
        if self.runtime_check is not None:
            rc = self.runtime_check
            title += (f"; timed in {rc['runtime']} ({rc['threads']} thread{'s' if rc['threads'] != 1 else ''}), "
                      f"{len(rc['left_whole'])} left whole as not faster factorized")
        t = Table(title=title)
        timed = self.latency is not None or self.runtime_check is not None
        cols = ("layer", "ranks", "MACs", "params", "rel. error") + (("ms", "ms after") if timed else ())
        for col in cols:
            t.add_column(col, justify="left" if col == "layer" else "right")
        for x in self.layers:
            ms = (f"{x.ms_before:.3g}", f"{x.ms_after:.3g}") if timed and x.ms_before is not None else ("-", "-")
            t.add_row(
                x.name,
                "x".join(map(str, x.ranks)),
                f"{x.macs_after / max(x.macs_before, 1):.3f}",
                f"{x.params_after / max(x.params_before, 1):.3f}",
                f"{x.rel_error:.3g}",
                *(ms if timed else ()),
            )
        for s in self.skipped:
            t.add_row(f"[dim]{s.name}[/dim]", "-", "-", "-", f"[dim]{s.reason}[/dim]", *(("-", "-") if timed else ()))
        return printable(t)


def _inputs_for(model: nn.Module, example_inputs: Any) -> Any:
    if example_inputs is not None:
        return example_inputs
    from torchslim._modelinfo import example_inputs as remembered

    try:
        return remembered(model)
    except SpecError:
        return None


def factorize_(
    model: nn.Module, config: FactorizeConfig | None = None, example_inputs: Any = None, **overrides: Any
) -> FactorizePlan:
    """Replace layers of ``model`` in place by factorized ``nn.Sequential`` blocks.

    Every decision is made and every decomposition computed before the model is touched, so
    on any error the model is exactly as before. New layers get the original's device, dtype,
    train/eval mode and ``requires_grad``; the plan is recorded on the model for ``ts.save``.

    Args:
        model: The model; changed in place.
        config: A :class:`FactorizeConfig` (or a dict of its fields).
        example_inputs: Inputs to learn each layer's spatial size (exact MACs). Defaults to the
            inputs the model remembers (``ts.create_model``); without any, MACs are estimated
            per output position and model-scope MACs targets are refused.
        overrides: :class:`FactorizeConfig` fields: ``factorize_(model, method="svd", rank=8)``
            is ``factorize_(model, FactorizeConfig(method="svd", rank=8))``.

    Returns:
        A :class:`FactorizePlan`.

    Raises:
        ConfigError: bad config for this model: a name that matches nothing, a layer type with
            no factorization, a rank larger than a layer allows, an unreachable target (a latency
            budget: the closest measured ratio said), a selected layer that is quantized
            (``quantize_``) or binary (``binarize_``).

    Example:
        >>> import torch, torchslim as ts
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> plan = factorize_(model, FactorizeConfig(method="svd", rank=8))
        >>> [(x.name, x.ranks, x.macs_after) for x in plan.layers]
        [('0', [8], 1024), ('2', [8], 592)]
        >>> type(model[0]).__name__, model(torch.randn(2, 64)).shape
        ('Sequential', torch.Size([2, 10]))

        Checked where it runs: a layer not at least 5% faster factorized there stays whole.

        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> plan = factorize_(model, rank=8, runtime="eager", threads=1, example_inputs=torch.randn(1, 64))
        >>> rc = plan.runtime_check
        >>> rc["runtime"], rc["batch"], all(x.ms_after <= 0.95 * x.ms_before for x in plan.layers)
        ('eager', 1, True)
        >>> all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in rc["left_whole"])
        True
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factorize_ needs an nn.Module; got {type(model).__name__}")
    config = FactorizeConfig.build(config, **overrides)
    select_modules(model, config.modules, config.skip, kinds=None)  # a pattern that selects nothing: refused first
    method = _plan.METHODS[config.method]
    chosen, skipped_types = _plan.select(model, method, config.modules, config.skip)
    refuse_applied(model, [n for n, _ in chosen], "factorize_", _CANNOT_TAKE)
    inputs = _inputs_for(model, example_inputs)
    target_macs, target_params, scope = config.target_macs, config.target_params, config.scope
    budget = config.target
    if budget is not None and budget.metric != "latency":  # a MACs / params budget is a model-scope target
        target_macs, target_params = (budget.fraction, None) if budget.metric == "macs" else (None, budget.fraction)
        scope = "model"
    if budget is not None and budget.metric == "latency" and inputs is None:
        raise ConfigError("a latency budget needs example inputs (pass example_inputs=, or build the model with "
                          "ts.create_model)")
    if config.runtime is not None and inputs is None:
        raise ConfigError(f"timing factorized layers in {config.runtime} needs example inputs (pass example_inputs=, "
                          "build the model with ts.create_model, or give runtime=None)")
    metric = 0 if target_macs is not None else 1
    if scope == "model" and metric == 0 and inputs is None:
        raise ConfigError("target_macs with scope='model' needs example inputs (pass example_inputs=)")
    geos = _plan.geometry(model, chosen, inputs)
    cands = []
    for name, module in chosen:
        macs, params = method.original_cost(module, geos[name])
        cands.append(_plan.Candidate(name, module, geos[name], macs, params))

    params_total = sum(p.numel() for p in model.parameters())
    macs_total = None
    if inputs is not None:
        from torchslim.profile import profile

        macs_total = profile(model, inputs, latency=False, size=False).macs
    plan = FactorizePlan(config=config, params_before=params_total, macs_before=macs_total)
    plan.skipped = [SkippedLayer(n, type(m).__name__, r) for n, m, r in skipped_types]

    # ranks for every candidate (validates everything before anything is computed or changed)
    timed = None
    if budget is not None and budget.metric == "latency":
        from torchslim.lowrank import _latency

        timed = _latency.plan(model, method, chosen, inputs, budget)
        plan.latency = timed.report
        plan.skipped += [SkippedLayer(n, type(model.get_submodule(n)).__name__, r) for n, r in timed.skipped]
        cands = [c for c in cands if c.name in timed.ranks]
    elif scope == "model":
        total = macs_total if metric == 0 else params_total
        plan.energy = _plan.model_target_energy(
            method, cands, int(total), target_macs or target_params, metric, config.only_if_smaller
        )
    decided: list[tuple[_plan.Candidate, tuple[int, ...], int, int]] = []
    for c in cands:
        if timed is not None:
            decided.append((c, timed.ranks[c.name], *method.cost(c.module, timed.ranks[c.name], c.geometry)))
            continue
        if config.rank is not None:
            ranks = _plan.fixed_ranks(method, c, config.rank)
        elif config.energy is not None:
            ranks = _plan.energy_ranks(method, c, config.energy)
        elif scope == "model":
            ranks = _plan.energy_ranks(method, c, plan.energy)
        else:
            ranks = _plan.layer_target_ranks(method, c, target_macs or target_params, metric)
        cheaper, macs, params = _plan.worth_it(method, c, ranks)
        if config.only_if_smaller and not cheaper:
            plan.skipped.append(
                SkippedLayer(
                    c.name,
                    type(c.module).__name__,
                    f"factorized at ranks {list(ranks)} it would cost {macs} MACs / {params} params, "
                    f"not less than {c.macs} / {c.params} as it is",
                )
            )
            continue
        decided.append((c, ranks, macs, params))
    checked = None
    if config.runtime is not None and decided:  # a rank rule checked where the model runs
        from torchslim.lowrank import _latency

        checked = _latency.check_faster(model, method, [(c.name, c.module, r) for c, r, _, _ in decided], inputs,
                                        config.runtime, config.threads)
        plan.runtime_check = checked.report
        plan.skipped += [SkippedLayer(c.name, type(c.module).__name__, checked.slower[c.name])
                         for c, _, _, _ in decided if c.name in checked.slower]
        decided = [d for d in decided if d[0].name not in checked.slower]

    # decompose (still nothing changed), then swap every layer in at once
    replacements = []
    for c, ranks, macs, params in decided:
        seq, err = method.factorize(c.module, ranks, max_iter=config.max_iter, seed=config.seed)
        seq.train(c.module.training)
        if not c.module.weight.requires_grad:
            seq.requires_grad_(False)
        replacements.append((c.name, seq))
        ms = (timed.layer_ms.get(c.name, (None, None)) if timed is not None else
              checked.layer_ms.get(c.name, (None, None)) if checked is not None else (None, None))
        plan.layers.append(
            LayerFactorization(
                c.name, type(c.module).__name__, method.name, list(ranks), list(method.max_ranks(c.module)),
                c.macs, macs, c.params, params, err, *ms,
            )
        )
    for name, seq in replacements:
        _set_submodule(model, name, seq)
    plan.params_after = sum(p.numel() for p in model.parameters())
    if macs_total is not None:
        plan.macs_after = macs_total - sum(x.macs_before - x.macs_after for x in plan.layers)
    if plan.layers:
        from torchslim._modelinfo import record_plan

        record_plan(model, plan.record())
    return plan


# what factorize_ cannot take from an earlier verb: the factorized blocks are plain layers, so a
# layer's input quantizer or binary ops would be silently dropped (a mask's or a codebook's values
# are kept: the factorization is of the weight they give)
_CANNOT_TAKE = {"quantize": AFTER_FLOAT, "binarize": AFTER_FLOAT}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _replay(model: nn.Module, plan: dict[str, Any]) -> None:
    """Rebuild the factorized structure of a saved plan on a freshly built model."""
    for entry in plan.get("layers", []):
        name, method_name, ranks = entry.get("name"), entry.get("method"), entry.get("ranks")
        method = _plan.METHODS.get(method_name)
        if method is None:
            raise CheckpointError(f"saved factorize plan names method {method_name!r}; known: {', '.join(METHODS)}")
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"saved factorize plan names layer {name!r}, which the rebuilt model lacks") from exc
        reason = method.unsupported(module)
        if reason is not None or not isinstance(ranks, list) or len(ranks) != len(method.max_ranks(module)):
            raise CheckpointError(f"saved factorize plan does not fit layer {name!r}: {reason or f'ranks {ranks!r}'}")
        seq = method.build(module, tuple(int(r) for r in ranks))
        seq.train(module.training)
        _set_submodule(model, name, seq)


register_plan_kind(PLAN_KIND, _replay)
