"""Lottery tickets: iterative magnitude pruning with reset to initialisation or rewinding.

Frankle & Carbin (ICLR 2019): train, prune ``rate`` of the remaining weights of each layer by
magnitude, reset the surviving weights to their initial values, and train again; repeat. A
*winning ticket* trains to the dense network's accuracy (or better) at a fraction of its size,
and learns faster. Rewinding (Frankle et al. 2019/2020, "Stabilizing the LTH" and "Linear mode
connectivity") resets to the weights of iteration ``k`` instead of 0. Controls: the same mask
with a fresh random initialisation (``reinit``), and a random mask of the same per-layer
sparsity on the original initialisation (``random_mask``).

As in the paper, each training run is evaluated every ``eval_every`` iterations; the
*early-stopping iteration* is the one of minimum validation loss, and the accuracy reported is
the test accuracy at that iteration.

Example:
    >>> import torchslim as ts
    >>> data = ts.load_data("synthetic:1x8:n=60")
    >>> cfg = LotteryConfig(rounds=1, rate=0.5, output_rate=0.5, epochs=1, eval_every=2, batch_size=16)
    >>> result = run_lottery("zoo:lenet300", data, cfg)
    >>> [round(r["remaining"], 3) for r in result.rounds]
    [0.5]
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._config import ConfigDict
from torchslim._select import as_patterns, check_patterns, first_match
from torchslim._utils import atomic_path, is_int
from torchslim.errors import ConfigError
from torchslim.prune.masks import MaskCallback, _split, get_mask, prunable_weights, set_masks_, sparsify_
from torchslim.prune.schedules import layer_rates
from torchslim.prune.unstructured import RandomScores, select_masks, valid_sparsity
from torchslim.train.callbacks import Callback, TrainState

__all__ = ["LotteryConfig", "LotteryResult", "run_lottery", "find_ticket", "plot_lottery"]

CONTROLS = ("reinit", "random_mask")


@dataclass(frozen=True)
class LotteryConfig(ConfigDict):
    """Settings of a lottery-ticket experiment (defaults: the paper's LeNet-300-100 recipe).

    Attributes:
        rounds: pruning rounds after the dense run.
        rate: fraction of each layer's remaining weights pruned per round.
        output_rate: rate of the output layer (the last prunable layer); ``None``: ``rate / 2``.
        overrides: module name, glob or ``re:`` pattern -> rate, for layers with their own rate
            (a pattern that selects no module of the model is refused before training).
        rewind_iter: reset to the weights after this many iterations (0: to initialisation).
        seeds: number of seeds (``seed``, ``seed + 1``, ...); results are means with per-seed values.
        seed: first seed.
        controls: any of ``"reinit"`` and ``"random_mask"``.
        epochs, lr, optimizer, batch_size: each training run (Adam 1.2e-3, batch 60 in the paper).
        eval_every: iterations between validation/test evaluations (the paper: 100).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...

    Example:
        >>> cfg = LotteryConfig(rounds=3)
        >>> LotteryConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    rounds: int = 5
    rate: float = 0.2
    output_rate: float | None = None
    overrides: dict[str, float] = field(default_factory=dict)
    rewind_iter: int = 0
    seeds: int = 1
    seed: int = 0
    controls: tuple[str, ...] = ("reinit",)
    epochs: int = 10
    lr: float = 1.2e-3
    optimizer: str = "adam"
    batch_size: int = 60
    eval_every: int = 25
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("rounds", "seeds"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ConfigError(f"LotteryConfig.{name} must be a positive integer; got {v!r}")
        for name in ("rewind_iter", "seed", "epochs"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise ConfigError(f"LotteryConfig.{name} must be an integer >= 0; got {v!r}")
        if not is_int(self.eval_every) or self.eval_every < 1:
            raise ConfigError(f"LotteryConfig.eval_every must be a positive integer; got {self.eval_every!r}")
        rate = valid_sparsity(self.rate, "LotteryConfig.rate")
        if rate >= 1.0:
            raise ConfigError(f"LotteryConfig.rate must be below 1 (the fraction pruned per round); got {rate}")
        object.__setattr__(self, "rate", rate)
        if self.output_rate is not None:
            object.__setattr__(self, "output_rate", valid_sparsity(self.output_rate, "LotteryConfig.output_rate"))
        as_patterns(list(dict(self.overrides)), "LotteryConfig.overrides")
        for k, v in dict(self.overrides).items():
            valid_sparsity(v, f"LotteryConfig.overrides[{k!r}]")
        object.__setattr__(self, "overrides", dict(self.overrides))
        controls = tuple(self.controls)
        bad = [c for c in controls if c not in CONTROLS]
        if bad:
            raise ConfigError(f"LotteryConfig.controls: unknown {bad}; allowed: {', '.join(CONTROLS)}")
        object.__setattr__(self, "controls", controls)
        self.train_config()  # validates lr, optimizer, batch size, device

    def train_config(self, seed: int = 0) -> Any:
        from torchslim.train import TrainConfig

        return TrainConfig(epochs=self.epochs, lr=self.lr, optimizer=self.optimizer, batch_size=self.batch_size,
                           lr_schedule="constant", seed=seed, device=self.device)


@dataclass
class LotteryResult:
    """What :func:`run_lottery` measured (see :meth:`to_dict` for the ``lottery.json`` shape)."""

    config: LotteryConfig
    dense_accuracy: float
    dense_accuracy_per_seed: list[float]
    dense_early_stop_iter: float
    dense_early_stop_iter_per_seed: list[int]
    rounds: list[dict[str, Any]]
    curves: list[dict[str, Any]] = field(default_factory=list)
    time_s: float = 0.0
    ticket: nn.Module | None = field(default=None, repr=False)  # first seed's last-round ticket (masked)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "dense_accuracy": self.dense_accuracy,
            "dense_accuracy_per_seed": self.dense_accuracy_per_seed,
            "dense_early_stop_iter": self.dense_early_stop_iter,
            "dense_early_stop_iter_per_seed": self.dense_early_stop_iter_per_seed,
            "rounds": self.rounds,
            "time_s": self.time_s,
        }

    def write(self, directory: str | os.PathLike[str], plot: bool = True) -> dict[str, str]:
        """Write ``lottery.json`` (and ``lottery.png``) into ``directory``; return name -> path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = {"lottery": str(d / "lottery.json")}
        with atomic_path(d / "lottery.json") as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        if plot:
            files["plot"] = str(plot_lottery(self.to_dict(), d / "lottery.png"))
        return files


# --------------------------------------------------------------------------- one training run


class _Tracker(Callback):
    """Every ``every`` iterations: validation loss and test accuracy (for early stopping)."""

    def __init__(self, data: Any, every: int, batch_size: int = 500) -> None:
        self.val = data.loader("val", batch_size, shuffle=False)
        self.test = data.loader("test", batch_size, shuffle=False)
        self.every = every
        self.points: list[tuple[int, float, float]] = []

    def _record(self, state: TrainState) -> None:
        from torchslim.train import evaluate

        v = evaluate(state.model, self.val, state.device)
        t = evaluate(state.model, self.test, state.device)
        self.points.append((state.step, v["loss"], t["accuracy"]))

    def on_step_end(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            self._record(state)

    def on_train_end(self, state: TrainState) -> None:
        if not self.points or self.points[-1][0] != state.step:
            self._record(state)

    def early_stop(self) -> tuple[int, float]:
        step, _, acc = min(self.points, key=lambda p: p[1])
        return step, acc


class _Capture(Callback):
    """Keep a copy of the prunable weights after iteration ``at`` (for rewinding)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.weights_: dict[str, torch.Tensor] | None = None

    def on_step_end(self, state: TrainState) -> None:
        if state.step == self.at and self.weights_ is None:
            self.weights_ = _snapshot(state.model)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` (a snapshot of a dense or masked model) into ``model`` keeping its masks."""
    own = model.state_dict()
    with torch.no_grad():
        for name, t in weights.items():
            if name.endswith(".mask"):
                continue
            mname, pname = _split(name)
            key = name if name in own else f"{mname}.parametrizations.{pname}.original"
            if key in own:
                own[key].copy_(t)
    from torchslim.prune.masks import reapply_masks_

    reapply_masks_(model)


def _train(model: nn.Module, data: Any, cfg: LotteryConfig, seed: int, capture: _Capture | None = None) -> dict[str, Any]:
    from torchslim.train import fit

    tracker = _Tracker(data, cfg.eval_every)
    callbacks: list[Callback] = [MaskCallback(), tracker] + ([capture] if capture else [])
    result = fit(model, data, cfg.train_config(seed), callbacks=callbacks, progress=False)
    step, acc = tracker.early_stop()
    return {"early_stop_iter": step, "accuracy": acc, "final_accuracy": result.test_accuracy,
            "curve": [list(p) for p in tracker.points]}


# --------------------------------------------------------------------------- the experiment


def _factory(model: str | nn.Module | Callable[[], nn.Module], data: Any) -> Callable[[int], nn.Module]:
    """seed -> a freshly initialised model."""
    if isinstance(model, str):
        from torchslim.zoo.spec import create_model

        def build(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            return create_model(model, data=data)

        return build
    if isinstance(model, nn.Module):
        template = copy.deepcopy(model)

        def reset(seed: int) -> nn.Module:
            m = copy.deepcopy(template)
            torch.manual_seed(seed)
            for module in m.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            return m

        return reset
    if callable(model):
        def call(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            return model()

        return call
    raise ConfigError(f"model must be a model spec, an nn.Module or a factory; got {type(model).__name__}")


def _rates(model: nn.Module, cfg: LotteryConfig) -> dict[str, float]:
    check_patterns(cfg.overrides, (n for n, _ in model.named_modules()), "LotteryConfig.overrides")
    names = list(prunable_weights(model))
    rates = layer_rates(names, cfg.rate, cfg.overrides)
    last = names[-1]
    if first_match(_split(last)[0], cfg.overrides) is None:
        rates[last] = cfg.output_rate if cfg.output_rate is not None else cfg.rate / 2
    return rates


def find_ticket(model: nn.Module, data: Any, cfg: LotteryConfig, seed: int, *, log: Callable[[str], None] | None = None,
                factory: Callable[[int], nn.Module] | None = None) -> dict[str, Any]:
    """Run IMP for one seed on ``model`` (changed in place: it ends as the last round's ticket).

    Returns per-round records: ``remaining``, ``ticket`` / ``reinit`` / ``random_mask`` runs
    (``accuracy`` at early stopping, ``early_stop_iter``, ``final_accuracy``, ``curve``).
    """
    rates = _rates(model, cfg)
    names = list(rates)
    init = _snapshot(model)
    capture = _Capture(cfg.rewind_iter) if cfg.rewind_iter > 0 else None
    dense = _train(model, data, cfg, seed, capture)
    if capture is not None and capture.weights_ is None:
        raise ConfigError(f"rewind_iter={cfg.rewind_iter} is beyond the {dense['curve'][-1][0]} iterations of a training run")
    reset_to = capture.weights_ if capture is not None else init
    sizes = {n: getattr(prunable_weights(model)[n], _split(n)[1]).numel() for n in names}
    total = sum(sizes.values())
    out = {"seed": seed, "dense": dense, "rounds": []}
    if log:
        log(f"seed {seed} dense: acc {dense['accuracy']:.4f} at iter {dense['early_stop_iter']}")
    for r in range(1, cfg.rounds + 1):
        sparsity = {n: 1.0 - (1.0 - rates[n]) ** r for n in names}
        sparsify_(model, 0.0, overrides={_split(n)[0]: sparsity[n] for n in names}, modules=[_split(n)[0] for n in names])
        layers = prunable_weights(model)
        masks = {n: get_mask(layers[n], _split(n)[1]).clone() for n in names}
        remaining = sum(int(m.sum()) for m in masks.values()) / total
        _load_weights(model, reset_to)
        record: dict[str, Any] = {"round": r, "remaining": remaining}
        record["ticket"] = _train(model, data, cfg, seed)
        if "reinit" in cfg.controls and factory is not None:
            other = factory(seed + 10_000 * r)
            set_masks_(other, masks)
            record["reinit"] = _train(other, data, cfg, seed)
        if "random_mask" in cfg.controls:
            other = copy.deepcopy(model)
            scores = RandomScores(seed + 20_000 * r).scores({n: masks[n] for n in names})
            rand = select_masks(scores, {n: 1.0 - float(masks[n].float().mean()) for n in names})
            _load_weights(other, reset_to)
            set_masks_(other, rand)
            record["random_mask"] = _train(other, data, cfg, seed)
        out["rounds"].append(record)
        if log:
            extra = f", reinit {record['reinit']['accuracy']:.4f}" if "reinit" in record else ""
            log(f"seed {seed} round {r}: {100 * remaining:.1f}% left, ticket {record['ticket']['accuracy']:.4f} "
                f"at iter {record['ticket']['early_stop_iter']}{extra}")
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def run_lottery(model: str | nn.Module | Callable[[], nn.Module], data: Any, config: LotteryConfig | None = None, *,
                log: Callable[[str], None] | None = None) -> LotteryResult:
    """Find lottery tickets for ``config.seeds`` seeds and summarise them as the paper does.

    Args:
        model: a model spec (``"zoo:lenet300"``), an ``nn.Module`` (seed ``i`` re-initialises a copy
            with ``reset_parameters`` under ``torch.manual_seed``) or a factory ``() -> nn.Module``.
        data: a :class:`~torchslim.data.DataBundle` (or spec) with train/val/test splits.
        config: a :class:`LotteryConfig`.

    Returns:
        A :class:`LotteryResult`; ``.write(dir)`` writes ``lottery.json`` and ``lottery.png``.

    Raises:
        ConfigError: invalid config, unlabeled data, or a model without Linear/Conv layers.
    """
    from torchslim.data import DataBundle, load_data

    config = config or LotteryConfig()
    if isinstance(data, str):
        data = load_data(data, seed=config.seed)
    if not isinstance(data, DataBundle) or not data.labeled:
        raise ConfigError("run_lottery needs labeled data (a DataBundle or data spec with train/val/test labels)")
    build = _factory(model, data)
    started = time.perf_counter()
    runs, ticket = [], None
    for i in range(config.seeds):
        seed = config.seed + i
        candidate = build(seed)
        runs.append(find_ticket(candidate, data, config, seed, log=log, factory=build))
        ticket = candidate if ticket is None else ticket
    rounds = []
    for r in range(config.rounds):
        recs = [run["rounds"][r] for run in runs]
        row: dict[str, Any] = {"round": r + 1, "remaining": _mean([x["remaining"] for x in recs])}
        for kind in ("ticket",) + tuple(config.controls):
            if kind not in recs[0]:
                continue
            accs = [x[kind]["accuracy"] for x in recs]
            iters = [x[kind]["early_stop_iter"] for x in recs]
            finals = [x[kind]["final_accuracy"] for x in recs]
            row[f"{kind}_accuracy"], row[f"{kind}_accuracy_per_seed"] = _mean(accs), accs
            row[f"{kind}_early_stop_iter"], row[f"{kind}_early_stop_iter_per_seed"] = _mean(iters), iters
            row[f"{kind}_final_accuracy"], row[f"{kind}_final_accuracy_per_seed"] = _mean(finals), finals
        rounds.append(row)
    dense_acc = [run["dense"]["accuracy"] for run in runs]
    dense_iter = [run["dense"]["early_stop_iter"] for run in runs]
    curves = [{"seed": run["seed"], "dense": run["dense"]["curve"],
               "rounds": [{k: v["curve"] for k, v in rec.items() if isinstance(v, dict)} for rec in run["rounds"]]}
              for run in runs]
    return LotteryResult(config, _mean(dense_acc), dense_acc, _mean(dense_iter), dense_iter, rounds, curves,
                         round(time.perf_counter() - started, 2), ticket)


def plot_lottery(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Accuracy and early-stopping iteration vs % of weights remaining (log x), tickets vs controls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["rounds"]
    x = [100.0] + [100 * r["remaining"] for r in rounds]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"ticket": ("winning ticket (reset)", "C0"), "reinit": ("random re-init", "C3"), "random_mask": ("random mask", "C2")}
    for kind, (label, color) in styles.items():
        if f"{kind}_accuracy" not in rounds[0]:
            continue
        for ax, key, dense in ((axes[0], "accuracy", "dense_accuracy"), (axes[1], "early_stop_iter", "dense_early_stop_iter")):
            mean = [result[dense]] + [r[f"{kind}_{key}"] for r in rounds]
            lo = [min(result[dense + "_per_seed"])] + [min(r[f"{kind}_{key}_per_seed"]) for r in rounds]
            hi = [max(result[dense + "_per_seed"])] + [max(r[f"{kind}_{key}_per_seed"]) for r in rounds]
            scale = 100.0 if key == "accuracy" else 1.0
            ax.plot(x, [scale * m for m in mean], "o-", color=color, label=label, markersize=3)
            ax.fill_between(x, [scale * v for v in lo], [scale * v for v in hi], color=color, alpha=0.15)
    axes[0].axhline(100 * result["dense_accuracy"], color="gray", ls="--", lw=1, label="dense")
    for ax, title in ((axes[0], "test accuracy at early stopping (%)"), (axes[1], "early-stopping iteration")):
        ax.set_xscale("log")
        ticks = x[:: max(1, len(x) // 8)]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{v:.3g}" for v in ticks])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_xlabel("% of weights remaining")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out
