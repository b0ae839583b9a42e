"""Contracts of the train loop: learning, exact resume, callback order, early stopping, configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.data import DataBundle, load_data
from torchslim.errors import CheckpointError, ConfigError
from torchslim.train import Callback, EarlyStopping, TrainConfig, TrainResult, evaluate, fit, seed_everything
from torchslim.zoo.models import create_zoo_model

QUICK = dict(lr=0.05, batch_size=32, max_steps_per_epoch=4, lr_schedule="constant", device="cpu")


@pytest.fixture(scope="module")
def mnist() -> DataBundle:
    return load_data("mnist")


@pytest.fixture(scope="module")
def tiny() -> DataBundle:
    return load_data("synthetic:1x16:n=120:classes=3")


def _dropout_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lenet300_learns_mnist(mnist):
    torch.manual_seed(0)
    model = create_zoo_model("lenet300")
    config = TrainConfig(epochs=2, lr=0.05, batch_size=64, lr_schedule="constant", device="cpu")
    result = fit(model, mnist, config, progress=False)
    # Measured 0.933 (val 0.928) after two full epochs; chance is 0.1.
    assert result.test_accuracy > 0.85
    assert result.best_val_accuracy > 0.85
    assert result.epochs_run == 2 and len(result.history) == 2
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[0]["steps"] == 55  # ceil(3500 / 64)
    assert model.training


def test_resume_is_bit_identical_to_a_straight_run(mnist, tmp_path):
    config = TrainConfig(epochs=3, momentum=0.9, **QUICK)
    straight = _dropout_mlp()
    straight_result = fit(straight, mnist, config, progress=False)

    partial = _dropout_mlp()
    first = fit(partial, mnist, TrainConfig(epochs=1, **QUICK), checkpoint_dir=tmp_path, progress=False)
    assert first.epochs_run == 1 and (tmp_path / "last.pt").is_file()
    resumed = _dropout_mlp(seed=123)  # different init: everything must come from the checkpoint
    result = fit(resumed, mnist, config, checkpoint_dir=tmp_path, resume=True, progress=False)

    assert _same_weights(straight, resumed)
    assert result.epochs_run == 3
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in straight_result.history]
    assert result.test_accuracy == straight_result.test_accuracy
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp files left


class _Interrupt(Exception):
    pass


class _CrashAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, state):
        if state.epoch == self.epoch:
            raise _Interrupt


def test_resume_after_a_crash_with_cosine_schedule_is_bit_identical(mnist, tmp_path):
    config = TrainConfig(
        epochs=3, lr=0.05, batch_size=32, max_steps_per_epoch=4, lr_schedule="cosine", device="cpu"
    )
    straight = _dropout_mlp()
    fit(straight, mnist, config, progress=False)
    crashed = _dropout_mlp()
    with pytest.raises(_Interrupt):
        fit(crashed, mnist, config, callbacks=[_CrashAt(2)], checkpoint_dir=tmp_path, progress=False)
    resumed = _dropout_mlp(seed=7)
    result = fit(resumed, mnist, config, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert _same_weights(straight, resumed)
    assert [h["lr"] for h in result.history] == pytest.approx([0.05, 0.0375, 0.0125])


def test_resume_without_checkpoint_starts_fresh_and_corrupt_checkpoint_fails(tiny, tmp_path):
    def run(epochs: int = 2, optimizer: str = "sgd") -> TrainResult:
        config = TrainConfig(epochs=epochs, **{**QUICK, "optimizer": optimizer})
        return fit(nn.Linear(16, 3), tiny, config, checkpoint_dir=tmp_path, resume=True, progress=False)

    result = run()
    assert result.epochs_run == 2 and result.checkpoint == str(tmp_path / "last.pt")
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epochs_completed", "history", "rng"} <= set(saved)
    assert saved["epochs_completed"] == 2
    again = run()  # already finished: nothing left to train, same history
    assert again.epochs_run == 2 and again.history[0]["train_loss"] == result.history[0]["train_loss"]
    with pytest.raises(CheckpointError, match="optimizer='sgd'"):
        run(3, optimizer="adam")
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="last.pt"):
        run(3)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        fit(nn.Linear(16, 3), tiny, TrainConfig(epochs=1, **QUICK), resume=True, progress=False)


def test_checkpoint_of_another_model_raises_checkpoint_error(tiny, tmp_path):
    fit(nn.Linear(16, 3), tiny, TrainConfig(epochs=1, **QUICK), checkpoint_dir=tmp_path, progress=False)
    other = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 3))
    with pytest.raises(CheckpointError, match="does not fit"):
        fit(other, tiny, TrainConfig(epochs=2, **QUICK), checkpoint_dir=tmp_path, resume=True, progress=False)


class _Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.grads_seen: list[bool] = []
        self.steps: list[int] = []

    def on_train_begin(self, state):
        self.events.append("train_begin")

    def on_epoch_begin(self, state):
        self.events.append(f"epoch_begin{state.epoch}")

    def on_step_begin(self, state):
        self.events.append("step_begin")
        assert state.batch[0].shape[0] == 32

    def on_after_backward(self, state):
        self.events.append("after_backward")
        self.grads_seen.append(all(p.grad is not None for p in state.model.parameters()))

    def on_step_end(self, state):
        self.events.append("step_end")
        self.steps.append(state.step)

    def on_epoch_end(self, state):
        self.events.append(f"epoch_end{state.epoch}")
        assert "val_accuracy" in state.metrics and state.history[-1] is state.metrics

    def on_train_end(self, state):
        self.events.append("train_end")


def test_callbacks_fire_in_documented_order(tiny):
    recorder = _Recorder()
    fit(
        nn.Linear(16, 3),
        tiny,
        TrainConfig(epochs=2, **{**QUICK, "max_steps_per_epoch": 2}),
        callbacks=[recorder],
        progress=False,
    )
    step = ["step_begin", "after_backward", "step_end"]
    expected = [
        "train_begin",
        "epoch_begin0",
        *step,
        *step,
        "epoch_end0",
        "epoch_begin1",
        *step,
        *step,
        "epoch_end1",
        "train_end",
    ]
    assert recorder.events == expected
    assert recorder.grads_seen == [True] * 4
    assert recorder.steps == [1, 2, 3, 4]


class _KeepZero(Callback):
    """A pruning-style mask: zero gradients after backward and weights after the step."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def on_train_begin(self, state):
        state.model.weight.data.mul_(self.mask)

    def on_after_backward(self, state):
        state.model.weight.grad.mul_(self.mask)

    def on_step_end(self, state):
        state.model.weight.data.mul_(self.mask)


def test_masking_callbacks_keep_pruned_weights_at_zero(tiny):
    model = nn.Linear(16, 3)
    mask = (torch.rand(3, 16) > 0.5).float()
    fit(
        model,
        tiny,
        TrainConfig(epochs=2, optimizer="adamw", weight_decay=0.1, **QUICK),
        callbacks=[_KeepZero(mask)],
        progress=False,
    )
    assert (model.weight.detach()[mask == 0] == 0).all()
    assert (model.weight.detach()[mask == 1] != 0).all()


class _Constant(Callback):
    def on_epoch_end(self, state):
        state.metrics["constant"] = 1.0


def test_early_stopping_stops_after_patience_epochs(tiny):
    stopper = EarlyStopping(monitor="constant", patience=2, mode="max")
    result = fit(
        nn.Linear(16, 3),
        tiny,
        TrainConfig(epochs=10, **QUICK),
        callbacks=[_Constant(), stopper],
        progress=False,
    )
    assert result.epochs_run == 3 and result.stopped_early
    assert stopper.stopped_epoch_ == 2 and stopper.wait_ == 2 and stopper.best_ == 1.0
    with pytest.raises(ConfigError, match="val_acc"):
        fit(
            nn.Linear(16, 3),
            tiny,
            TrainConfig(epochs=1, **QUICK),
            callbacks=[EarlyStopping("val_acc")],
            progress=False,
        )
    with pytest.raises(ConfigError, match="mode"):
        EarlyStopping(mode="up")
    with pytest.raises(ConfigError, match="patience"):
        EarlyStopping(patience=-1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", -1),
        ("epochs", 1.5),
        ("epochs", True),
        ("lr", 0),
        ("lr", float("nan")),
        ("optimizer", "rmsprop"),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("batch_size", 0),
        ("lr_schedule", "linear"),
        ("seed", -1),
        ("device", "gpu9"),
        ("max_steps_per_epoch", 0),
        ("grad_clip", 0.0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}") as info:
        TrainConfig(**{field: value})
    assert isinstance(info.value, ValueError)


def test_config_round_trips_through_json():
    config = TrainConfig(
        epochs=3, lr=1, optimizer="adam", grad_clip=2, max_steps_per_epoch=5, device="cuda:1"
    )
    assert config.lr == 1.0 and isinstance(config.lr, float)
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ConfigError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 0.1})
    with pytest.raises(AttributeError):
        config.lr = 0.5  # frozen


@pytest.mark.parametrize(
    ("schedule", "lrs"),
    [
        ("constant", [0.1] * 4),
        ("step", [0.1, 0.1, 0.01, 0.001]),
        ("cosine", [0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]),
    ],
)
def test_lr_schedules_change_lr_per_epoch(tiny, schedule, lrs):
    config = TrainConfig(
        epochs=4,
        lr=0.1,
        lr_schedule=schedule,
        batch_size=32,
        max_steps_per_epoch=1,
        device="cpu",
        grad_clip=1.0,
    )
    result = fit(nn.Linear(16, 3), tiny, config, progress=False)
    assert [h["lr"] for h in result.history] == pytest.approx(lrs)


def test_evaluate_restores_modes_and_counts_correctly():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.BatchNorm1d(3))
    model.train()
    model[2].eval()  # mixed modes must come back exactly
    x = torch.randn(10, 4)
    with torch.no_grad():
        model.eval()
        predicted = model(x).argmax(1)
        model.train()
        model[2].eval()
    y = predicted.clone()
    y[:3] = (y[:3] + 1) % 3  # three wrong labels
    metrics = evaluate(model, TensorDataset(x, y), batch_size=4)
    assert metrics["n"] == 10 and metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["loss"] > 0
    assert model.training and model[0].training and model[1].training and not model[2].training
    with pytest.raises(ConfigError, match="unlabeled"):
        evaluate(model, TensorDataset(x, torch.full((10,), -1)))


def test_unlabeled_data_needs_a_loss_and_skips_accuracies():
    ds = TensorDataset(torch.randn(20, 5), torch.full((20,), -1))
    data = DataBundle("unlabeled", "unlabeled", ds, ds, ds, (5,), None, False)
    with pytest.raises(ConfigError, match="loss_fn"):
        fit(nn.Linear(5, 5), data, TrainConfig(epochs=1, **QUICK), progress=False)

    def reconstruction(model, inputs, targets):
        outputs = model(inputs)
        return ((outputs - inputs) ** 2).mean(), outputs

    result = fit(
        nn.Linear(5, 5), data, TrainConfig(epochs=2, **QUICK), loss_fn=reconstruction, progress=False
    )
    assert result.test_accuracy is None and result.best_val_accuracy is None
    assert (
        "val_accuracy" not in result.history[0]
        and result.history[1]["train_loss"] < result.history[0]["train_loss"]
    )
    assert json.loads(json.dumps(result.to_dict()))["epochs_run"] == 2
    assert isinstance(result, TrainResult)


def test_progress_goes_to_stderr_not_stdout(tiny, capsys):
    fit(nn.Linear(16, 3), "synthetic:1x16:n=60:classes=3", TrainConfig(epochs=1, **QUICK), progress=True)
    assert capsys.readouterr().out == ""


def test_seed_everything_makes_runs_repeatable(tiny):
    seed_everything(5)
    a = torch.rand(3)
    seed_everything(5)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ConfigError, match="seed"):
        seed_everything(-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_runs_on_cuda(tiny):
    model = nn.Linear(16, 3)
    result = fit(model, tiny, TrainConfig(epochs=1, **{**QUICK, "device": "cuda"}), progress=False)
    assert next(model.parameters()).is_cuda and 0.0 <= result.test_accuracy <= 1.0
