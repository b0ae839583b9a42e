"""``ts.search``: the most accurate compressed model for a budget, searched with Optuna.

Each trial samples one pruning ratio per coupled channel group (and, if asked, one bit width and
one rank fraction per layer), scales the channels toward the MACs/params budget (the cost model
knows what the factorization saves), compresses a copy of the model, recovers
it briefly (short fine-tune or BatchNorm recalibration), and reports validation accuracy with the
measured costs. The study lives in an Optuna RDB storage (a SQLite file in the output directory by
default; any number of workers can share a PostgreSQL one), so a stopped search resumes and a
search can spread over machines.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from torchslim._config import ConfigDict
from torchslim._optional import require
from torchslim._utils import atomic_path, is_int, is_number
from torchslim.errors import ConfigError, ModelRunError, TorchslimError
from torchslim.search import _outputs
from torchslim.search._apply import apply_stages_, make_stages, recipe_dict, write_recipe
from torchslim.search._storage import STUDY_ATTR, open_storage, redact, sqlite_url, trial_counts
from torchslim.search.cost import CostModel
from torchslim.search.objectives import (
    bn_recalibrate_,
    directions,
    fractions,
    measure,
    paired_latency,
    parse_budget,
    parse_objectives,
    repair_metric,
    validation_accuracy,
)
from torchslim.search.space import SearchSpace, build_space

__all__ = ["SearchConfig", "SearchResult", "search", "DEFAULT_STUDY"]

DEFAULT_STUDY = "torchslim-search"
EVALUATIONS = ("finetune", "bn", "none")
SAMPLERS = ("auto", "tpe", "nsga2", "random")


@dataclass(frozen=True)
class SearchConfig(ConfigDict):
    """How :func:`search` searches (a frozen value that round-trips through ``to_dict``/``from_dict``).

    Attributes:
        objectives: metrics to optimise: ``accuracy`` (maximised), ``macs``, ``params``, ``size``,
            ``latency`` (minimised, fractions of the original). One: TPE with the budget as a
            constraint; several: NSGA-II and a Pareto front.
        budget: ``{metric: fraction}`` bounds, e.g. ``{"macs": 0.3}`` (a string ``"macs=0.3"`` works).
        trials: finished trials (complete + pruned) the study should hold; a resumed study or a
            worker joining one runs only the missing ones.
        max_ratio, step: each group's pruning ratio is drawn from ``0, step, ..., max_ratio``.
        skip: module names, globs or ``re:`` patterns whose channels stay whole (``ignore`` is
            its deprecated old name).
        importance: channel importance criterion of ``prune_channels_``.
        min_channels: no group is pruned below this many channels (also when repairing).
        bits: bit widths to choose from per layer, e.g. ``(4, 8)``; ``None``: no quantization.
        quant_mode: ``"weight-only"`` (Linear layers) or ``"static"`` (Conv + Linear).
        quant_layers: names, globs or ``re:`` patterns of the layers whose bits are searched
            (default: all the mode takes).
        ranks: fractions of full rank to choose from per Linear / Conv2d layer, e.g.
            ``(0.25, 0.5, 1.0)`` (``1.0``: not factorized); ``None``: no factorization. Layers are
            factorized after pruning, so a fraction is of the pruned layer's rank.
        rank_layers: names, globs or ``re:`` patterns of the layers whose rank is searched
            (default: every Linear and
            Conv2d with ``groups=1``).
        conv_rank_method: ``"tucker"`` (Tucker-2) or ``"svd"`` for Conv2d layers (Linear: SVD).
        evaluation: ``"finetune"`` (``finetune_steps`` SGD steps), ``"bn"`` (BatchNorm
            recalibration over ``bn_batches`` batches) or ``"none"``; accuracy is then measured
            on the validation split.
        finetune_steps, lr, optimizer, batch_size: the trials' short fine-tune.
        bn_batches: batches of the BatchNorm recalibration proxy.
        final_epochs: epochs of the fine-tune in the written recipe and of the best model.
        sampler: ``"auto"``, ``"tpe"``, ``"nsga2"`` or ``"random"``.
        startup_trials: random trials before TPE models the space; NSGA-II's population size.
        seed: seed of the sampler, of the data split and of the fine-tunes.
        heartbeat: seconds between heartbeats of a running trial (a dead worker's trial is
            failed and retried after ``2 * heartbeat`` seconds of silence).
        device: device of the fine-tunes (``"auto"``, ``"cpu"``, ``"cuda"``).
        runtime: where ``latency`` is measured: ``"eager"`` (the PyTorch module, timed call by call
            beside the original), ``"compile"``, ``"onnxruntime"`` or ``"xnnpack"`` (the original and
            the trial's model prepared in that runtime and timed interleaved,
            :func:`torchslim.export.runtime_latency.latency_ratio`). A ``ts.Budget`` given as
            ``budget`` sets it (and ``threads``) from its own fields.
        threads: intra-op threads of the latency runs (``None``: the current torch setting).
    """

    objectives: tuple[str, ...] = ("accuracy",)
    budget: dict[str, float] = field(default_factory=dict)
    trials: int = 20
    max_ratio: float = 0.9
    step: float = 0.05
    skip: tuple[str, ...] = ()
    importance: str = "l2"
    min_channels: int = 1
    bits: tuple[int, ...] | None = None
    quant_mode: str = "weight-only"
    quant_layers: tuple[str, ...] | None = None
    ranks: tuple[float, ...] | None = None
    rank_layers: tuple[str, ...] | None = None
    conv_rank_method: str = "tucker"
    evaluation: str = "finetune"
    finetune_steps: int = 20
    lr: float = 0.01
    optimizer: str = "sgd"
    batch_size: int = 64
    bn_batches: int = 10
    final_epochs: int = 2
    sampler: str = "auto"
    startup_trials: int = 8
    seed: int = 0
    heartbeat: int = 10
    device: str = "auto"
    runtime: str = "eager"
    threads: int | None = None

    ignore: tuple[str, ...] | None = field(default=None, repr=False, compare=False)  # old name of skip

    _renamed = {"ignore": "skip"}

    def __post_init__(self) -> None:
        self._take_renamed()
        object.__setattr__(self, "objectives", parse_objectives(self.objectives))
        if getattr(self.budget, "metric", None) == "latency":  # a ts.Budget says where latency is measured
            if self.runtime == "eager":
                object.__setattr__(self, "runtime", self.budget.runtime)
            if self.threads is None:
                object.__setattr__(self, "threads", self.budget.threads)
        object.__setattr__(self, "budget", parse_budget(self.budget))
        from torchslim.export.runtime_latency import check_runtime

        check_runtime(self.runtime, None, self.threads)
        from torchslim.prune.importance import get_importance

        get_importance(self.importance)  # an unknown criterion is refused here, not inside every trial
        if self.quant_mode not in ("weight-only", "static"):
            raise ConfigError(f"SearchConfig.quant_mode must be 'weight-only' or 'static'; got {self.quant_mode!r}")
        for name in ("skip", "bits", "quant_layers", "ranks", "rank_layers"):
            v = getattr(self, name)
            if isinstance(v, str):
                raise ConfigError(f"SearchConfig.{name} must be a list, not a string; got {v!r}")
            if v is not None:
                object.__setattr__(self, name, tuple(v))
        ints = {"trials": 1, "min_channels": 1, "finetune_steps": 1, "batch_size": 1, "bn_batches": 1,
                "final_epochs": 0, "startup_trials": 1, "seed": 0, "heartbeat": 1}
        for name, low in ints.items():
            v = getattr(self, name)
            if not is_int(v) or v < low:
                raise ConfigError(f"SearchConfig.{name} must be an integer >= {low}; got {v!r}")
        if not is_number(self.lr) or self.lr <= 0:
            raise ConfigError(f"SearchConfig.lr must be a positive number; got {self.lr!r}")
        if self.evaluation not in EVALUATIONS:
            raise ConfigError(f"SearchConfig.evaluation must be one of {', '.join(EVALUATIONS)}; got {self.evaluation!r}")
        from torchslim.search.space import _check_ranks

        ranks = _check_ranks(self.ranks, self.conv_rank_method)
        if ranks is not None:
            object.__setattr__(self, "ranks", ranks)
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"SearchConfig.sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        from torchslim.train import TrainConfig

        TrainConfig(lr=self.lr, optimizer=self.optimizer, batch_size=self.batch_size, device=self.device)  # validates

    def trial_finetune(self) -> dict[str, Any] | None:
        """The trials' short fine-tune, as ``finetune`` stage options (None unless evaluation='finetune')."""
        if self.evaluation != "finetune":
            return None
        return self._train(epochs=1, max_steps_per_epoch=self.finetune_steps, lr_schedule="constant")

    def final_finetune(self) -> dict[str, Any] | None:
        """The fine-tune of the written recipes and of the best model."""
        return self._train(epochs=self.final_epochs) if self.final_epochs else None

    def _train(self, **extra: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"lr": self.lr, "optimizer": self.optimizer, "batch_size": self.batch_size, "seed": self.seed}
        if self.device != "auto":
            d["device"] = self.device
        return {**extra, **d}


@dataclass
class SearchResult:
    """What :func:`search` returns.

    Attributes:
        study: the Optuna study (``study.trials`` has everything).
        out: the output directory.
        best: the chosen trial: ``trial``, ``values`` (objective -> value), ``metrics``,
            ``recipe`` (path of ``best_recipe.yaml``); None when no trial completed.
        pareto: one dict per front member: ``trial``, ``values``, ``metrics``, ``recipe``.
        trials: counts by state (``complete``, ``pruned``, ``failed``, ``running``, ``waiting``, ``total``).
        model: the compressed best model (fine-tuned), or None.
        report: the JSON report (also written to ``OUT/search.json``).
    """

    study: Any
    out: Path
    best: dict[str, Any] | None
    pareto: list[dict[str, Any]]
    trials: dict[str, int]
    model: nn.Module | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.report)


# --------------------------------------------------------------------------------------- trial


class _Objective:
    """One trial: sample, repair toward the budget, compress a copy, recover, measure."""

    def __init__(self, model: nn.Module, inputs: Any, data: Any, cfg: SearchConfig, space: SearchSpace,
                 cost: CostModel, base: dict[str, float], need_latency: bool) -> None:
        self.model, self.inputs, self.data, self.cfg = model, inputs, data, cfg
        self.space, self.cost, self.base, self.need_latency = space, cost, base, need_latency
        self.repair = repair_metric(cfg.budget)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, trial: Any) -> float | tuple[float, ...]:
        import optuna

        cfg = self.cfg
        trial.set_user_attr("worker", self.worker)
        choice = self.space.sample(trial)
        kept = self.cost.kept_for(choice["ratios"])
        ranks = choice["ranks"]
        if self.repair is not None:
            fixed = self.cost.repair(kept, self.repair, cfg.budget[self.repair], ranks=ranks,
                                     min_channels=cfg.min_channels, grow=len(cfg.objectives) == 1)
            if fixed is None:
                trial.set_user_attr("pruned_because", f"{self.repair} budget cannot be met")
                raise optuna.TrialPruned()
            kept = fixed
        ratios = self.cost.ratios_for(kept)
        trial.set_user_attr("ratios", ratios)
        trial.set_user_attr("kept", {c.key: int(k) for c, k in zip(self.space.groups, kept)})
        trial.set_user_attr("layer_bits", choice["layer_bits"])
        factorized = self.cost.factorized(kept, ranks)
        if ranks:
            trial.set_user_attr("ranks", ranks)
            trial.set_user_attr("factorized", factorized)
        stages = make_stages(ratios, choice["layer_bits"], self.space, importance=cfg.importance, ignore=cfg.skip,
                             finetune=cfg.trial_finetune(), quant_layers=cfg.quant_layers, factorized=factorized)
        model = copy.deepcopy(self.model)
        head = [s for s in stages if "quantize" not in s]
        apply_stages_(model, head, self.data, example_inputs=self.inputs)
        if cfg.evaluation == "bn":
            loader = self.data.loader("train", batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed + trial.number)
            bn_recalibrate_(model, loader, cfg.bn_batches)
        apply_stages_(model, [s for s in stages if "quantize" in s], self.data, example_inputs=self.inputs)
        model.to("cpu").eval()
        absolute = measure(model, self.inputs)
        metrics = fractions(absolute, self.base)
        if self.need_latency:
            if cfg.runtime == "eager" and cfg.threads is None:
                absolute["latency_ms"], absolute["reference_latency_ms"] = paired_latency(self.model, model, self.inputs)
            else:  # prepared in the runtime, timed interleaved with the original
                from torchslim.export.runtime_latency import latency_ratio

                _, t = latency_ratio(self.model, model, self.inputs, cfg.runtime, threads=cfg.threads, runs=10)
                absolute["latency_ms"], absolute["reference_latency_ms"] = t["candidate"].median_ms, t["original"].median_ms
            metrics["latency"] = absolute["latency_ms"] / absolute["reference_latency_ms"]
            trial.set_user_attr("latency_runtime", cfg.runtime)
        trial.set_user_attr("absolute", absolute)
        over = {k: round(metrics[k], 4) for k, v in cfg.budget.items() if k in metrics and metrics[k] > v * (1 + 1e-6)}
        if over:
            trial.set_user_attr("metrics", metrics)
            trial.set_user_attr("pruned_because", f"over budget: {over}")
            raise optuna.TrialPruned()
        metrics["accuracy"] = validation_accuracy(model, self.data)
        trial.set_user_attr("metrics", metrics)
        values = tuple(float(metrics[o]) for o in cfg.objectives)
        return values[0] if len(values) == 1 else values


def _sampler(cfg: SearchConfig, seed: int) -> Any:
    import optuna

    kind = cfg.sampler if cfg.sampler != "auto" else ("tpe" if len(cfg.objectives) == 1 else "nsga2")
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(2, cfg.startup_trials), seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate TPE is "experimental"
        return optuna.samplers.TPESampler(n_startup_trials=cfg.startup_trials, multivariate=True, seed=seed)


def _signature(cfg: SearchConfig, space: SearchSpace) -> dict[str, Any]:
    return {"objectives": list(cfg.objectives), "budget": dict(cfg.budget), "space": space.signature(),
            "evaluation": cfg.evaluation}


# --------------------------------------------------------------------------------------- search


def search(
    model: nn.Module,
    data: Any,
    *,
    out: str | os.PathLike[str],
    budget: Any = None,
    objectives: Any = None,
    trials: int | None = None,
    storage: str | None = None,
    study: str | None = None,
    resume: bool = False,
    config: SearchConfig | None = None,
    example_inputs: Any = None,
    best_model: bool = True,
    progress: bool = True,
    console: Any = None,
) -> SearchResult:
    """Search per-group pruning ratios (and per-layer bits and ranks) for the most accurate model in a budget.

    Args:
        model: the trained model; not modified (every trial works on a copy).
        data: a ``DataBundle`` or data spec: trials fine-tune on its train split and are scored
            on its val split; the best model's accuracy is reported on its test split.
        out: output directory: ``study.db`` (default storage), ``trials.csv``/``.json``,
            ``pareto.json``/``.png``, ``best_recipe.yaml``, ``recipes/`` (one per Pareto member),
            ``best_model/`` (``ts.save``), ``search.json``. Refused when it exists with content,
            unless ``resume``.
        budget: e.g. ``"macs=0.3"`` or ``{"macs": 0.3}`` (overrides ``config.budget``).
        objectives: e.g. ``"accuracy"`` or ``"accuracy,latency"`` (overrides ``config.objectives``).
        trials: finished trials the study should hold (overrides ``config.trials``).
        storage: an Optuna storage URL shared by many workers (``postgresql://...``); default
            ``sqlite:///OUT/study.db``.
        study: the study name (default ``torchslim-search``).
        resume: continue the study of an existing ``out``.
        config: the other settings (:class:`SearchConfig`).
        example_inputs: inputs for tracing and profiling (default: the model's remembered ones).
        best_model: also build, fine-tune and save the best configuration's model.
        progress: print a line per trial (and, without ``console``, the Pareto table).
        console: a rich console for the Pareto table and the trial lines (default: stderr).

    Returns:
        A :class:`SearchResult`.

    Raises:
        ConfigError: bad settings, an existing ``out`` without ``resume``, an unreachable storage,
            an empty search space, a budget no configuration can meet, or a study of the same
            name that searches something else. All of these are raised before any trial runs.
        MissingDependencyError: Optuna is not installed.

    Example:
        >>> import torchslim as ts  # doctest: +SKIP
        >>> model = ts.load("runs/lenet5")  # doctest: +SKIP
        >>> r = ts.search(model, "mnist", budget="macs=0.3", trials=30, out="runs/search")  # doctest: +SKIP
        >>> r.best["recipe"]  # doctest: +SKIP
        'runs/search/best_recipe.yaml'
    """
    optuna = require("optuna", "torchslim search")
    from torchslim._modelinfo import example_inputs as remembered_inputs
    from torchslim.data import load_data

    cfg = config if config is not None else SearchConfig()
    if not isinstance(cfg, SearchConfig):
        raise ConfigError(f"config must be a SearchConfig; got {type(cfg).__name__}")
    overrides = {k: v for k, v in (("budget", budget), ("objectives", objectives), ("trials", trials)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    data = load_data(data, seed=cfg.seed) if isinstance(data, str) else data
    if not getattr(data, "labeled", False):
        raise ConfigError(f"search scores trials by accuracy: data {getattr(data, 'spec', data)!r} must be labeled")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not resume:
        raise ConfigError(f"output directory {str(out)!r} exists; pass resume=True (--resume) to continue its "
                          "search, or choose a new --out")
    if study is not None and (not isinstance(study, str) or not study.strip()):
        raise ConfigError(f"study name must be a non-empty string; got {study!r}")
    from rich.console import Console

    con = console if console is not None else Console(stderr=True, quiet=not progress)  # tables
    lines = con if progress else Console(stderr=True, quiet=True)  # one line per trial
    inputs = example_inputs if example_inputs is not None else remembered_inputs(model)

    space = build_space(model, inputs, max_ratio=cfg.max_ratio, step=cfg.step, skip=cfg.skip, bits=cfg.bits,
                        quant_mode=cfg.quant_mode, quant_layers=cfg.quant_layers, ranks=cfg.ranks,
                        rank_layers=cfg.rank_layers, conv_rank_method=cfg.conv_rank_method)
    cost = CostModel(model, inputs, space, cfg.skip)
    rm = repair_metric(cfg.budget)
    if rm is not None:
        low = {c.layer: min(c.choices) for c in space.layer_ranks}
        floor = cost.min_cost(cfg.min_channels, low)[rm]
        if floor > cfg.budget[rm]:
            ranked = f" and factorizing at rank fraction {min(cfg.ranks)}" if low and cfg.ranks else ""
            raise ConfigError(
                f"budget {rm}={cfg.budget[rm]} cannot be met: pruning every searched group down to "
                f"min_channels={cfg.min_channels}{ranked} still leaves {floor:.3f} of the original {rm} "
                f"(allowed: {rm} >= {floor:.3f}, or lower min_channels)"
            )

    # storage: a given URL is checked before anything is written; the default lives in ``out``
    url = storage or sqlite_url(out)
    shared = storage is not None
    rdb = open_storage(url, heartbeat=cfg.heartbeat) if shared else None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    name = study or DEFAULT_STUDY
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        try:
            rdb = rdb or open_storage(url, heartbeat=cfg.heartbeat)
            sig = _signature(cfg, space)
            existing = {s.study_name: s for s in optuna.get_all_study_summaries(rdb, include_best_trial=False)}
            if name in existing:
                found = existing[name].user_attrs.get(STUDY_ATTR)
                if found is not None and json.loads(json.dumps(found)) != json.loads(json.dumps(sig)):
                    diff = sorted(k for k in sig if found.get(k) != sig[k])
                    raise ConfigError(
                        f"study {name!r} in {redact(url)!r} searches different {', '.join(diff)} "
                        f"({ {k: found.get(k) for k in diff} }); use the same settings to join it, or another study name"
                    )
            pre = optuna.load_study(study_name=name, storage=rdb) if name in existing else None
            seed = cfg.seed + (os.getpid() if shared else 7919 * (len(pre.trials) if pre is not None else 0))
            st = optuna.create_study(storage=rdb, study_name=name, directions=directions(cfg.objectives),
                                     sampler=_sampler(cfg, seed % 2**31), load_if_exists=True)
            if STUDY_ATTR not in st.user_attrs:
                st.set_user_attr(STUDY_ATTR, sig)
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise

        need_latency = "latency" in cfg.objectives or "latency" in cfg.budget
        base = measure(model, inputs)
        lines.print(f"search: {len(space.groups)} channel groups, {len(space.layer_bits)} layer bit widths, "
                    f"{len(space.layer_ranks)} layer ranks; "
                  f"budget {_outputs.budget_words(cfg.budget)}; objectives {', '.join(cfg.objectives)}; study {name!r} "
                  f"in {redact(url)}")
        objective = _Objective(model, inputs, data, cfg, space, cost, base, need_latency)
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

        def report(study_: Any, t: Any) -> None:
            m = t.user_attrs.get("metrics") or {}
            desc = ", ".join(f"{k} {_outputs._fmt(k, v)}" for k, v in m.items())  # accuracy in %, like the table
            why = t.user_attrs.get("pruned_because") or t.system_attrs.get("fail_reason") or ""
            lines.print(f"  trial {t.number}: {t.state.name.lower()} {desc} {why}".rstrip())

        done = sum(t.state in finished for t in st.get_trials(deepcopy=False))
        if cfg.trials > done:
            st.optimize(objective, n_trials=cfg.trials - done, catch=(TorchslimError, RuntimeError),
                        callbacks=[optuna.study.MaxTrialsCallback(cfg.trials, states=finished), report])
        return _finish(st, model, inputs, data, cfg, space, out, url, name, best_model, base, con)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _values(t: Any, objectives: tuple[str, ...]) -> dict[str, float]:
    return {o: float(t.user_attrs["metrics"][o]) for o in objectives}


def _choose_best(complete: list[Any], front: list[Any], objectives: tuple[str, ...]) -> Any:
    if not complete:
        return None
    lead = "accuracy" if "accuracy" in objectives else objectives[0]
    pool = complete if len(objectives) == 1 else front
    second = _outputs.front_metrics(objectives)[1] if len(objectives) == 1 else objectives[-1]

    def key(t: Any) -> tuple[float, float, int]:
        m = t.user_attrs["metrics"]
        sign = -1.0 if lead == "accuracy" else 1.0
        sign2 = -1.0 if second == "accuracy" else 1.0
        return (sign * m[lead], sign2 * m.get(second, 0.0), t.number)

    return min(pool, key=key)


def _finish(st: Any, model: nn.Module, inputs: Any, data: Any, cfg: SearchConfig, space: SearchSpace, out: Path,
            url: str, name: str, best_model: bool, base: dict[str, float], con: Any) -> SearchResult:
    import optuna


    trials = st.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "metrics" in t.user_attrs]
    front = _outputs.pareto_front(complete, _outputs.front_metrics(cfg.objectives))
    best = _choose_best(complete, front, cfg.objectives)
    files: dict[str, str] = {"study": url if url.startswith("sqlite") else redact(url)}
    files.update(_outputs.write_trials(trials, out))

    def recipe_for(t: Any, path: Path) -> str:
        stages = _stages_of(t, space, cfg)
        m = t.user_attrs["metrics"]
        desc = (f"found by torchslim search (study {name!r}, trial {t.number}): budget {_outputs.budget_words(cfg.budget)}; "
                + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        write_recipe(path, recipe_dict(stages, name=f"search-trial-{t.number}", description=desc, seed=cfg.seed,
                                       budget=cfg.budget))
        return str(path)

    recipes = {t.number: recipe_for(t, out / "recipes" / f"trial_{t.number:04d}.yaml") for t in front}
    pareto = [{"trial": t.number, "values": _values(t, cfg.objectives), "metrics": dict(t.user_attrs["metrics"]),
               "recipe": recipes[t.number]} for t in front]
    with atomic_path(out / "pareto.json") as tmp:
        tmp.write_text(json.dumps(pareto, indent=1))
    files["pareto_json"] = str(out / "pareto.json")
    plot = _outputs.plot_pareto(complete, front, out / "pareto.png")
    if plot:
        files["pareto_png"] = plot
    best_d: dict[str, Any] | None = None
    result_model = None
    report: dict[str, Any] = {}
    if best is not None:
        best_path = recipe_for(best, out / "best_recipe.yaml")
        files["best_recipe"] = best_path
        best_d = {"trial": best.number, "values": _values(best, cfg.objectives),
                  "metrics": dict(best.user_attrs["metrics"]), "recipe": best_path}
        con.print(_outputs.pareto_table(front, best, {k: os.path.relpath(v, out) for k, v in recipes.items()},
                                        cfg.objectives))
        if best_model:
            result_model, extra = _build_best(model, data, inputs, best_path, out / "best_model", space, cfg, best)
            best_d["model"] = files["best_model"] = extra["best_model"]["path"]
            report.update(extra)
    else:
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        if failed and not any(t.state == optuna.trial.TrialState.PRUNED for t in trials):
            reason = failed[0].system_attrs.get("fail_reason", "unknown error")
            raise ModelRunError(f"every trial of study {name!r} failed (see {files['trials_json']}); "
                                f"the first: {reason}")
        con.print("[yellow]no trial completed: nothing met the budget[/yellow]")
    counts = trial_counts(st)
    report = {
        "verb": "search",
        "study": name,
        "storage": redact(url),
        "objectives": list(cfg.objectives),
        "budget": dict(cfg.budget),
        "space": {"groups": [c.key for c in space.groups], "layer_bits": [c.layer for c in space.layer_bits],
                  "layer_ranks": [c.layer for c in space.layer_ranks], "left_whole": space.left_whole},
        "trials": counts,
        "pareto": pareto,
        "best": best_d,
        "baseline": {"val_accuracy": validation_accuracy(model, data), **{k: v for k, v in base.items()}},
        **report,
        "files": files,
        "config": cfg.to_dict(),
    }
    with atomic_path(out / "search.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=str))
    files["report"] = str(out / "search.json")
    return SearchResult(study=st, out=out, best=best_d, pareto=pareto, trials=counts, model=result_model, report=report)


def _stages_of(t: Any, space: SearchSpace, cfg: SearchConfig) -> list[dict[str, Any]]:
    """The stages of trial ``t`` with the final fine-tune (what its recipe holds)."""
    return make_stages(t.user_attrs["ratios"], t.user_attrs.get("layer_bits") or {}, space, importance=cfg.importance,
                       ignore=cfg.skip, finetune=cfg.final_finetune(), quant_layers=cfg.quant_layers,
                       factorized=t.user_attrs.get("factorized") or {})


def _build_best(model: nn.Module, data: Any, inputs: Any, recipe_path: str, dest: Path, space: SearchSpace,
                cfg: SearchConfig, best: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Apply the best recipe to a copy of the model (``ts.compress`` when the recipe runner is there)."""
    from torchslim._modelinfo import example_inputs, set_example_inputs
    from torchslim.profile import profile
    from torchslim.saving import save
    from torchslim.train import evaluate

    started = time.perf_counter()
    try:
        from torchslim.recipe import compress  # type: ignore[attr-defined]
    except ImportError:
        compress = None
    if compress is not None:  # the recipe runner: the model goes to DEST/model beside its report
        work = copy.deepcopy(model)
        try:
            example_inputs(work)
        except TorchslimError:  # factorize_ sizes its layers with the inputs the model remembers
            set_example_inputs(work, inputs)
        res = compress(work, recipe_path, data=data, out=dest, progress=False, force=True,
                       latency="latency" in cfg.objectives or "latency" in cfg.budget)
        built, how, saved = res.model, "ts.compress", dest / "model"
    else:
        built = copy.deepcopy(model)
        stages = _stages_of(best, space, cfg)
        apply_stages_(built, stages, data, example_inputs=inputs)
        built.to("cpu").eval()
        with atomic_path(dest) as tmp:
            save(built, tmp)
        how, saved = "direct", dest
    built.to("cpu").eval()
    test = data.loader("test", batch_size=256)
    extra = {
        "before": profile(model, inputs, latency=False).to_dict(),
        "after": profile(built, inputs, latency=False).to_dict(),
        "accuracy_before": evaluate(model, test)["accuracy"],
        "accuracy_after": evaluate(built, test)["accuracy"],
        "best_model": {"path": str(saved), "built_by": how, "seconds": round(time.perf_counter() - started, 2)},
    }
    return built, extra
