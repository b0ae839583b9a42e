"""Pruning schedules as train-loop callbacks: AGP, polynomial decay, constant, one-shot, iterative."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.prune import (
    AGP,
    ConstantSparsity,
    IterativePruning,
    OneShotPruning,
    PolynomialDecay,
    get_mask,
    masked_weights,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two on a shared machine (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.fixture(scope="module")
def data():
    return ts.load_data("synthetic:1x6x6:n=100")  # 70 train samples


def _model(data):
    torch.manual_seed(0)
    return ts.create_model("zoo:lenet300", data=data)


def _cfg(epochs, **kw):
    return ts.TrainConfig(epochs=epochs, batch_size=10, lr=0.01, optimizer="adam", lr_schedule="constant", **kw)


def test_polynomial_decay_follows_tf_mot_formula():
    s = PolynomialDecay(0.1, 0.9, begin_step=10, end_step=30, power=2, frequency=5)
    for step in (0, 10, 15, 20, 30, 99):
        t = min(max(step - 10, 0), 20) / 20
        assert s.sparsity_at(step) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - t) ** 2)
    assert AGP(0.0, 0.8, 0, 10).power == 3.0


def test_agp_reaches_final_sparsity_exactly_and_monotonically(data):
    model = _model(data)
    agp = AGP(final_sparsity=0.8, begin_step=2, end_step=20, frequency=3)
    ts.fit(model, data, _cfg(4), callbacks=[agp], progress=False)  # 28 steps
    steps = [h["step"] for h in agp.history_]
    assert steps == [2, 5, 8, 11, 14, 17, 20]
    sp = [h["sparsity"] for h in agp.history_]
    assert sp == sorted(sp) and sp[0] == 0.0 and sp[-1] == pytest.approx(0.8)
    for module in masked_weights(model).values():
        keep = get_mask(module)
        assert int((~keep).sum()) == round(0.8 * keep.numel())
        assert (module.weight[~keep] == 0).all()


def test_constant_sparsity_with_override(data):
    model = _model(data)
    sched = ConstantSparsity(0.6, begin_step=0, frequency=5, overrides={"fc3": 0.3})
    ts.fit(model, data, _cfg(1), callbacks=[sched], progress=False)
    assert [h["step"] for h in sched.history_] == [0, 5]
    assert float((~get_mask(model.fc1)).float().mean()) == pytest.approx(0.6, abs=1e-4)
    assert float((~get_mask(model.fc3)).float().mean()) == pytest.approx(0.3, abs=1e-3)


def test_one_shot_then_finetune(data):
    model = _model(data)
    sched = OneShotPruning(0.9, at_step=3, scope="global")
    ts.fit(model, data, _cfg(1), callbacks=[sched], progress=False)
    assert len(sched.history_) == 1 and sched.history_[0]["step"] == 3
    assert sched.history_[0]["overall"] == pytest.approx(0.9, abs=1e-6)


def test_iterative_rounds_with_half_rate_output_layer(data):
    model = _model(data)
    sched = IterativePruning(rate=0.2, rounds=3, epochs_per_round=1, overrides={"fc3": 0.1})
    ts.fit(model, data, _cfg(5), callbacks=[sched], progress=False)
    assert [h["epoch"] for h in sched.history_] == [1, 2, 3]
    assert float((~get_mask(model.fc1)).float().mean()) == pytest.approx(1 - 0.8**3, abs=1e-4)
    assert float((~get_mask(model.fc3)).float().mean()) == pytest.approx(1 - 0.9**3, abs=1e-3)


def test_movement_schedule_accumulates_scores(data):
    model = _model(data)
    sched = AGP(final_sparsity=0.5, begin_step=3, end_step=6, frequency=3, method="movement")
    ts.fit(model, data, _cfg(1), callbacks=[sched], progress=False)
    assert set(sched.criterion_.scores_) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert float((~get_mask(model.fc2)).float().mean()) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: PolynomialDecay(0.0, 0.5, begin_step=100, end_step=50),  # ends before it starts
        lambda: AGP(0.0, 0.5, begin_step=10, end_step=10),
        lambda: ConstantSparsity(0.5, begin_step=5, end_step=2),
        lambda: PolynomialDecay(0.0, 1.5, 0, 10),
        lambda: ConstantSparsity(-0.1),
        lambda: AGP(0.0, 0.5, 0, 10, frequency=0),
        lambda: AGP(0.0, 0.5, -1, 10),
        lambda: IterativePruning(rate=0.2, rounds=0),
        lambda: OneShotPruning(0.5, pattern="5:4"),
        lambda: ConstantSparsity(0.5, scope="all"),
        lambda: ConstantSparsity(0.5, overrides={"fc3": 3}),
    ],
)
def test_bad_schedules_raise(make):
    with pytest.raises(ConfigError):
        make()


def test_schedule_state_round_trip():
    s = AGP(0.0, 0.5, 0, 10)
    s.history_.append({"step": 0, "epoch": 0, "sparsity": 0.0, "overall": 0.0})
    t = AGP(0.0, 0.5, 0, 10)
    t.load_state_dict(s.state_dict())
    assert t.history_ == s.history_
