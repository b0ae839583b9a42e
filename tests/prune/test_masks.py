"""Contracts of the reversible masks: sparsify_, finalize_, sparsity_report, save/load."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.prune import (
    MaskCallback,
    finalize_,
    get_mask,
    masked_weights,
    set_masks_,
    sparsify_,
    sparsity_report,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two on a shared machine (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.fixture
def lenet():
    torch.manual_seed(0)
    return ts.create_model("zoo:lenet300")


def _x(model):
    return ts.example_inputs(model, batch_size=4)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_all_ones_mask_changes_nothing(lenet):
    x = _x(lenet)
    before = lenet(*x)
    keys = set(lenet.state_dict())
    set_masks_(lenet, {"fc1.weight": torch.ones(300, 784, dtype=torch.bool)})
    assert torch.equal(lenet(*x), before)
    assert "fc1.parametrizations.weight.original" in lenet.state_dict() and keys != set(lenet.state_dict())
    plan = sparsify_(lenet, 0.0)
    assert plan.overall == 0.0
    assert torch.equal(lenet(*x), before)


def test_same_parameter_objects_survive(lenet):
    w = lenet.fc1.weight
    opt = torch.optim.SGD(lenet.parameters(), lr=0.1)
    sparsify_(lenet, 0.5)
    assert lenet.fc1.parametrizations.weight.original is w
    lenet(*_x(lenet)).sum().backward()
    opt.step()  # the optimizer built before masking still updates the same tensor
    assert w.grad is not None
    finalize_(lenet)
    assert lenet.fc1.weight is w


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.97, 1.0])
def test_magnitude_layer_sparsity_is_exact(lenet, sparsity):
    w = lenet.fc2.weight.detach().clone()
    plan = sparsify_(lenet, sparsity)
    for name, module in masked_weights(lenet).items():
        mask = get_mask(module)
        assert int((~mask).sum()) == round(sparsity * mask.numel()), name
        assert plan.layers[name] == pytest.approx(round(sparsity * mask.numel()) / mask.numel())
    keep = get_mask(lenet.fc2)
    if 0 < sparsity < 1:  # the pruned weights are the smallest ones, and they are zero now
        assert w[~keep].abs().max() <= w[keep].abs().min()
        assert (lenet.fc2.parametrizations.weight.original[~keep] == 0).all()


def test_magnitude_global_sparsity_is_exact(lenet):
    plan = sparsify_(lenet, 0.8, scope="global")
    total = sum(m.weight.numel() for m in (lenet.fc1, lenet.fc2, lenet.fc3))
    zeros = sum(int((~get_mask(m)).sum()) for m in (lenet.fc1, lenet.fc2, lenet.fc3))
    assert zeros == round(0.8 * total)
    assert plan.overall == pytest.approx(zeros / total)
    assert len(set(round(v, 3) for v in plan.layers.values())) > 1  # global: layers differ


def test_sparsify_is_cumulative_and_never_revives(lenet):
    sparsify_(lenet, 0.5)
    first = get_mask(lenet.fc1).clone()
    sparsify_(lenet, 0.75)
    second = get_mask(lenet.fc1)
    assert not (second & ~first).any()
    assert int((~second).sum()) == round(0.75 * second.numel())


def test_overrides_and_modules(lenet):
    plan = sparsify_(lenet, 0.6, modules=["fc1", "fc3"], overrides={"fc3": 0.3})
    assert set(plan.layers) == {"fc1.weight", "fc3.weight"}
    assert plan.layers["fc3.weight"] == pytest.approx(0.3)
    assert get_mask(lenet.fc2) is None


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_masked_weights_stay_zero_through_100_steps(opt_name):
    torch.manual_seed(0)
    data = ts.load_data("synthetic:1x6x6:n=300")  # 210 train samples: 53 steps of 4 per epoch
    model = ts.create_model("zoo:lenet300", data=data)
    cfg = ts.TrainConfig(epochs=2, lr=0.05 if opt_name == "sgd" else 0.01, optimizer=opt_name, momentum=0.9,
                         batch_size=4, lr_schedule="constant", weight_decay=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01) if opt_name == "adam" else torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9)
    ts.fit(model, data, ts.TrainConfig(epochs=1, batch_size=28, lr_schedule="constant"), optimizer=opt, progress=False)
    assert any(len(s) for s in opt.state.values())  # momentum / moments exist before masking
    other = copy.deepcopy(model)
    sparsify_(model, 0.7)
    masks = {n: get_mask(m).clone() for n, m in masked_weights(model).items()}
    result = ts.fit(model, data, cfg, optimizer=opt, callbacks=[MaskCallback()], progress=False)
    assert sum(h["steps"] for h in result.history) >= 100
    for name, module in masked_weights(model).items():
        assert torch.equal(get_mask(module), masks[name])
        assert (module.weight[~masks[name]] == 0).all()
        assert (module.parametrizations.weight.original[~masks[name]] == 0).all()
    # without the callback, momentum moves the masked originals (the effective weight stays zero)
    opt2 = torch.optim.Adam(other.parameters(), lr=0.01) if opt_name == "adam" else torch.optim.SGD(
        other.parameters(), lr=0.05, momentum=0.9)
    ts.fit(other, data, ts.TrainConfig(epochs=1, batch_size=28, lr_schedule="constant"), optimizer=opt2, progress=False)
    sparsify_(other, 0.7)
    ts.fit(other, data, ts.TrainConfig(epochs=1, batch_size=28, lr_schedule="constant"), optimizer=opt2, progress=False)
    m = get_mask(other.fc1)
    assert (other.fc1.weight[~m] == 0).all()
    assert (other.fc1.parametrizations.weight.original[~m] != 0).any()


def test_masked_model_save_load_round_trip(lenet, tmp_path):
    sparsify_(lenet, 0.9, scope="global")
    x = _x(lenet)
    ts.save(lenet, tmp_path / "m")
    loaded = ts.load(tmp_path / "m")
    assert torch.equal(loaded(*x), lenet.eval()(*x))
    assert torch.equal(get_mask(loaded.fc1), get_mask(lenet.fc1))


@pytest.mark.parametrize("storage", ["auto", "bitmask", "csr", "dense"])
def test_finalize_save_load_identical_outputs(lenet, tmp_path, storage):
    sparsify_(lenet, 0.9, scope="global")
    report = finalize_(lenet, storage)
    assert not masked_weights(lenet) and not hasattr(lenet.fc1, "parametrizations")
    assert report.overall == pytest.approx(0.9, abs=1e-6)
    x = _x(lenet)
    ts.save(lenet, tmp_path / "m")
    loaded = ts.load(tmp_path / "m")
    assert torch.equal(loaded(*x), lenet.eval()(*x))
    assert sparsity_report(loaded).prunable_nonzero == report.prunable_nonzero
    # a plain load_state_dict round trip works too
    fresh = copy.deepcopy(loaded)
    fresh.load_state_dict(lenet.state_dict())
    assert torch.equal(fresh(*x), lenet(*x))


def test_90_percent_sparse_lenet_file_is_5x_smaller(lenet, tmp_path):
    ts.save(lenet, tmp_path / "dense")
    sparsify_(lenet, 0.9)
    finalize_(lenet)
    ts.save(lenet, tmp_path / "sparse")
    dense = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    sparse = os.path.getsize(tmp_path / "sparse" / "model.safetensors")
    assert dense / sparse >= 5.0
    prof = ts.profile(lenet, latency=False)
    assert prof.size_bytes == sparse  # the profiler reports the real file size
    assert prof.nonzero_params == sparsity_report(lenet).total_nonzero


def test_profile_counts_masked_nonzeros(lenet):
    before = ts.profile(lenet, latency=False)
    sparsify_(lenet, 0.5)
    after = ts.profile(lenet, latency=False)
    assert after.nonzero_params == before.nonzero_params - round(0.5 * 300 * 784) - round(0.5 * 300 * 100) - round(0.5 * 1000)


def test_sparsity_report(lenet):
    sparsify_(lenet, 0.25, modules="fc2")
    r = sparsity_report(lenet)
    rows = {row.name: row for row in r.layers}
    assert rows["fc2.weight"].masked and rows["fc2.weight"].sparsity == pytest.approx(0.25)
    assert not rows["fc1.weight"].masked and rows["fc1.weight"].sparsity == 0.0
    assert r.total_params == 266610
    assert r.total_nonzero == 266610 - 7500
    assert r.to_dict()["overall"] == pytest.approx(7500 / (235200 + 30000 + 1000))
    assert r.table().row_count == 3


def test_conv_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet5")
    x = _x(model)
    sparsify_(model, 0.8, method="lamp", scope="global")
    finalize_(model)
    ts.save(model, tmp_path / "m")
    assert torch.equal(ts.load(tmp_path / "m")(*x), model.eval()(*x))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": -0.1},
        {"sparsity": 1.5},
        {"sparsity": "half"},
        {"sparsity": None},
        {"sparsity": 0.5, "pattern": "5:4"},
        {"pattern": "2:3"},  # 784 inputs are not divisible by 3
        {"sparsity": 0.5, "pattern": "block:7x7"},
        {"sparsity": 0.5, "method": "nope"},
        {"sparsity": 0.5, "scope": "model"},
        {"sparsity": 0.5, "method": "wanda"},  # no calibration
        {"sparsity": 0.5, "modules": ["conv*"]},
        {"sparsity": 0.5, "overrides": {"fc3": 2.0}},
        {"sparsity": 0.3, "pattern": "2:4"},  # 2:4 is 50%
    ],
)
def test_bad_input_raises_and_changes_nothing(lenet, kwargs):
    sparsify_(lenet, 0.2, modules="fc3")  # an existing mask must survive the failed call too
    before = _state(lenet)
    mask = get_mask(lenet.fc3).clone()
    with pytest.raises(ConfigError):
        sparsify_(lenet, **kwargs)
    after = lenet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(get_mask(lenet.fc3), mask)
    assert get_mask(lenet.fc1) is None


def test_finalize_bad_storage_changes_nothing(lenet):
    sparsify_(lenet, 0.5)
    with pytest.raises(ConfigError):
        finalize_(lenet, "zip")
    assert len(masked_weights(lenet)) == 3


def test_plain_module_without_spec():
    lin = nn.Linear(8, 4)
    plan = sparsify_(lin, 0.5)
    assert plan.layers == {"weight": 0.5}
    finalize_(lin)
    assert int((lin.weight == 0).sum()) == 16


def test_csr_inference_matches_dense(lenet):
    from torchslim.prune._sparse_kernels import CSRLinear, to_csr_inference

    sparsify_(lenet, 0.95, modules=["fc1", "fc2"])
    with pytest.raises(ConfigError, match="finalize_"):
        to_csr_inference(lenet)
    finalize_(lenet)
    fast = to_csr_inference(lenet, min_sparsity=0.9)
    assert isinstance(fast.fc1, CSRLinear) and isinstance(fast.fc3, nn.Linear)  # fc3 is dense
    x = _x(lenet)
    assert torch.allclose(fast(*x), lenet.eval()(*x), atol=1e-5)


def test_one_mask_parametrization_shared_with_pack(lenet):
    """prune's masks are the infra-level ``torchslim._masks`` ones (pack recognises them without
    importing prune): clustering a masked layer keeps its pruned zeros."""
    from torchslim import _masks
    from torchslim.pack import cluster_
    from torchslim.prune import masks

    assert masks.WeightMask is _masks.WeightMask and masks.set_masks_ is _masks.set_masks_
    sparsify_(lenet, 0.8, modules="fc1")
    zeros = lenet.fc1.weight == 0
    cluster_(lenet, bits=3, modules=["fc1"])
    assert torch.equal(lenet.fc1.weight == 0, zeros)


def test_sparsify_overrides_naming_no_layer_are_refused_before_any_work() -> None:
    import pytest

    from torchslim.errors import ConfigError
    from torchslim.prune import sparsify_

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"overrides: '0.weigth' selects no module.*did you mean '0.weight'"):
        sparsify_(model, sparsity=0.5, overrides={"0.weigth": 0.9})
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any("parametrizations" in n for n, _ in model.named_modules())
    plan = sparsify_(model, sparsity=0.5, overrides={"0.weight": 0.75, "re:^2$": 0.25})
    assert plan.layers == pytest.approx({"0.weight": 0.75, "2.weight": 0.25})
