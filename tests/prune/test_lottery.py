"""Lottery tickets: IMP with reset / rewinding, controls, lottery.json and plot."""

from __future__ import annotations

import json

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.prune import LotteryConfig, get_mask, run_lottery, sparsify_
from torchslim.prune.lottery import _load_weights, _snapshot, find_ticket


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two on a shared machine (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.fixture(scope="module")
def data():
    return ts.load_data("synthetic:1x6x6:n=120")


def _cfg(**kw):
    base = dict(rounds=2, rate=0.5, epochs=1, eval_every=2, batch_size=21, device="cpu")
    base.update(kw)
    return LotteryConfig(**base)


def test_config_round_trip_and_validation():
    cfg = LotteryConfig(rounds=3, rewind_iter=5, controls=("reinit", "random_mask"), overrides={"fc2": 0.3})
    assert LotteryConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in ({"rate": 1.0}, {"rate": -0.1}, {"rounds": 0}, {"seeds": 0}, {"controls": ("shuffle",)},
                {"rewind_iter": -1}, {"optimizer": "lion"}, {"eval_every": 0}, {"output_rate": 2.0}):
        with pytest.raises(ConfigError):
            LotteryConfig(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        LotteryConfig.from_dict({"round": 3})


def test_reset_keeps_masks_and_restores_init(data):
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet300", data=data)
    init = _snapshot(model)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)  # "training"
    sparsify_(model, 0.5)
    keep = get_mask(model.fc1)
    _load_weights(model, init)
    w = model.fc1.weight.detach()
    assert torch.equal(w[keep], init["fc1.weight"][keep])
    assert (w[~keep] == 0).all()
    assert torch.equal(model.fc1.bias, init["fc1.bias"])


def test_per_layer_rates_and_output_layer_half_rate(data):
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet300", data=data)
    run = find_ticket(model, data, _cfg(rounds=2, rate=0.2, controls=()), seed=0)
    assert len(run["rounds"]) == 2
    for layer, rate in (("fc1", 0.2), ("fc2", 0.2), ("fc3", 0.1)):
        kept = float(get_mask(getattr(model, layer)).float().mean())
        assert kept == pytest.approx((1 - rate) ** 2, abs=2e-3)
    for rec in run["rounds"]:
        assert rec["ticket"]["early_stop_iter"] in [p[0] for p in rec["ticket"]["curve"]]
        best = min(rec["ticket"]["curve"], key=lambda p: p[1])
        assert rec["ticket"]["accuracy"] == best[2]  # test accuracy at minimum validation loss


def test_run_lottery_json_and_plot(data, tmp_path):
    result = run_lottery("zoo:lenet300", data, _cfg(seeds=2, controls=("reinit", "random_mask")))
    files = result.write(tmp_path)
    doc = json.loads((tmp_path / "lottery.json").read_text())
    assert (tmp_path / "lottery.png").stat().st_size > 1000 and files["plot"].endswith("lottery.png")
    assert 0.0 <= doc["dense_accuracy"] <= 1.0 and len(doc["dense_accuracy_per_seed"]) == 2
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    r2 = doc["rounds"][1]
    for key in ("remaining", "ticket_accuracy", "reinit_accuracy", "ticket_early_stop_iter",
                "reinit_early_stop_iter", "random_mask_accuracy"):
        assert key in r2
    assert r2["ticket_accuracy"] == pytest.approx(sum(r2["ticket_accuracy_per_seed"]) / 2)
    assert r2["remaining"] < doc["rounds"][0]["remaining"] < 1.0
    assert result.ticket is not None and get_mask(result.ticket.fc1) is not None


def test_rewinding_to_iteration_k(data):
    result = run_lottery("zoo:lenet300", data, _cfg(rounds=1, rewind_iter=2, controls=()))
    assert len(result.rounds) == 1
    with pytest.raises(ConfigError, match="rewind_iter"):
        run_lottery("zoo:lenet300", data, _cfg(rounds=1, rewind_iter=10_000, controls=()))


def test_run_lottery_rejects_unlabeled():
    with pytest.raises(ConfigError):
        run_lottery("zoo:lenet300", object(), _cfg())
