"""Static PTQ: BN folding, calibration, accuracy on real MNIST, save/load, ONNX int8, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError, InputShapeError
from torchslim.quantize import QuantConfig, quantize_, sqnr
from torchslim.quantize.ptq import fold_batchnorm_


@pytest.fixture(scope="module")
def mnist():
    return ts.load_data("mnist")


@pytest.fixture(scope="module")
def trained(mnist):
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet300", data=mnist)
    cfg = ts.TrainConfig(epochs=1, lr=2e-3, optimizer="adam", device="cpu", max_steps_per_epoch=40)
    ts.fit(model, mnist, cfg, progress=False)
    return model.eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fold_batchnorm_keeps_outputs() -> None:
    model = ts.create_model("zoo:resnet20").eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 32, 32)
    y = model(x)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    pairs = fold_batchnorm_(model, (x,))
    assert len(pairs) == n_bn == 21
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(model(x), y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("observer", ["minmax", pytest.param("mse", marks=pytest.mark.slow), pytest.param("entropy", marks=pytest.mark.slow)])
def test_static_int8_accuracy_within_one_point(trained, mnist, observer: str) -> None:
    test = mnist.loader("test", 256)
    acc_fp32 = ts.evaluate(trained, test)["accuracy"]
    assert acc_fp32 > 0.85
    model = copy.deepcopy(trained)
    plan = quantize_(model, QuantConfig(mode="static", observer=observer, calibration_batches=8), calibration=mnist.loader("train", 64, shuffle=False))
    assert plan.layers == ["fc1", "fc2", "fc3"] and plan.calibration_batches == 8
    acc_int8 = ts.evaluate(model, test)["accuracy"]
    assert abs(acc_int8 - acc_fp32) <= 0.01


def test_sixteen_bit_static_is_near_no_op() -> None:
    model = ts.create_model("zoo:lenet5").eval()
    x = torch.randn(4, 1, 28, 28)
    y = model(x)
    quantize_(model, QuantConfig(mode="static", bits=16, act_bits=16), calibration=[x])
    out = model(x)
    assert ((out - y).norm() / y.norm()) < 1e-3
    assert sqnr(y, out) > 60


def test_static_save_load_round_trip(tmp_path) -> None:
    model = ts.create_model("zoo:lenet5").eval()
    x = torch.randn(2, 1, 28, 28)
    quantize_(model, QuantConfig(mode="static", observer="percentile"), calibration=[x, torch.randn_like(x)])
    y = model(x)
    ts.save(model, tmp_path / "m")
    loaded = ts.load(tmp_path / "m")
    assert torch.equal(loaded(x), y)


def test_static_onnx_runs_int8_and_agrees(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from torchslim.export.onnx_int import export_integer_onnx
    from torchslim.export.ort import ort_run

    model = ts.create_model("zoo:lenet5").eval()
    calib = [torch.randn(8, 1, 28, 28) for _ in range(4)]
    quantize_(model, QuantConfig(mode="static"), calibration=calib)
    files = export_integer_onnx(model, (calib[0][:1],), tmp_path / "m.onnx", calibration=calib)
    graph = onnx.load(files["onnx"]).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    q_in = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    assert float(inits[q_in.input[1]]) == pytest.approx(float(model.features[0].input_scale), rel=1e-6)  # our range
    assert int(inits[q_in.input[2]]) == int(model.features[0].input_zero_point)
    # the weights ONNX Runtime stores are our integers, with our scales
    dq_w = next(n for n in graph.node if n.op_type == "DequantizeLinear" and "features.0.weight" in n.input[0])
    assert torch.equal(torch.from_numpy(inits[dq_w.input[0]].copy()), model.features[0].qweight)
    assert torch.allclose(torch.from_numpy(inits[dq_w.input[1]].copy()), model.features[0].weight_scale)
    x = torch.randn(8, 1, 28, 28)
    y32 = ort_run(files["onnx_fp32"], x)
    assert sqnr(y32, ort_run(files["onnx"], x)) > 20
    assert sqnr(model(x), ort_run(files["onnx"], x)) > 25  # parity with torchslim's int8 model
    assert (tmp_path / "m.onnx").stat().st_size * 2.5 < (tmp_path / "m.fp32.onnx").stat().st_size


def test_config_round_trip_and_bad_values() -> None:
    cfg = QuantConfig(mode="qat", bits=4, observer="entropy", lsq="lsq+", skip=("fc3",))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"bits": 9}, {"bits": 1}, {"act_bits": 0}, {"mode": "int8"}, {"observer": "kl"}, {"lsq": "lsq", "mode": "static"}):
        with pytest.raises(ConfigError):
            QuantConfig(**bad)
    with pytest.raises(ConfigError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"bitz": 8})


def test_bad_input_leaves_model_unchanged() -> None:
    model = ts.create_model("zoo:lenet5").eval()
    before = _state(model)
    with pytest.raises(ConfigError, match="calibration"):
        quantize_(model, QuantConfig(mode="static"))
    with pytest.raises(ConfigError, match="no batches"):
        quantize_(model, QuantConfig(mode="static"), calibration=[])
    with pytest.raises(InputShapeError):
        quantize_(model, QuantConfig(mode="static"), calibration=[torch.randn(2, 3, 32, 32)])
    with pytest.raises(ConfigError, match="'nope\\*' selects no module"):
        quantize_(model, QuantConfig(mode="static", modules=("nope*",)), calibration=[torch.randn(2, 1, 28, 28)])
    assert _same(before, _state(model))
    assert type(model.features[0]) is torch.nn.Conv2d and not hasattr(model.features[0], "input_quant")
