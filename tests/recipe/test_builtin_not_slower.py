"""No built-in recipe makes a model slower than the original in the runtime it deploys to (#24).

Every built-in recipe except the decoder-LLM ones runs at test size (one short epoch wherever it
trains) on a briefly trained zoo model, with the compress guard on: the final model is timed
against the original in each deploy runtime (paired; a first figure above 1.0 is re-measured with
more runs before it counts, see ``torchslim.recipe._guard``). The test asserts the verdict only;
it never asserts a speed-up. The int8 recipes run on Conv-2: on LeNet-5 every int8 configuration
measured here (all layers, all but the 1-channel first conv, Linear only) is 1.1x-2x slower in ONNX
Runtime than fp32, the channels are too few for the integer kernels to pay. The ``torch`` target of a
static-int8 model is timed compiled (its integer kernels exist only under inductor), against the
original compiled the same way. Known misses are
expected failures naming what was measured; each turns into a pass when its cause is fixed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchslim as ts
from torchslim.recipe import compress, list_recipes, load_recipe

pytestmark = pytest.mark.slow

# recipe -> (model, deploy targets known to be slower: why)
CASES = {
    "lottery": ("zoo:lenet5", {}),
    "deep-compression": ("zoo:lenet5", {}),
    "quantize-int8": ("zoo:conv2", {}),
    "prune-distill-quantize": ("zoo:conv2", {}),
    "default": ("zoo:conv2", {}),
    "lowrank-distill": ("zoo:lenet5", {}),
}


def test_every_builtin_recipe_but_llm_is_listed() -> None:
    assert set(CASES) == {n for n in list_recipes() if not n.startswith("llm")}


@pytest.fixture(scope="module")
def data():
    return ts.load_data("mnist", seed=0)


@pytest.mark.parametrize("name", list(CASES))
def test_builtin_recipe_is_not_slower_where_it_deploys(name: str, data, tmp_path: Path, monkeypatch, shrink) -> None:
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))
    kinds = {next(iter(s)) for s in load_recipe(name).to_dict()["stages"]}
    if kinds & {"cluster", "pack"}:
        pytest.importorskip("torchslim.pack")
    spec, known = CASES[name]
    torch.manual_seed(0)
    model = ts.create_model(spec, data=data)
    ts.fit(model, data, ts.TrainConfig(epochs=1, lr=0.05, max_steps_per_epoch=25, seed=0), progress=False)
    result = compress(model, shrink(name, export_runs=10), data, out=tmp_path / "run", progress=False)
    goals = [g for g in result.report["goals"] if g["name"] == "not_slower"]
    exported = next((s.config["formats"] for s in load_recipe(name).stages if s.kind == "export"), ["torch"])
    assert sorted(g["deploy_target"] for g in goals) == sorted(exported)  # every deploy target judged
    slower = {g["deploy_target"]: g for g in goals if not g["met"]}
    unexpected = {t: (g["value"], g.get("stage")) for t, g in slower.items() if t not in known}
    assert not unexpected, f"{name} on {spec}: slower than the original in {unexpected} (ratio, stage)"
    if slower:
        pytest.xfail("; ".join(f"{t}: {g['value']:.2f}x ({known[t]})" for t, g in slower.items()))
