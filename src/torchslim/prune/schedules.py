"""Pruning schedules: callbacks that raise the sparsity while :func:`torchslim.fit` trains.

Every schedule is a :class:`~torchslim.prune.masks.MaskCallback` (masked weights stay zero
through the optimizer's steps) that calls :func:`~torchslim.prune.sparsify_` at its pruning
steps. Step-based schedules follow TF-MOT's names and arguments:

- :class:`ConstantSparsity` — prune to ``target_sparsity`` at ``begin_step`` and every
  ``frequency`` steps until ``end_step``;
- :class:`PolynomialDecay` — ``s(t) = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^power``;
- :class:`AGP` — automated gradual pruning (Zhu & Gupta 2017): the cubic (``power=3``) case;
- :class:`OneShotPruning` — prune once (at a step), then fine-tune;
- :class:`IterativePruning` — epoch-based rounds: every ``epochs_per_round`` epochs, prune
  ``rate`` of the weights still left, fine-tuning in between.

``overrides`` maps module-name globs to the layer's own final sparsity (for iterative pruning:
its own rate per round), so the output layer can be pruned at half the rate as in the lottery
ticket paper. With ``method="movement"`` the schedule accumulates movement scores after every
backward pass (Sanh et al. 2020 use it with the cubic schedule).

Example:
    >>> import torch, torchslim as ts
    >>> data = ts.load_data("synthetic:1x8:n=40")
    >>> model = ts.create_model("zoo:lenet300", data=data)
    >>> agp = AGP(final_sparsity=0.8, begin_step=0, end_step=4, frequency=2)
    >>> _ = ts.fit(model, data, ts.TrainConfig(epochs=2, batch_size=8), callbacks=[agp], progress=False)
    >>> [round(h["sparsity"], 3) for h in agp.history_]
    [0.0, 0.7, 0.8]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torchslim._select import as_patterns, check_patterns, first_match, matches
from torchslim._utils import is_int, is_number
from torchslim.errors import ConfigError
from torchslim.prune.masks import MaskCallback, _original, _split, prunable_weights, sparsify_
from torchslim.prune.unstructured import Movement, parse_pattern, valid_sparsity
from torchslim.train.callbacks import TrainState

__all__ = ["PruningSchedule", "ConstantSparsity", "PolynomialDecay", "AGP", "OneShotPruning", "IterativePruning"]


def _step(value: Any, what: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 0:
        raise ConfigError(f"{what} must be an integer >= 0{' or None' if allow_none else ''}; got {value!r}")
    return int(value)


class PruningSchedule(MaskCallback):
    """Base of the schedules: which sparsity at which step, and how to prune.

    Args:
        method, scope, pattern, block, modules, skip, calibration, seed: as :func:`sparsify_`
            (``modules`` / ``skip``: names, globs or ``re:`` patterns).
        overrides: module name, glob or ``re:`` pattern -> that layer's final sparsity (or rate,
            for iterative).

    A pattern of ``modules``, ``skip`` or ``overrides`` that selects no module of the model is
    refused when training begins, before the first step.

    Attributes:
        history_: one ``{"step", "epoch", "sparsity", "overall"}`` per pruning step.
    """

    def __init__(
        self,
        *,
        method: str = "magnitude",
        scope: str = "layer",
        pattern: str = "unstructured",
        block: Sequence[int] | None = None,
        modules: Sequence[str] | str | None = None,
        skip: Sequence[str] | str | None = None,
        overrides: Mapping[str, float] | None = None,
        calibration: Any = None,
        seed: int = 0,
    ) -> None:
        parse_pattern(pattern, block)
        if scope not in ("layer", "global"):
            raise ConfigError(f"scope must be 'layer' or 'global'; got {scope!r}")
        self.overrides = dict(overrides or {})
        as_patterns(list(self.overrides), "overrides")
        for key, value in self.overrides.items():
            valid_sparsity(value, f"overrides[{key!r}]")
        self.method, self.scope, self.pattern, self.block = method, scope, pattern, block
        self.modules, self.skip = as_patterns(modules, "modules"), as_patterns(skip, "skip") or ()
        self.calibration, self.seed = calibration, seed
        self.criterion_: Any = Movement() if method == "movement" else method
        self.history_: list[dict[str, Any]] = []

    # subclasses: the model-wide sparsity and per-override sparsity at a step, or None
    def targets_at(self, step: int) -> tuple[float, dict[str, float]] | None:
        raise NotImplementedError

    def prune(self, state: TrainState, sparsity: float, overrides: Mapping[str, float]) -> None:
        """Prune ``state.model`` to ``sparsity`` (and ``overrides``) now."""
        plan = sparsify_(
            state.model, sparsity, method=self.criterion_, scope=self.scope, pattern=self.pattern,
            block=self.block, modules=self.modules, skip=self.skip, overrides=overrides,
            calibration=self.calibration, seed=self.seed,
        )
        self.history_.append({"step": state.step, "epoch": state.epoch, "sparsity": sparsity, "overall": plan.overall})

    def on_train_begin(self, state: TrainState) -> None:
        names = [n for n, _ in state.model.named_modules()]
        check_patterns(self.modules, names, "modules")
        check_patterns(self.skip, names, "skip")
        check_patterns(list(self.overrides), names, "overrides")
        super().on_train_begin(state)

    def on_after_backward(self, state: TrainState) -> None:
        if isinstance(self.criterion_, Movement):
            weights, grads = {}, {}
            for name, module in prunable_weights(state.model, self.modules).items():
                if any(matches(_split(name)[0], p) for p in self.skip):
                    continue
                original = _original(module, _split(name)[1])
                weights[name], grads[name] = original, original.grad
            self.criterion_.accumulate(weights, grads)
        super().on_after_backward(state)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history_)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history_ = list(state.get("history", []))


class _StepSchedule(PruningSchedule):
    def __init__(self, begin_step: int, end_step: int | None, frequency: int, **kwargs: Any) -> None:
        self.begin_step = _step(begin_step, "begin_step")
        self.end_step = _step(end_step, "end_step", allow_none=True)
        if not is_int(frequency) or frequency < 1:
            raise ConfigError(f"frequency must be a positive integer (steps between pruning); got {frequency!r}")
        self.frequency = frequency
        if self.end_step is not None and self.end_step <= self.begin_step:
            raise ConfigError(
                f"the schedule ends before it starts: end_step={end_step} <= begin_step={begin_step}; "
                "end_step must be greater than begin_step"
            )
        super().__init__(**kwargs)

    def _active(self, step: int) -> bool:
        if step < self.begin_step or (self.end_step is not None and step > self.end_step):
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step

    def on_step_begin(self, state: TrainState) -> None:
        if self._active(state.step):
            targets = self.targets_at(state.step)
            if targets is not None:
                self.prune(state, *targets)


class ConstantSparsity(_StepSchedule):
    """Prune to ``target_sparsity`` at ``begin_step`` and every ``frequency`` steps to ``end_step``.

    ``end_step=None`` keeps going until training ends (TF-MOT's ``-1``).
    """

    def __init__(self, target_sparsity: float, begin_step: int = 0, end_step: int | None = None, frequency: int = 100, **kwargs: Any) -> None:
        self.target_sparsity = valid_sparsity(target_sparsity, "target_sparsity")
        super().__init__(begin_step, end_step, frequency, **kwargs)

    def targets_at(self, step: int) -> tuple[float, dict[str, float]]:
        return self.target_sparsity, dict(self.overrides)


class PolynomialDecay(_StepSchedule):
    """TF-MOT's polynomial decay from ``initial_sparsity`` to ``final_sparsity`` over ``[begin_step, end_step]``."""

    def __init__(
        self,
        initial_sparsity: float = 0.0,
        final_sparsity: float = 0.5,
        begin_step: int = 0,
        end_step: int = 1000,
        power: float = 3.0,
        frequency: int = 100,
        **kwargs: Any,
    ) -> None:
        self.initial_sparsity = valid_sparsity(initial_sparsity, "initial_sparsity")
        self.final_sparsity = valid_sparsity(final_sparsity, "final_sparsity")
        if not is_number(power) or power <= 0:
            raise ConfigError(f"power must be a positive number; got {power!r}")
        if end_step is None:
            raise ConfigError("a polynomial schedule needs an end_step (the step where it reaches final_sparsity)")
        self.power = float(power)
        super().__init__(begin_step, end_step, frequency, **kwargs)

    def sparsity_at(self, step: int, final: float | None = None) -> float:
        """The schedule's sparsity at ``step`` (towards ``final``, the model-wide one by default)."""
        final = self.final_sparsity if final is None else final
        assert self.end_step is not None
        t = min(max(step - self.begin_step, 0), self.end_step - self.begin_step) / (self.end_step - self.begin_step)
        return final + (self.initial_sparsity - final) * (1.0 - t) ** self.power

    def targets_at(self, step: int) -> tuple[float, dict[str, float]]:
        return self.sparsity_at(step), {k: self.sparsity_at(step, v) for k, v in self.overrides.items()}


class AGP(PolynomialDecay):
    """Automated gradual pruning (Zhu & Gupta 2017): polynomial decay with ``power=3``."""

    def __init__(self, initial_sparsity: float = 0.0, final_sparsity: float = 0.5, begin_step: int = 0,
                 end_step: int = 1000, frequency: int = 100, **kwargs: Any) -> None:
        super().__init__(initial_sparsity, final_sparsity, begin_step, end_step, 3.0, frequency, **kwargs)


class OneShotPruning(PruningSchedule):
    """Prune once to ``sparsity`` at step ``at_step`` (0: before the first step), then fine-tune."""

    def __init__(self, sparsity: float, at_step: int = 0, **kwargs: Any) -> None:
        self.sparsity = valid_sparsity(sparsity)
        self.at_step = _step(at_step, "at_step")
        super().__init__(**kwargs)

    def targets_at(self, step: int) -> tuple[float, dict[str, float]] | None:
        return (self.sparsity, dict(self.overrides)) if step == self.at_step else None

    def on_step_begin(self, state: TrainState) -> None:
        targets = self.targets_at(state.step)
        if targets is not None:
            self.prune(state, *targets)


class IterativePruning(PruningSchedule):
    """Every ``epochs_per_round`` epochs prune ``rate`` of the remaining weights, ``rounds`` times.

    After round ``k`` a layer keeps ``(1 - rate) ** k`` of its weights (its own rate from
    ``overrides`` if one matches). Fine-tuning continues between rounds; the first round comes
    after ``epochs_per_round`` epochs of training (``prune_first=True``: at the very start).
    """

    def __init__(self, rate: float = 0.2, rounds: int = 5, epochs_per_round: int = 1, *, prune_first: bool = False, **kwargs: Any) -> None:
        self.rate = valid_sparsity(rate, "rate")
        if not is_int(rounds) or rounds < 1:
            raise ConfigError(f"rounds must be a positive integer; got {rounds!r}")
        if not is_int(epochs_per_round) or epochs_per_round < 1:
            raise ConfigError(f"epochs_per_round must be a positive integer; got {epochs_per_round!r}")
        self.rounds, self.epochs_per_round, self.prune_first = rounds, epochs_per_round, prune_first
        super().__init__(**kwargs)

    def round_at(self, epoch: int) -> int | None:
        """The round that starts at ``epoch`` (1-based), or None."""
        shifted = epoch + (self.epochs_per_round if self.prune_first else 0)
        if shifted == 0 or shifted % self.epochs_per_round:
            return None
        k = shifted // self.epochs_per_round
        return k if k <= self.rounds else None

    def targets_at(self, step: int) -> tuple[float, dict[str, float]] | None:  # unused: epoch based
        return None

    def on_epoch_begin(self, state: TrainState) -> None:
        k = self.round_at(state.epoch)
        if k is None:
            return
        overrides = {g: 1.0 - (1.0 - r) ** k for g, r in self.overrides.items()}
        self.prune(state, 1.0 - (1.0 - self.rate) ** k, overrides)


def layer_rates(names: Sequence[str], rate: float, overrides: Mapping[str, float]) -> dict[str, float]:
    """Per-weight rate: the first override whose pattern selects the module, else ``rate``.

    Patterns are those of :func:`torchslim._select.matches` (names, globs, ``re:``; a container
    selects what is inside it).
    """
    out = {}
    for name in names:
        key = first_match(_split(name)[0], overrides)
        out[name] = rate if key is None else overrides[key]
    return out
