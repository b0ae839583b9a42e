"""Factorized models save/load exactly, fine-tune with ``ts.fit`` and export to ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.lowrank import FactorizeConfig, factorize_

CONFIGS = {
    "svd": FactorizeConfig(method="svd", rank=0.25),
    "tucker": FactorizeConfig(method="tucker", rank="vbmf"),
    "cp": FactorizeConfig(method="cp", rank=8, max_iter=20),
    "spatial": FactorizeConfig(method="spatial", energy=0.5),
    "separable": FactorizeConfig(method="separable", rank=2),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return ts.create_model("zoo:conv2", input_shape=(1, 12, 12))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_rebuilds_the_factorized_structure_exactly(name: str, tmp_path) -> None:
    model = _model()
    plan = factorize_(model, CONFIGS[name])
    assert plan.layers
    x = torch.randn(3, 1, 12, 12)
    ref = model(x)
    ts.save(model, tmp_path / "m")
    loaded = ts.load(tmp_path / "m")
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    assert torch.equal(loaded(x), ref)
    # the reloaded model remembers the plan, so it saves again
    ts.save(loaded, tmp_path / "m2")
    assert torch.equal(ts.load(tmp_path / "m2")(x), ref)


def test_fine_tuning_a_factorized_model_with_fit(tmp_path) -> None:
    data = ts.load_data("digits")
    model = ts.create_model("zoo:conv2", data=data)
    factorize_(model, FactorizeConfig(method="tucker", rank=0.25))
    core = model.features[2].core.weight.detach().clone()
    result = ts.fit(model, data, ts.TrainConfig(epochs=1, lr=1e-3, optimizer="adam", max_steps_per_epoch=8, device="cpu"), progress=False)
    assert not torch.equal(model.features[2].core.weight.detach(), core)  # the factors are trained
    assert result.history[0]["train_loss"] == result.history[0]["train_loss"]  # finite (not NaN)
    model.eval()
    x = torch.randn(2, *data.input_shape)
    ts.save(model, tmp_path / "ft")
    assert torch.equal(ts.load(tmp_path / "ft")(x), model(x))


@pytest.mark.parametrize(
    "dynamo", [pytest.param(True, marks=pytest.mark.slow), False], ids=["torch.export", "torchscript"]
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_of_a_factorized_zoo_model_matches(tmp_path, dynamo: bool) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _model()
    factorize_(model, FactorizeConfig(method="cp", rank=8, max_iter=20, modules="features.2"))
    factorize_(model, FactorizeConfig(method="svd", rank=0.25, modules="classifier.*"))
    model.eval()
    x = torch.randn(1, 1, 12, 12)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=dynamo)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert abs(got - ref).max() < 1e-4
