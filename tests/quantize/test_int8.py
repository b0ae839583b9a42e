"""Static / QAT int8 that is real in PyTorch: integer modules, saved bytes, reload, compiled int8 kernels."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import QuantConfig, freeze_qat_, qat_prepare_, quantize_, sqnr
from torchslim.quantize.int8 import Int8Conv, Int8Linear, int8_blocker, to_int8_
from torchslim.quantize.ptq import attach_quantizers_, calibrate_, quantizable_layers


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()


def test_integer_modules_compute_what_the_fake_quant_did() -> None:
    torch.manual_seed(0)
    model = _cnn()
    model[1] = nn.Identity()
    calib = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    cfg = QuantConfig(mode="static")
    layers = quantizable_layers(model)
    attach_quantizers_(layers, {n: cfg.weight_scheme(n) for n in layers}, cfg.act_scheme())
    calibrate_(model, calib, 2)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        fake = model(x)
        done, kept = to_int8_(model, list(layers))
        real = model(x)
    assert done == ["0", "3", "7"] and kept == {}
    assert isinstance(model[0], Int8Conv) and isinstance(model[7], Int8Linear)
    assert model[0].qweight.dtype == torch.int8 and model[3].qweight.shape == (8, 4, 3, 3)
    assert torch.allclose(real, fake, atol=1e-5, rtol=1e-5)


def test_static_state_dict_is_int8_and_file_is_4x_smaller(tmp_path) -> None:
    torch.manual_seed(0)
    model = ts.create_model("torchvision:resnet18")
    fp32_dir = tmp_path / "fp32"
    ts.save(model, fp32_dir)
    calib = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y32 = model.eval()(x)
    plan = quantize_(model, QuantConfig(mode="static"), calibration=calib)
    assert len(plan.integer) == 21 and plan.fake_quant == {}  # 20 convs + fc
    sd = model.state_dict()
    assert sd["conv1.qweight"].dtype == torch.int8 and sd["fc.qweight"].dtype == torch.int8
    assert not any(k.endswith(".weight") and v.is_floating_point() and v.dim() > 1 for k, v in sd.items())
    with torch.no_grad():
        y8 = model(x)
    assert sqnr(y32, y8) > 15
    ts.save(model, tmp_path / "int8")
    ratio = (fp32_dir / "model.safetensors").stat().st_size / (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert ratio >= 3.8
    loaded = ts.load(tmp_path / "int8")
    assert isinstance(loaded.layer1[0].conv1, Int8Conv) and loaded.layer1[0].conv1.qweight.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(loaded(x), y8)
    prof = ts.profile(model, x[:1])
    assert prof.size_bytes * 3.8 <= ts.profile(ts.load(fp32_dir), x[:1]).size_bytes
    # the integer weights still count as parameters; each BN's scale and shift became its conv's bias
    bn = sum(m.weight.numel() for m in ts.load(fp32_dir).modules() if isinstance(m, nn.BatchNorm2d))
    assert prof.params == sum(p.numel() for p in ts.load(fp32_dir).parameters()) - bn


def test_qat_finalize_converts_and_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    data = ts.load_data("synthetic:1x1x28x28:n=64")
    model = ts.create_model("zoo:lenet5", data=data)
    qat_prepare_(model, bits=8)
    ts.fit(model, data, ts.TrainConfig(epochs=1, lr=1e-3, optimizer="adam", device="cpu", max_steps_per_epoch=3), progress=False)
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    assert freeze_qat_(model) == {"frozen": 10, "integer": 5}
    assert isinstance(model.features[0], Int8Conv) and isinstance(model.classifier[0], Int8Linear)
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    ts.save(model, tmp_path / "m")
    loaded = ts.load(tmp_path / "m")
    assert isinstance(loaded.features[0], Int8Conv)
    with torch.no_grad():
        assert torch.equal(loaded(x), after)


def test_other_bit_widths_stay_fake_quant_and_say_why(tmp_path) -> None:
    model = ts.create_model("zoo:lenet300")
    x = torch.randn(4, 1, 28, 28)
    plan = quantize_(model, QuantConfig(mode="static", layer_bits={"fc2": 4}), calibration=[x])
    assert plan.integer == ["fc1", "fc3"] and list(plan.fake_quant) == ["fc2"]
    assert "int4" in plan.fake_quant["fc2"] and "stays fake-quant" in plan.fake_quant["fc2"]
    assert isinstance(model.fc1, Int8Linear) and hasattr(model.fc2, "input_quant")
    assert int8_blocker(model.fc2) == plan.fake_quant["fc2"]
    with torch.no_grad():
        y = model(x)
    ts.save(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(ts.load(tmp_path / "m")(x), y)


def test_smoothquant_and_bias_correction_carry_into_integer_layers(tmp_path) -> None:
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet300")
    outlier = torch.ones(1, 1, 28, 28)
    outlier[..., 0, :4] = 40.0
    calib = [torch.rand(16, 1, 28, 28) * outlier for _ in range(3)]
    plan = quantize_(model, QuantConfig(mode="static", smoothquant_alpha=0.5, smoothquant_min_gain=0.0, bias_correction=True),
                     calibration=calib)
    assert "fc1" in plan.smoothed and plan.bias_corrected and plan.integer == ["fc1", "fc2", "fc3"]
    assert isinstance(model.fc1, Int8Linear) and model.fc1.smooth_scale.shape == (784,)
    x = calib[0]
    with torch.no_grad():
        y = model(x)
    ts.save(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(ts.load(tmp_path / "m")(x), y)


def test_quantizing_an_int8_model_again_is_refused() -> None:
    model = ts.create_model("zoo:lenet5")
    quantize_(model, QuantConfig(mode="static"), calibration=[torch.randn(2, 1, 28, 28)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_(model, QuantConfig(mode="static"), calibration=[torch.randn(2, 1, 28, 28)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_compiled_int8_runs_onednn_int8_kernels() -> None:
    pytest.importorskip("torchao")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    from torchslim.quantize import compile as compile_int8
    from torchslim.quantize.int8_compile import int8_kernels

    torch.manual_seed(0)
    model = _cnn()
    fp32 = copy.deepcopy(model)
    calib = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    quantize_(model, QuantConfig(mode="static"), calibration=calib)
    x = calib[0]
    counts = int8_kernels(model, x)
    assert counts["qconv"] == 2 and counts["qlinear"] == 1 and counts["float_conv"] == 0
    assert int8_kernels(fp32, x)["qconv"] == 0  # the count can fail: a float model has none
    torch._dynamo.reset()
    fast = compile_int8(model)
    with torch.no_grad():
        eager = model(x)
    out = fast(x)
    assert torch.allclose(out, eager, atol=0.05 * float(eager.abs().max()))


def test_lsq_qat_finalizes_to_the_same_integers() -> None:
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet300")
    qat_prepare_(model, bits=8, lsq="lsq")
    model.train()
    model(torch.rand(8, 1, 28, 28)).sum().backward()  # initialises the learned steps
    model.eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    assert ts.finalize_(model, kinds=["qat"])["qat"] == {"frozen": 6, "integer": 3}
    assert isinstance(model.fc2, Int8Linear)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4, rtol=1e-4)


def test_finalize_of_an_int8_model_has_nothing_left_to_do() -> None:
    model = ts.create_model("zoo:lenet5")
    x = torch.randn(2, 1, 28, 28)
    quantize_(model, QuantConfig(mode="static"), calibration=[x])
    assert ts.finalize_(model) == {}  # no Conv/Linear left for the masks finalizer: nothing to do, no error
    with pytest.raises(ConfigError, match="storage"):
        ts.finalize_(model, storage="zip")
    qat = ts.create_model("zoo:lenet5")
    qat_prepare_(qat, bits=8, calibration=[x])
    assert ts.finalize_(qat) == {"qat": {"frozen": 10, "integer": 5}}


class _Residual(nn.Module):
    """Stem conv + max pool, a ResNet basic block and a downsampling block, pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.a1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16))
        self.tail = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.a2(self.a1(x)) + x)  # identity shortcut
        x = torch.relu(self.b2(self.b1(x)) + self.down(x))  # downsampling shortcut
        x = torch.relu(self.tail(x))
        return self.fc(x.mean((2, 3)))


def _quantized_residual() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = _Residual().eval()
    with torch.no_grad():  # BN statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    quantize_(model, QuantConfig(mode="static"), calibration=calib)
    return model, calib


def test_output_ranges_are_calibrated_and_survive_save_load(tmp_path) -> None:
    model, calib = _quantized_residual()
    down = model.down[0]
    assert isinstance(down, Int8Conv) and float(down.output_scale) > 0
    # the stored grid covers what the layer outputs on the calibration data
    with torch.no_grad():
        y = down(model.stem(calib[0]))
    lo = (0 - int(down.output_zero_point)) * float(down.output_scale)
    hi = (255 - int(down.output_zero_point)) * float(down.output_scale)
    assert lo <= float(y.min()) + 1e-4 and float(y.max()) - 1e-4 <= hi
    # a state dict written before output ranges were kept still loads (range: not calibrated)
    state = {k: v for k, v in model.state_dict().items() if "output_" not in k}
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(state, strict=True)
    assert float(fresh.down[0].output_scale) == 0 and fresh.down[0]._out_scale == 0
    # ts.save / ts.load keep them
    torch.manual_seed(0)
    net = ts.create_model("torchvision:resnet18")
    quantize_(net, QuantConfig(mode="static"), calibration=[torch.randn(2, 3, 32, 32)])
    assert float(net.layer2[0].downsample[0].output_scale) > 0
    ts.save(net, tmp_path / "m")
    loaded = ts.load(tmp_path / "m")
    for name, m in net.named_modules():
        if isinstance(m, (Int8Conv, Int8Linear)):
            other = loaded.get_submodule(name)
            assert torch.equal(other.output_scale, m.output_scale) and torch.equal(other.output_zero_point, m.output_zero_point)
            assert other._out_scale == m._out_scale


def test_compiled_residual_block_fuses_adds_and_pools_on_int8() -> None:
    pytest.importorskip("torchao")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    from torchslim.quantize import compile as compile_int8
    from torchslim.quantize.int8_compile import int8_kernels

    model, calib = _quantized_residual()
    x = calib[0][:2]
    counts = int8_kernels(model, x)
    # both shortcuts run inside their block's second conv (oneDNN "sum" post-op), the stem's
    # pool on uint8; every conv and the fc on int8 kernels
    assert counts["qconv"] == 7 and counts["qlinear"] == 1 and counts["float_conv"] == 0
    assert counts["qconv_add"] == 2 and counts["qmaxpool"] == 1
    torch._dynamo.reset()
    fast = compile_int8(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        eager = model(x)
    out = fast(x)
    # the compiled graph rounds the shortcuts to int8 grids the eager model keeps in float: the
    # outputs differ by a few quantization steps of the logits at most
    step = float(model.fc.input_scale) * float(model.fc.weight_scale.max()) * 16
    assert float((out - eager).abs().max()) <= 4 * step + 0.02 * float(eager.abs().max())
    assert torch.equal(out.argmax(1), eager.argmax(1))
    # plain torch.compile traces no markers: same numbers, no marker op left in the graph
    torch._dynamo.reset()
    with torch.no_grad():
        plain = torch.compile(model)(x)
    assert torch.allclose(plain, eager, atol=1e-4, rtol=1e-4)


def test_qat_training_drops_the_calibrated_output_ranges() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    model = ts.create_model("zoo:lenet5")
    qat_prepare_(model, bits=8, calibration=[x])
    untrained = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    model(x).sum().backward()
    opt.step()
    model.eval()
    ts.finalize_(model)
    ts.finalize_(untrained)
    layers = [m for m in model.modules() if isinstance(m, (Int8Conv, Int8Linear))]
    assert layers and all(float(m.output_scale) == 0 for m in layers)  # measured before training: dropped
    assert all(float(m.output_scale) > 0 for m in untrained.modules() if isinstance(m, (Int8Conv, Int8Linear)))


def test_compiled_pool_flatten_linear_pools_uint8_with_the_same_numbers() -> None:
    pytest.importorskip("torchao")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    from torchslim.quantize import compile as compile_int8
    from torchslim.quantize.int8_compile import int8_kernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    calib = [torch.randn(4, 1, 12, 12) for _ in range(2)]
    quantize_(model, QuantConfig(mode="static"), calibration=calib)
    counts = int8_kernels(model, calib[0])
    assert counts["qmaxpool"] == 1 and counts["qconv"] == 1 and counts["qlinear"] == 1
    torch._dynamo.reset()
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        eager = model(x)
    # pooling the quantized tensor is exact: only the kernels' float rounding differs
    assert torch.allclose(compile_int8(model)(x), eager, atol=1e-3 * float(eager.abs().max()) + 1e-5)


def test_compiled_global_average_pool_reads_the_convs_uint8_output() -> None:
    """conv -> ReLU6 -> global average pool -> linear (MobileNetV2's head): the conv writes uint8 on
    its calibrated output grid, so only the linear writes float; the outputs stay within a step."""
    pytest.importorskip("torchao")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    from torchslim.quantize import compile as compile_int8
    from torchslim.quantize.int8_compile import int8_kernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 5)).eval()
    calib = [torch.randn(4, 3, 10, 10) for _ in range(2)]
    quantize_(model, QuantConfig(mode="static"), calibration=calib)
    counts = int8_kernels(model, calib[0])
    assert counts["qconv"] == 1 and counts["qlinear"] == 1 and counts["float_out"] == 1
    torch._dynamo.reset()
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        eager = model(x)
    out = compile_int8(model)(x)
    # the new rounding: half a step of the conv's output grid, averaged, through the linear
    bound = 0.5 * float(model[0].output_scale) * float(model[4].dequantized_weight().abs().sum(1).max())
    assert float((out - eager).abs().max()) <= bound + 2 * float(model[4].input_scale) * float(model[4].dequantized_weight().abs().sum(1).max())
    # without the rewrite the conv would write float: the count can fail
    import torchslim.quantize.int8_compile as int8_module

    def no_mean_pass(graph, ranges):
        return 0

    original = int8_module._int8_mean
    int8_module._int8_mean = no_mean_pass
    try:
        assert int8_kernels(model, calib[0])["float_out"] == 2
    finally:
        int8_module._int8_mean = original


def test_compiled_int8_keeps_each_instance_apart() -> None:
    """Three compiled models of one class (same ``forward``), called in turn at one shape and then
    at another, and again after dynamo's caches are cleared: each returns its own model's output."""
    pytest.importorskip("torchao")
    from torchslim.quantize import compile as compile_int8

    torch.manual_seed(0)
    base = _cnn().eval()
    flipped = copy.deepcopy(base)
    with torch.no_grad():
        list(flipped.parameters())[-1].add_(1.0)  # the last bias: a different output
    q = copy.deepcopy(base)
    quantize_(q, QuantConfig(mode="static"), calibration=[torch.randn(4, 3, 12, 12) for _ in range(2)])
    models = [base, q, flipped]
    runs = [compile_int8(m) for m in models]
    for shape in ((2, 3, 12, 12), (5, 3, 12, 12)):
        x = torch.randn(*shape)
        with torch.no_grad():
            wants = [m(x) for m in models]
        firsts = [run(x) for run in runs]  # a new shape: compiled with every guard
        for first, want, m in zip(firsts, wants, models):
            atol = 0.05 * float(want.abs().max()) if m is q else 1e-4
            assert torch.allclose(first, want, atol=atol, rtol=1e-4)
        for _ in range(2):  # seen shapes: the right graph answers
            for run, first in zip(runs, firsts):
                assert torch.equal(run(x), first)
    assert float((wants[2] - wants[0]).abs().max()) > 0.5  # base and flipped differ: the check can fail
    # after dynamo's caches are cleared, a shape seen before compiles again with every guard: the
    # flipped copy compiles first, and the base model must not run the flipped one's graph
    torch._dynamo.reset()
    assert torch.allclose(runs[2](x), wants[2], atol=1e-4, rtol=1e-4)
    assert torch.allclose(runs[0](x), wants[0], atol=1e-4, rtol=1e-4)


def test_compiled_int8_keeps_only_the_guards_a_snapshot_needs() -> None:
    """``ts.quantize.compile`` keeps Dynamo's guards on the inputs, global state and the identity of
    the model's tensors, and drops the per-attribute ones (thousands on a real CNN, checked on every
    call); a new input shape still compiles again and answers right."""
    pytest.importorskip("torchao")
    from torchslim.quantize import compile as compile_int8
    from torchslim.quantize.int8_compile import _snapshot_guards

    torch.manual_seed(0)
    model = _cnn().eval()
    quantize_(model, QuantConfig(mode="static"), calibration=[torch.randn(4, 3, 12, 12) for _ in range(2)])
    seen: list[tuple[str, str, bool]] = []

    def recording(entries: list[Any]) -> list[bool]:
        keep = _snapshot_guards(model)(entries)
        seen.extend((e.guard_type, e.name, k) for e, k in zip(entries, keep, strict=True))
        return keep

    torch._dynamo.reset()
    run = compile_int8(model, options={"guard_filter_fn": recording})
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = model(x)
    assert torch.allclose(run(x), want, atol=0.05 * float(want.abs().max()))
    kept = {(t, n) for t, n, k in seen if k}
    dropped = {(t, n) for t, n, k in seen if not k}
    assert ("TENSOR_MATCH", "args[0]") in kept  # the input's shape / dtype / device (nn.Sequential: args)
    assert {t for t, n in kept} >= {"ID_MATCH", "GRAD_MODE"}
    assert all(t == "ID_MATCH" for t, n in kept if n.startswith("fn"))  # fn: the Sequential itself
    assert ("ID_MATCH", "fn._modules['0']._buffers['qweight']") in kept
    assert ("CONSTANT_MATCH", "fn._modules['0']._in_scale") in dropped and len(dropped) > 3 * len(kept)
    y = torch.randn(5, 3, 12, 12)  # a new shape fails the kept input guard: compiled again, right answer
    with torch.no_grad():
        want = model(y)
    out = run(y)
    assert out.shape == want.shape and torch.allclose(out, want, atol=0.05 * float(want.abs().max()))
