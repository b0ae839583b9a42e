"""QAT: prepare -> train in the shared loop -> convert; LSQ; save/load."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import FakeQuantize, LSQFakeQuantize, freeze_qat_, qat_prepare_


@pytest.mark.parametrize("lsq", [None, "lsq", "lsq+"])
def test_qat_trains_and_converts(tmp_path, lsq: str | None) -> None:
    data = ts.load_data("synthetic:1x1x28x28:n=128")
    model = ts.create_model("zoo:lenet5", data=data)
    plan = qat_prepare_(model, bits=4, lsq=lsq)
    assert plan.config.mode == "qat" and len(plan.layers) == 5
    original = model.features[0].parametrizations.weight.original
    snapshot = original.detach().clone()
    result = ts.fit(model, data, ts.TrainConfig(epochs=1, lr=1e-3, optimizer="adam", device="cpu", max_steps_per_epoch=5), progress=False)
    assert result.epochs_run == 1
    assert not torch.equal(original.detach(), snapshot)  # the float weights behind the fake-quant learn
    if lsq:
        steps = [m for m in model.modules() if isinstance(m, LSQFakeQuantize)]
        assert steps and all(bool(m.initialized) for m in steps)
    assert freeze_qat_(model)["frozen"] == 10
    assert not any(getattr(m, "qat", False) for m in model.modules() if isinstance(m, FakeQuantize))
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    y = model(x)
    ts.save(model, tmp_path / "m")
    assert torch.equal(ts.load(tmp_path / "m")(x), y)


def test_qat_weight_ranges_follow_weights() -> None:
    model = ts.create_model("zoo:lenet300")
    qat_prepare_(model, bits=8)
    model.train()
    model(torch.randn(2, 1, 28, 28))
    wq = model.fc1.parametrizations.weight[0]
    with torch.no_grad():
        model.fc1.parametrizations.weight.original.mul_(0.5)
    model(torch.randn(2, 1, 28, 28))  # a training forward refreshes the weight scale
    amax = model.fc1.parametrizations.weight.original.abs().amax(dim=1)
    assert torch.allclose(wq.scale.flatten(), amax / 127.5, rtol=1e-4)


def test_convert_without_prepare_raises() -> None:
    assert freeze_qat_(ts.create_model("zoo:lenet300")) is None  # the finalizer: nothing of its kind here
    from torchslim.quantize import qat_convert_

    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="qat_prepare_"):
        qat_convert_(ts.create_model("zoo:lenet300"))


def test_qat_after_pruning_with_distillation(tmp_path) -> None:
    """Prune channels, prepare QAT, train with KD from the unpruned float model, convert: the
    pruned shapes stay, the weights behind the fake-quant learn, save/load replays prune then
    quantize, and the int8 ONNX file matches the torch model."""
    pytest.importorskip("onnxruntime")
    from torchslim.export.onnx_int import export_integer_onnx
    from torchslim.quantize.onnx_lowering import onnx_parity

    torch.manual_seed(0)
    data = ts.load_data("synthetic:1x1x28x28:n=128")
    teacher = ts.create_model("zoo:lenet5", data=data).eval()
    student = ts.create_model("zoo:lenet5", data=data)
    student.load_state_dict(teacher.state_dict())
    ts.prune_channels_(student, ratio=0.5)
    widths = [m.out_channels for m in student.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths != [m.out_channels for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)]
    calib = [x for x, _ in data.loader("train", 32)][:2]
    plan = qat_prepare_(student, bits=4, calibration=calib)
    assert plan.config.mode == "qat"
    original = student.features[0].parametrizations.weight.original
    snapshot = original.detach().clone()
    cfg = ts.DistillConfig(train=ts.TrainConfig(epochs=1, lr=1e-3, optimizer="adam", device="cpu", max_steps_per_epoch=5))
    result = ts.distill(student, teacher, data, cfg, progress=False)
    assert result.train.epochs_run == 1
    assert not torch.equal(original.detach(), snapshot)  # the KD gradient reaches the weights through the STE
    assert [m.out_channels for m in student.modules() if isinstance(m, torch.nn.Conv2d)] == widths
    freeze_qat_(student)
    student.eval()
    x = calib[0][:8]
    with torch.no_grad():
        y = student(x)
    ts.save(student, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(ts.load(tmp_path / "m")(x), y)
    files = export_integer_onnx(student, (x[:1],), tmp_path / "m.onnx", calibration=calib)
    assert onnx_parity(student, files, x)["int8_vs_torch_quantized_db"] > 20
