"""distill(): frozen teacher restored, bad input leaves both models untouched, cache == live, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.data import DataBundle
from torchslim.distill import DistillConfig, distill
from torchslim.errors import ConfigError
from torchslim.train import Callback, TrainConfig

QUICK = TrainConfig(epochs=2, lr=0.05, batch_size=16, device="cpu", lr_schedule="constant", seed=1)


def _data(labeled: bool = True) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 6, 6, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()
    if not labeled:
        y = torch.full_like(y, -1)
    train, val, test = (TensorDataset(x[a:b], y[a:b]) for a, b in ((0, 64), (64, 80), (80, 96)))
    return DataBundle("t", "t", train, val, test, (1, 6, 6), 3, labeled)


def _cnn(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(width * 36, 3),
    )


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_round_trips_and_validates():
    cfg = DistillConfig(loss="at", temperature=2, alpha=0.5, taps=["1"], teacher_taps=["3"], cache_teacher=True,
                        train=QUICK)
    again = DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.train, TrainConfig) and again.taps == ("1",)
    assert DistillConfig.from_dict(DistillConfig(mapping={"a": "b"}).to_dict()).mapping == {"a": "b"}
    for bad, needle in [
        ({"loss": "fitnet"}, "DistillConfig.loss"),
        ({"temperature": 0}, "DistillConfig.temperature"),
        ({"alpha": -0.1}, "DistillConfig.alpha"),
        ({"feature_weight": -1}, "DistillConfig.feature_weight"),
        ({"taps": "relu1"}, "DistillConfig.taps"),
        ({"mapping": "width"}, "DistillConfig.mapping"),
        ({"mapping": {"a": "b"}, "taps": ["a"]}, "leave taps"),
        ({"attention_taps": ["a#1"]}, "loss='tinybert' only"),
        ({"train": 3}, "DistillConfig.train"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            DistillConfig(**bad)
    with pytest.raises(ConfigError, match="unknown DistillConfig field"):
        DistillConfig.from_dict({"los": "kd"})


class _TeacherSpy(Callback):
    def __init__(self, teacher: nn.Module) -> None:
        self.teacher, self.seen = teacher, []

    def on_step_end(self, state):
        self.seen.append((self.teacher.training, any(p.requires_grad for p in self.teacher.parameters())))


def test_teacher_is_frozen_while_training_and_restored_after():
    data = _data()
    teacher, student = _cnn(8, 0), _cnn(4, 1)
    teacher.train()
    teacher[0].weight.requires_grad_(False)  # a mixed state must come back exactly
    before = _state(teacher)
    spy = _TeacherSpy(teacher)
    result = distill(student, teacher, data, DistillConfig(loss="hint", train=QUICK), callbacks=[spy], progress=False)
    assert spy.seen and set(spy.seen) == {(False, False)}
    assert teacher.training and not teacher[0].weight.requires_grad and teacher[2].weight.requires_grad
    assert _same(before, _state(teacher))  # the teacher never learns
    assert result.mapping == {"3": "3"} and result.teacher_accuracy is not None
    assert result.train.epochs_run == 2 and json.loads(json.dumps(result.to_dict()))["mapping"] == {"3": "3"}


class _Boom(Callback):
    def on_step_end(self, state):
        raise RuntimeError("boom")


def test_teacher_is_restored_after_an_error():
    teacher, student = _cnn(8, 0), _cnn(4, 1)
    teacher.train()
    with pytest.raises(RuntimeError, match="boom"):
        distill(student, teacher, _data(), DistillConfig(train=QUICK), callbacks=[_Boom()], progress=False)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert sum(len(m._forward_hooks) for m in [*teacher.modules(), *student.modules()]) == 0


@pytest.mark.parametrize(
    ("teacher_fn", "config", "needle"),
    [
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 5)), DistillConfig(train=QUICK),
         r"teacher \(Sequential\) outputs shape \(2, 5\) but student \(Sequential\) outputs \(2, 3\)"),
        (lambda: _cnn(8, 0), DistillConfig(loss="hint", taps=["conv9"], train=QUICK),
         r"student \(Sequential\) has no module named 'conv9'"),
        (lambda: _cnn(8, 0), DistillConfig(loss="hint", teacher_taps=["features.1"], train=QUICK),
         r"teacher \(Sequential\) has no module named 'features.1'"),
        (lambda: _cnn(8, 0), DistillConfig(loss="at", taps=["5"], teacher_taps=["5"], train=QUICK),
         "attention transfer needs feature maps"),
    ],
)
def test_bad_input_raises_and_leaves_both_models_untouched(teacher_fn, config, needle):
    teacher, student = teacher_fn(), _cnn(4, 1)
    student.train()
    s_before, t_before = _state(student), _state(teacher)
    with pytest.raises(ConfigError, match=needle):
        distill(student, teacher, _data(), config, progress=False)
    assert _same(s_before, _state(student)) and _same(t_before, _state(teacher))
    assert student.training and sum(len(m._forward_hooks) for m in [*teacher.modules(), *student.modules()]) == 0
    with pytest.raises(ConfigError, match="teacher is the student"):
        distill(student, student, _data(), DistillConfig(train=QUICK), progress=False)


@pytest.mark.parametrize("loss", ["kd", "hint"])
def test_cached_teacher_equals_live_teacher(loss):
    data = _data()
    teacher = _cnn(8, 0)
    runs = []
    for cache in (False, True):
        student = _cnn(4, 1)
        result = distill(student, teacher, data, DistillConfig(loss=loss, cache_teacher=cache, train=QUICK),
                         progress=False)
        runs.append((_state(student), result))
    (live, _), (cached, result) = runs
    assert result.cache_misses == 0
    for key in live:
        torch.testing.assert_close(cached[key], live[key], rtol=0, atol=1e-5)


class _CrashAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, state):
        if state.epoch == self.epoch:
            raise RuntimeError("interrupted")


def test_resume_mid_run_equals_an_uninterrupted_run(tmp_path):
    data = _data()
    teacher = _cnn(8, 0)
    config = DistillConfig(loss="hint", taps=["1", "3"], teacher_taps=["1", "3"],
                           train=TrainConfig.from_dict({**QUICK.to_dict(), "epochs": 3, "lr_schedule": "cosine"}))
    straight = _cnn(4, 1)
    distill(straight, teacher, data, config, progress=False)

    crashed = _cnn(4, 1)
    with pytest.raises(RuntimeError, match="interrupted"):
        distill(crashed, teacher, data, config, callbacks=[_CrashAt(2)], checkpoint_dir=tmp_path, progress=False)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["epochs_completed"] == 2 and any(k.startswith("loss.adapters.") for k in saved["model"])
    resumed = _cnn(4, 7)
    result = distill(resumed, teacher, data, config, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert result.train.epochs_run == 3
    assert _same(_state(straight), _state(resumed))


def test_unlabeled_data_distills_on_the_soft_term_only():
    teacher, student = _cnn(8, 0), _cnn(4, 1)
    result = distill(student, teacher, _data(labeled=False), DistillConfig(train=QUICK), progress=False)
    assert result.teacher_accuracy is None and result.train.test_accuracy is None
    assert result.train.history[-1]["train_loss"] < result.train.history[0]["train_loss"]


class _TinyEncoder(nn.Module):
    def __init__(self, width: int, layers: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(6, width)
        self.attn = nn.ModuleList(nn.MultiheadAttention(width, 2, batch_first=True) for _ in range(layers))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.embed(x.flatten(2).transpose(1, 2).reshape(x.shape[0], 6, 6))
        for attn in self.attn:
            out, _ = attn(h, h, h, need_weights=True, average_attn_weights=False)
            h = h + out
        return self.head(h.mean(1))


def test_tinybert_matches_hidden_states_and_attention_maps_by_depth():
    teacher, student = _TinyEncoder(16, 4, 0), _TinyEncoder(8, 2, 1)
    config = DistillConfig(
        loss="tinybert",
        attention_taps=["attn.0#1", "attn.1#1"],
        teacher_attention_taps=[f"attn.{i}#1" for i in range(4)],
        train=QUICK,
    )
    result = distill(student, teacher, _data(), config, progress=False)
    assert result.mapping == {"attn.0": "attn.1", "attn.1": "attn.3"}
    assert result.attention_mapping == {"attn.0#1": "attn.1#1", "attn.1#1": "attn.3#1"}
    assert result.train.history[-1]["train_loss"] < result.train.history[0]["train_loss"]
