"""``distill``: train a student against a frozen teacher on the shared train loop.

Example:
    >>> import copy, torch
    >>> import torchslim as ts
    >>> from torchslim.distill import DistillConfig, distill
    >>> data = ts.load_data("synthetic:1x8:n=40")
    >>> _ = torch.manual_seed(0)
    >>> k = data.num_classes
    >>> teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, k))
    >>> student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, k))
    >>> cfg = DistillConfig(loss="kd", train=ts.TrainConfig(epochs=1, lr=0.05, device="cpu"))
    >>> result = distill(student, teacher, data, cfg, progress=False)
    >>> result.train.epochs_run, teacher.training, teacher[1].weight.requires_grad
    (1, True, True)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim._config import ConfigDict
from torchslim._registry import get_method, list_methods
from torchslim._utils import evaluating, model_device
from torchslim._utils import is_number as _is_number
from torchslim.data import DataBundle, load_data
from torchslim.distill import losses as _losses  # noqa: F401  (registers the losses)
from torchslim.distill._runner import Distiller, TeacherRunner, distill_step, frozen, logits_of
from torchslim.distill.mapping import MAPPINGS, auto_taps, map_layers
from torchslim.distill.taps import FeatureTaps, resolve_taps
from torchslim.errors import ConfigError
from torchslim.train import Callback, TrainConfig, TrainResult, evaluate, fit, seed_everything

__all__ = ["DistillConfig", "DistillResult", "distill"]

_CACHE_LIMIT_BYTES = 2 * 2**30


def _names(value: Any, field_name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"DistillConfig.{field_name} must be None or a list of module names; got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class DistillConfig(ConfigDict):
    """How :func:`distill` trains the student: a frozen value that round-trips to JSON.

    Attributes:
        loss: A registered distillation loss: ``"kd"``, ``"hint"``, ``"at"`` or ``"tinybert"``
            (``ts.list_methods("distill.loss")``).
        temperature: Softmax temperature of the KD term (> 0).
        alpha: Weight of the soft KD term in [0, 1]; ``1 - alpha`` weighs the hard labels.
        feature_weight: Weight of the feature term (hint MSE, attention-transfer beta, TinyBERT
            layer MSE); ``None`` takes the loss's default (1, 1000 and 1).
        taps: Student modules to tap (``"name"`` or ``"name#k"``); ``None`` finds them
            automatically (stage ends for hint/at, transformer blocks for tinybert).
        teacher_taps: Teacher modules to tap; ``None`` finds them automatically.
        mapping: How student taps meet teacher taps: ``"depth"`` (spread evenly over the teacher's
            depth), ``"name"`` (same module names), or a dict ``{student_name: teacher_name}``.
        attention_taps: TinyBERT only: student modules whose output is an attention map
            (``"layers.0.attn#1"``); paired with ``teacher_attention_taps`` by depth or name.
        teacher_attention_taps: TinyBERT only: the teacher's attention-map taps.
        cache_teacher: Run the teacher once over the train split and train on its cached outputs
            (for small data sets; exact when there is no data augmentation).
        train: The :class:`~torchslim.train.TrainConfig` of the shared train loop.

    Example:
        >>> cfg = DistillConfig(loss="hint", taps=["relu1"], teacher_taps=["relu2"])
        >>> DistillConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    loss: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.9
    feature_weight: float | None = None
    taps: tuple[str, ...] | None = None
    teacher_taps: tuple[str, ...] | None = None
    mapping: str | dict[str, str] = "depth"
    attention_taps: tuple[str, ...] | None = None
    teacher_attention_taps: tuple[str, ...] | None = None
    cache_teacher: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        known = [name.split(".", 2)[-1] for name in list_methods("distill.loss")]
        if self.loss not in known:
            raise ConfigError(f"DistillConfig.loss must be one of {', '.join(map(repr, known))}; got {self.loss!r}")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"DistillConfig.temperature must be a positive number; got {self.temperature!r}")
        if not _is_number(self.alpha) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"DistillConfig.alpha must be a number in [0, 1]; got {self.alpha!r}")
        if self.feature_weight is not None and (not _is_number(self.feature_weight) or self.feature_weight < 0):
            raise ConfigError(f"DistillConfig.feature_weight must be None or a number >= 0; got {self.feature_weight!r}")
        for name in ("taps", "teacher_taps", "attention_taps", "teacher_attention_taps"):
            object.__setattr__(self, name, _names(getattr(self, name), name))
        if isinstance(self.mapping, Mapping):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.mapping.items()) or not self.mapping:
                raise ConfigError(f"DistillConfig.mapping as a dict must map student to teacher module names; got {self.mapping!r}")
            if self.taps is not None or self.teacher_taps is not None:
                raise ConfigError("DistillConfig.mapping is a dict, which names the taps already: leave taps and teacher_taps None")
            object.__setattr__(self, "mapping", dict(self.mapping))
        elif self.mapping not in MAPPINGS:
            raise ConfigError(
                f"DistillConfig.mapping must be one of {', '.join(map(repr, MAPPINGS))} or a dict; got {self.mapping!r}"
            )
        if (self.attention_taps is not None or self.teacher_attention_taps is not None) and self.loss != "tinybert":
            raise ConfigError(f"DistillConfig.attention_taps are used by loss='tinybert' only; got loss={self.loss!r}")
        if not isinstance(self.cache_teacher, bool):
            raise ConfigError(f"DistillConfig.cache_teacher must be True or False; got {self.cache_teacher!r}")
        if isinstance(self.train, Mapping):
            object.__setattr__(self, "train", TrainConfig.from_dict(self.train))
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"DistillConfig.train must be a TrainConfig; got {type(self.train).__name__}")
        for name in ("temperature", "alpha", "feature_weight"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    Attributes:
        train: The :class:`~torchslim.train.TrainResult` of the student's training.
        teacher_accuracy: The teacher's test accuracy (``None`` for unlabeled data).
        mapping: Student tap -> teacher tap pairs that were matched (hidden features).
        attention_mapping: Student -> teacher attention-map taps (TinyBERT).
        cache_misses: Batches the teacher ran live although ``cache_teacher`` was on.
    """

    train: TrainResult
    teacher_accuracy: float | None
    mapping: dict[str, str]
    attention_mapping: dict[str, str]
    cache_misses: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _probe(model: nn.Module, inputs: torch.Tensor, taps: FeatureTaps) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with taps, evaluating(model), torch.no_grad():
        logits = logits_of(model(inputs.to(model_device(model))))
        return logits, taps.collect()


def _plan_taps(
    config: DistillConfig, student: nn.Module, teacher: nn.Module, probe: torch.Tensor, kind: str | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Student -> teacher pairs for the hidden features and for the attention maps."""
    if kind is None:
        return {}, {}
    if isinstance(config.mapping, dict):
        hidden = dict(config.mapping)
    else:
        s_names = list(config.taps) if config.taps is not None else auto_taps(student, (probe,), kind)
        t_names = list(config.teacher_taps) if config.teacher_taps is not None else auto_taps(teacher, (probe,), kind)
        resolve_taps(student, s_names, "student")
        resolve_taps(teacher, t_names, "teacher")
        hidden = map_layers(s_names, t_names, config.mapping)
    attention: dict[str, str] = {}
    if config.attention_taps or config.teacher_attention_taps:
        if not (config.attention_taps and config.teacher_attention_taps):
            raise ConfigError("TinyBERT attention maps need both attention_taps and teacher_attention_taps")
        rule = "depth" if isinstance(config.mapping, dict) else config.mapping
        attention = map_layers(list(config.attention_taps), list(config.teacher_attention_taps), rule)
    return hidden, attention


def _check_cache_size(teacher_outputs: list[torch.Tensor], n: int) -> None:
    per_row = sum(t[0].numel() * t.element_size() for t in teacher_outputs)
    if per_row * n > _CACHE_LIMIT_BYTES:
        raise ConfigError(
            f"cache_teacher would hold {per_row * n / 2**30:.1f} GiB of teacher outputs for {n} samples "
            f"(limit {_CACHE_LIMIT_BYTES / 2**30:.0f} GiB); use cache_teacher=False or fewer/smaller taps"
        )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: DataBundle | str,
    config: DistillConfig | None = None,
    *,
    callbacks: Iterable[Callback] = (),
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    distributed: bool | str = "auto",
) -> DistillResult:
    """Train ``student`` in place to match a frozen ``teacher`` on ``data``'s train split.

    Runs :func:`torchslim.train.fit` on the student plus the loss's learned adapters (they are
    dropped afterwards; the student keeps its architecture). The teacher runs in eval mode with
    ``requires_grad=False``; its modes, flags and device are restored afterwards, also on error.
    Everything is checked on one probe batch before anything changes: bad input leaves both
    models as they were. Launched by ``torchrun``, it trains data-parallel (see ``fit``).

    Args:
        student: The model to train (moved to ``config.train.device`` and left there).
        teacher: The reference model; its logits must have the student's shape.
        data: A :class:`~torchslim.data.DataBundle` or a data spec string.
        config: A :class:`DistillConfig` (defaults when ``None``: Hinton KD, T=4, alpha=0.9).
        callbacks: :class:`~torchslim.train.Callback` objects (e.g. pruning masks) passed to ``fit``.
        checkpoint_dir: Where ``fit`` writes ``last.pt`` after every epoch (adapters included).
        resume: Continue from ``checkpoint_dir/last.pt``.
        progress: Show progress bars.
        distributed: ``"auto"``, ``"ddp"``/``True`` or ``"off"``/``False``, as in ``fit``.

    Returns:
        A :class:`DistillResult`; ``result.train.test_accuracy`` is the student's.

    Raises:
        ConfigError: Outputs of different shapes, an unknown tap (the message names the module and
            close matches), a bad config, or a teacher that is the student.
    """
    config = DistillConfig() if config is None else config
    if not isinstance(config, DistillConfig):
        raise ConfigError(f"config must be a DistillConfig; got {type(config).__name__}")
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"the {role} must be an nn.Module; got {type(model).__name__}")
    if student is teacher:
        raise ConfigError("the teacher is the student itself; distill from a separate (e.g. deep-copied) model")
    if isinstance(data, str):
        data = load_data(data, seed=config.train.seed)
    if not isinstance(data, DataBundle):
        raise ConfigError(f"data must be a DataBundle or a data spec string; got {type(data).__name__}")
    loss_cls = get_method("distill.loss", config.loss)
    probe = data.example_batch(min(2, len(data.test)))

    # --- validate everything on one probe batch before any change
    kind = loss_cls.feature_kind
    if kind is None and (config.taps is not None or config.teacher_taps is not None or isinstance(config.mapping, dict)):
        raise ConfigError(f"DistillConfig.taps / teacher_taps / mapping pair features, which loss={config.loss!r} does not "
                          "use (it matches logits only); use a feature loss such as 'hint' or 'at', or leave them out")
    hidden, attention = _plan_taps(config, student, teacher, probe, kind)
    s_names = list(hidden) + list(attention)
    t_names = list(hidden.values()) + list(attention.values())
    s_taps = FeatureTaps(student, s_names, role="student")
    t_taps = FeatureTaps(teacher, t_names, role="teacher", detach=True)
    s_logits, s_feats = _probe(student, probe, s_taps)
    t_logits, t_feats = _probe(teacher, probe, t_taps)
    if s_logits.shape != t_logits.shape:
        raise ConfigError(
            f"teacher ({type(teacher).__name__}) outputs shape {tuple(t_logits.shape)} but student "
            f"({type(student).__name__}) outputs {tuple(s_logits.shape)} on the same batch; they must match"
        )
    n = len(hidden)
    seed_everything(config.train.seed)  # adapters start the same in every run and every process
    loss = loss_cls(config.temperature, config.alpha, config.feature_weight)
    loss.setup(list(zip(s_feats[:n], t_feats[:n])), list(zip(s_feats[n:], t_feats[n:])))
    if config.cache_teacher:
        _check_cache_size([t_logits, *t_feats], len(data.train))

    # --- train
    runner = TeacherRunner(teacher, t_taps, cache=config.cache_teacher)
    with frozen(teacher), s_taps, t_taps:
        if config.cache_teacher:
            from torchslim.train import resolve_device as _resolve_device

            runner.build_cache(data.train, _resolve_device(config.train.device))
        wrapper = Distiller(student, loss, s_taps, runner, n)
        result = fit(
            wrapper,
            data,
            config.train,
            callbacks=callbacks,
            loss_fn=distill_step,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=progress,
            distributed=distributed,
        )
    teacher_accuracy = None
    if data.labeled:
        teacher_accuracy = evaluate(teacher, data.loader("test", config.train.batch_size, shuffle=False))["accuracy"]
    return DistillResult(result, teacher_accuracy, hidden, attention, runner.misses_)

