"""Recipe stages come from the registry, their schemas from the family configs (one place for
defaults); ``ts.finalize_`` makes every family's reversible edits permanent; old names warn."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import torchslim as ts
from torchslim._config import jsonable
from torchslim._registry import entries
from torchslim.errors import ConfigError
from torchslim.recipe import load_recipe
from torchslim.recipe.schema import stage_kinds

KINDS = stage_kinds()


def _schema_defaults(schema) -> dict:
    out = {}
    for name, f in schema.model_fields.items():
        value = f.default_factory() if f.default_factory is not None else f.default
        out[name] = value.model_dump() if hasattr(value, "model_dump") else value
    return out


def test_every_stage_is_a_registry_entry() -> None:
    registered = {e.name: e for e in entries("recipe_stage")}
    assert set(KINDS) <= set(registered)
    for name, kind in KINDS.items():
        e = registered[name]
        assert e.obj is kind and e.meta["runner"] is kind.run and e.meta["schema"] is kind.schema
        assert callable(kind.run) and e.description


@pytest.mark.parametrize("name", [n for n, k in KINDS.items() if k.config is not None])
def test_schema_defaults_are_the_config_defaults(name: str) -> None:
    kind = KINDS[name]
    config_defaults = jsonable(kind.config.defaults())
    schema_defaults = _schema_defaults(kind.schema)
    fields = [f for f in schema_defaults if f in config_defaults]
    assert fields, f"stage {name!r} shares no field with {kind.config.__name__}"
    for f in fields:
        if f in kind.own_defaults:  # declared on purpose (e.g. gptq: 4-bit groups)
            continue
        assert jsonable(schema_defaults[f]) == config_defaults[f], (name, f)
    # a stage config with every default builds the family config (validation in one place)
    resolved = load_recipe({"stages": [{name: _required(name)}]}).stages[0].config
    kind.check(resolved)


def _required(name: str) -> dict:
    return {"prune_channels": {"ratio": 0.5}, "sparsify": {"sparsity": 0.5}, "factorize": {"rank": 0.5},
            "prune_heads": {"heads": 0.25}}.get(name, {})


def test_finetune_fields_are_the_train_config_fields() -> None:
    from torchslim.train import TrainConfig

    assert list(KINDS["finetune"].schema.model_fields) == TrainConfig.field_names()
    assert list(KINDS["distill"].schema.model_fields["train"].annotation.model_fields) == TrainConfig.field_names()


def test_old_field_names_still_work_and_warn() -> None:
    with pytest.warns(DeprecationWarning, match="'ignore' is deprecated, use 'skip'"):
        r = load_recipe({"stages": [{"prune_channels": {"ratio": 0.5, "ignore": ["fc3"]}}]})
    assert r.stages[0].config["skip"] == ["fc3"] and "ignore" not in r.stages[0].config
    with pytest.warns(DeprecationWarning, match="'exclude' is deprecated"):
        r = load_recipe({"stages": [{"factorize": {"rank": 0.5, "exclude": ["fc3"]}}]})
    assert r.stages[0].config["skip"] == ["fc3"]
    with pytest.raises(ts.errors.ConfigError, match="give only 'skip'"):
        load_recipe({"stages": [{"prune_channels": {"ratio": 0.5, "ignore": ["a"], "skip": ["b"]}}]})


def test_a_stage_is_one_decorated_function() -> None:
    from torchslim._registry import unregister
    from torchslim.pack import ClusterConfig
    from torchslim.recipe.stages import stage

    @stage("test_cluster_twice", config=ClusterConfig, description="a test stage")
    def run(model, cfg, ctx):
        return model, {}

    try:
        r = load_recipe({"stages": [{"test_cluster_twice": {"bits": 3}}]})
        assert r.stages[0].config["bits"] == 3 and r.stages[0].config["init"] == ClusterConfig().init
        with pytest.raises(ts.errors.ConfigError, match="test_cluster_twice.*'bitz'.*did you mean 'bits'"):
            load_recipe({"stages": [{"test_cluster_twice": {"bitz": 3}}]})
        with pytest.raises(ts.errors.ConfigError, match="test_cluster_twice"):  # the config's own check
            load_recipe({"stages": [{"test_cluster_twice": {"init": "nope"}}]})
    finally:
        unregister("recipe_stage", "test_cluster_twice")


# --------------------------------------------------------------------------- finalize_


def test_finalize_bakes_masks_and_clusters() -> None:
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet300")
    ts.sparsify_(model, 0.5, modules=["fc1", "fc2"])
    ts.cluster_(model, bits=4, modules=["fc3"])
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    done = ts.finalize_(model)
    assert list(done) == ["clusters", "masks"]
    assert done["clusters"] == ["fc3.weight"]
    assert done["masks"].overall == pytest.approx(0.5 * (784 * 300 + 300 * 100) / (784 * 300 + 300 * 100 + 100 * 10),
                                                  abs=1e-3)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert ts.finalize_(model) == {}  # nothing reversible left


def test_finalize_selects_and_refuses_unknown_kinds() -> None:
    model = ts.create_model("zoo:lenet300")
    ts.sparsify_(model, 0.5)
    ts.quantize.qat_prepare_(model, bits=8)
    done = ts.finalize_(model, kinds=["qat"])
    assert list(done) == ["qat"] and done["qat"]["frozen"] > 0
    assert ts.prune.masked_weights(model)  # masks untouched
    with pytest.raises(ConfigError, match="unknown finalizer 'mask'.*did you mean 'masks'"):
        ts.finalize_(model, kinds=["mask"])
    with pytest.raises(ConfigError, match="storage"):
        ts.finalize_(model, storage="zip")


def test_prune_finalize_keeps_masks_only_with_storage() -> None:
    model = ts.create_model("zoo:lenet300")
    ts.sparsify_(model, 0.5)
    ts.cluster_(model, bits=4, modules=["fc3"])
    report = ts.prune.finalize_(model, storage="csr")
    from torchslim.pack import clustered_layers

    assert report.overall > 0.4 and clustered_layers(model)  # clusters untouched


def test_old_finalizer_names_warn() -> None:
    model = ts.create_model("zoo:lenet300")
    ts.cluster_(model, bits=4)
    with pytest.warns(DeprecationWarning, match="bake_ is deprecated, use ts.finalize_"):
        assert ts.bake_(model) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    ts.quantize.qat_prepare_(model, bits=8)
    with pytest.warns(DeprecationWarning, match="qat_convert_ is deprecated, use ts.finalize_"):
        assert ts.qat_convert_(model)["frozen"] > 0
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="no fake-quant"):
        ts.qat_convert_(ts.create_model("zoo:lenet300"))


# --------------------------------------------------------------------------- data=


def test_data_keyword_takes_a_bundle_or_batches() -> None:
    data = ts.load_data("synthetic:1x28x28", seed=0) if "synthetic" in str(ts.list_datasets()) else None
    if data is None:  # pragma: no cover
        pytest.skip("no synthetic data set")
    a = ts.create_model("zoo:lenet300")
    b = ts.create_model("zoo:lenet300")
    b.load_state_dict(a.state_dict())
    batches = list(data.loader("train", 64, shuffle=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # calibration= stays silent (see the report)
        ts.sparsify_(a, 0.5, method="wanda", data=data)
        ts.sparsify_(b, 0.5, method="wanda", calibration=batches)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ConfigError, match="pass only data="):
        ts.sparsify_(a, 0.6, method="wanda", data=data, calibration=batches)
    q = ts.create_model("zoo:lenet300")
    assert ts.quantize_(q, mode="static", data=data).config.mode == "static"


def test_taylor_importance_takes_a_bundle() -> None:
    data = ts.load_data("synthetic:1x28x28", seed=0)
    model = ts.create_model("zoo:lenet300")
    plan = ts.prune_channels_(model, ratio=0.5, importance="taylor", data=data)
    assert plan.removed_channels > 0


def test_every_config_stage_names_a_dataclass_config() -> None:
    for name, kind in KINDS.items():
        if kind.config is not None:
            assert dataclasses.is_dataclass(kind.config) and hasattr(kind.config, "defaults"), name
