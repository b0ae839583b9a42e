"""torchslim's own oneDNN int8 conv (primitives built once) and its use by ts.quantize.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.quantize import QuantConfig, onednn, quantize_


def _wheels_installed() -> bool:
    try:
        onednn._locate()
    except FileNotFoundError:
        return False
    return True


needs_op = pytest.mark.skipif(not onednn.available(), reason=f"torchslim's oneDNN conv: {onednn.why_unavailable()}")


def test_the_operator_builds_wherever_its_onednn_is_installed() -> None:
    if not _wheels_installed():
        pytest.skip("onednn-cpu-gomp / onednn-devel not installed (make setup installs them)")
    assert onednn.available(), onednn.why_unavailable()


def _reference(x, xs, xz, w, ws, b, stride, pad, dil, groups, ys, yz, act, acc=None, accs=0.0, accz=0):
    y = F.conv2d((x.float() - xz) * xs, w.float() * ws[:, None, None, None], b, stride, pad, dil, groups)
    if acc is not None:
        y = y + (acc.float() - accz) * accs
    y = y.relu() if act == "relu" else y.clamp(0, 6) if act == "relu6" else y
    return (torch.round(y / ys) + yz).clamp(0, 255).to(torch.uint8)


@needs_op
@pytest.mark.parametrize("groups,act,residual,stride,dil", [(1, "none", False, 1, 1), (8, "relu6", False, 2, 1),
                                                          (16, "relu6", False, 1, 1), (1, "relu", True, 1, 1),
                                                          (2, "none", True, 1, 2)])
def test_operator_computes_the_dequantize_conv_requantize_chain(groups, act, residual, stride, dil) -> None:
    g = torch.Generator().manual_seed(groups + stride)
    x = torch.randint(0, 256, (2, 16, 11, 11), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (16, 16 // groups, 3, 3), dtype=torch.int8, generator=g)
    ws, b = torch.rand(16, generator=g) * 0.01 + 1e-3, torch.randn(16, generator=g)
    out_hw = (11 + 2 - dil * 2 - 1) // stride + 1
    acc = torch.randint(0, 256, (2, 16, out_hw, out_hw), dtype=torch.uint8, generator=g) if residual else None
    kw = {"accum": acc, "accum_scale": 0.07, "accum_zp": 130} if residual else {}
    got = onednn.qconv2d(x, 0.05, 120, w, ws, b, (stride, stride), (1, 1), (dil, dil), groups, y_scale=0.2, y_zp=100, act=act, **kw)
    ref = _reference(x, 0.05, 120, w, ws, b, stride, 1, dil, groups, 0.2, 100, act, acc, 0.07, 130)
    assert got.shape == ref.shape and got.dtype == torch.uint8 and got.is_contiguous(memory_format=torch.channels_last)
    diff = (got.int() - ref.int()).abs()
    # the same integers; float rounding may move a code sitting on a rounding boundary by one
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.005
    assert int((ref != 0).sum()) > ref.numel() // 4  # a check that can fail: the outputs are not all clipped


@needs_op
def test_a_primitive_is_built_once_per_distinct_call() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (8, 4, 3, 3), dtype=torch.int8, generator=g)
    ws = torch.rand(8, generator=g) * 0.01
    x = torch.randint(0, 256, (1, 4, 8, 8), dtype=torch.uint8, generator=g)
    before = onednn.cached_primitives()
    first = onednn.qconv2d(x, 0.1, 0, w, ws, None, y_scale=0.5, y_zp=0)
    assert onednn.cached_primitives() == before + 1
    again = onednn.qconv2d(x, 0.1, 0, w, ws, None, y_scale=0.5, y_zp=0)
    assert onednn.cached_primitives() == before + 1 and torch.equal(first, again)
    onednn.qconv2d(torch.randint(0, 256, (1, 4, 10, 10), dtype=torch.uint8, generator=g), 0.1, 0, w, ws, None, y_scale=0.5, y_zp=0)
    assert onednn.cached_primitives() == before + 2  # a new input shape: a new primitive


@needs_op
def test_bad_inputs_are_refused_with_a_message() -> None:
    w = torch.zeros(8, 4, 3, 3, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="x must be a 4-D uint8 CPU tensor"):
        onednn.qconv2d(torch.zeros(1, 4, 8, 8), 0.1, 0, w, torch.ones(8), None, y_scale=1.0, y_zp=0)
    with pytest.raises(RuntimeError, match="channels 3 do not match the weight"):
        onednn.qconv2d(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0.1, 0, w, torch.ones(8), None, y_scale=1.0, y_zp=0)


class _Net(nn.Module):
    """MobileNetV2- and ResNet-style blocks: ReLU6, depthwise, a residual add, a ReLU after an add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.ReLU6())
        self.pw = nn.Conv2d(16, 16, 1)
        self.c1 = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU())
        self.c2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        x = torch.relu(self.c2(self.c1(x)) + x)
        return self.fc(x.mean((2, 3)))


@needs_op
def test_compile_runs_every_int8_conv_on_the_operator() -> None:
    pytest.importorskip("torchao")
    from torchslim.quantize import compile as compile_int8
    from torchslim.quantize.int8_compile import int8_kernels

    torch.manual_seed(0)
    model = _Net().eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    quantize_(model, QuantConfig(mode="static"), calibration=calib)
    x = torch.randn(2, 3, 16, 16)
    ours, theirs = int8_kernels(model, x, onednn=True), int8_kernels(model, x, onednn=False)
    # c2's add + ReLU output is read in float by the mean (no calibrated grid there): that conv keeps
    # PyTorch's kernel, which writes float; the other four read and write uint8 on the operator
    assert ours["cached_qconv"] == 4 and ours["qconv"] == 5 and ours["qconv_add"] == 2 and ours["float_conv"] == 0
    assert theirs["cached_qconv"] == 0 and theirs["qconv"] == 5 and theirs["qconv_add"] == 2
    torch._dynamo.reset()
    fast = compile_int8(model, onednn=True)
    assert fast.onednn
    out = fast(x)
    torch._dynamo.reset()
    ref = compile_int8(model, onednn=False)(x)
    with torch.no_grad():
        eager = model(x)
    # the same int8 graph on two oneDNN paths: equal up to a code moved by float rounding
    step = float(model.fc.input_scale) * float(model.fc.weight_scale.max()) * 16
    assert float((out - ref).abs().max()) <= step
    assert float((out - eager).abs().max()) <= 4 * step + 0.02 * float(eager.abs().max())


@needs_op
def test_convs_above_the_size_limit_keep_pytorchs_kernel(monkeypatch) -> None:
    pytest.importorskip("torchao")
    from torchslim.quantize.int8_compile import int8_kernels

    torch.manual_seed(0)
    model = _Net().eval()
    quantize_(model, QuantConfig(mode="static"), calibration=[torch.randn(4, 3, 16, 16)])
    x = torch.randn(1, 3, 16, 16)
    # the two 16 -> 16 3x3 convs at 8x8 make 147,456 multiply-adds each; the stem 27,648, pw 16,384, dw 9,216
    monkeypatch.setattr(onednn, "MAX_MACS", 120_000)
    counts = int8_kernels(model, x, onednn=True)
    assert counts["qconv"] == 5 and counts["cached_qconv"] == 3 and counts["qconv_add"] == 2  # c1 and c2 are over


def test_compile_onednn_true_without_the_operator_names_why(monkeypatch) -> None:
    pytest.importorskip("torchao")
    from torchslim.errors import MissingDependencyError
    from torchslim.quantize import compile as compile_int8

    monkeypatch.setitem(onednn._state, "tried", True)
    monkeypatch.setitem(onednn._state, "ok", False)
    monkeypatch.setitem(onednn._state, "why", "FileNotFoundError: oneDNN not found")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    quantize_(model, QuantConfig(mode="static"), calibration=[torch.randn(2, 3, 8, 8)])
    with pytest.raises(MissingDependencyError, match="oneDNN conv is not available: FileNotFoundError: oneDNN not found"):
        compile_int8(model, onednn=True)
    assert compile_int8(model).onednn is False  # the default falls back to PyTorch's kernels
