"""ts.save / ts.load: plan.json + safetensors, exact round trip, atomic writes, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import torchslim as ts
from torchslim import saving
from torchslim.errors import CheckpointError, ConfigError


@pytest.mark.parametrize("spec", ["zoo:lenet5", "zoo:resnet20", "torchvision:mobilenet_v3_small"])
def test_round_trip_is_exact(tmp_path, spec: str) -> None:
    model = ts.create_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    for b in model.buffers():
        if b.is_floating_point():
            b.add_(0.5)
    out = ts.save(model, tmp_path / "m")
    assert sorted(f.name for f in out.iterdir()) == ["example_inputs.safetensors", "model.safetensors", "plan.json"]
    loaded = ts.load(out)
    x = ts.example_inputs(model)
    assert torch.equal(ts.example_inputs(loaded)[0], x[0])
    with torch.no_grad():
        assert torch.equal(model(*x), loaded(*x))
    # a saved directory is itself a model spec
    again = ts.create_model(str(out))
    with torch.no_grad():
        assert torch.equal(again(*x), model(*x))


def test_save_overwrites_atomically_and_failure_leaves_old(tmp_path, monkeypatch) -> None:
    model = ts.create_model("zoo:lenet300")
    out = tmp_path / "m"
    ts.save(model, out)
    before = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "write_weights", boom)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError):
        ts.save(model, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_model_without_spec_cannot_be_saved(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no model spec"):
        ts.save(torch.nn.Linear(2, 2), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_load_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a torchslim model directory"):
        ts.load(tmp_path)
    out = ts.save(ts.create_model("zoo:lenet300"), tmp_path / "m")
    meta = json.loads((out / "plan.json").read_text())
    meta["version"] = 99
    (out / "plan.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="newer torchslim"):
        ts.load(out)
    meta["version"] = 1
    meta["model"]["plans"] = [{"kind": "teleport"}]
    (out / "plan.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'teleport'"):
        ts.load(out)
    meta["model"]["plans"] = []
    meta["model"]["build"]["num_classes"] = 3
    (out / "plan.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        ts.load(out)


@pytest.fixture
def probe_plan():
    """A plan kind that adds a module (so weights load only when the plan is replayed)."""
    from torchslim import _registry
    from torchslim._modelinfo import register_plan_kind

    calls: list[str] = []

    def replay(model: torch.nn.Module, plan: dict) -> None:
        calls.append(plan["tag"])
        model.add_module("probe", torch.nn.Linear(2, plan["width"]))

    register_plan_kind("test_probe", replay)
    yield calls
    _registry._ENTRIES["plan"].pop("test_probe", None)


def test_load_and_unpack_rebuild_alike(tmp_path, probe_plan) -> None:
    """ts.load and ts.unpack both rebuild through _modelinfo.rebuild: architecture, every plan replayed."""
    from torchslim._modelinfo import model_info, rebuild, record_plan

    model = ts.create_model("zoo:lenet300", data="mnist")
    model.add_module("probe", torch.nn.Linear(2, 3))
    record_plan(model, {"kind": "test_probe", "tag": "applied", "width": 3})
    fresh = rebuild(model_info(model))
    assert probe_plan == ["applied"] and fresh.probe.out_features == 3
    assert model_info(fresh).plans == model_info(model).plans and model_info(fresh).example.args == ()

    loaded = ts.load(ts.save(model, tmp_path / "m"))
    ts.pack(model, tmp_path / "m.tslim", bits=8)
    unpacked = ts.unpack(tmp_path / "m.tslim")
    assert probe_plan == ["applied"] * 3  # rebuild, load, unpack: each replayed the plan once
    assert torch.equal(loaded.probe.weight, model.probe.weight)
    assert [p["kind"] for p in model_info(unpacked).plans] == ["test_probe", "cluster"]  # pack clusters a copy
    assert unpacked.probe.weight.shape == model.probe.weight.shape
    for other in (loaded, unpacked):
        assert model_info(other).plans[0] == {"kind": "test_probe", "tag": "applied", "width": 3}
        assert ts.example_inputs(other)[0].shape == ts.example_inputs(model)[0].shape


def test_unknown_plan_kind_is_a_checkpoint_error(tmp_path) -> None:
    model = ts.create_model("zoo:lenet300", data="mnist")
    d = ts.save(model, tmp_path / "m")
    meta = json.loads((d / "plan.json").read_text())
    meta["model"]["plans"] = [{"kind": "prune_channel"}]
    (d / "plan.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="plan of kind 'prune_channel'.*known: .*prune_channels"):
        ts.load(d)
