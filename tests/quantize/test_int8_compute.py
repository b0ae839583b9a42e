"""Weight-only ``compute="int8"``: the torch layer rounds its input to int8 per group exactly as
ONNX Runtime's ``MatMulNBits`` does at ``accuracy_level=4``, and the setting survives save / load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import QuantConfig, quantize_
from torchslim.quantize.api import replay_quantize
from torchslim.quantize.primitives import int8_blocks
from torchslim.quantize.weight_only import QuantizedLinear

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _identity_session(k: int) -> object:
    """One MatMulNBits (bits 4, blocks of 32, accuracy_level 4) whose weight is the identity: its
    output is the int8-rounded input times its block scale, i.e. the kernel's own activations."""
    from onnx import TensorProto, helper

    codes = np.full((k, k), 8, np.uint8)
    np.fill_diagonal(codes, 9)  # (9 - 8) * scale 1 on the diagonal, 0 elsewhere
    codes = codes.reshape(k, k // 32, 32)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=k, bits=4,
                            block_size=32, accuracy_level=4)
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor("B", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
         helper.make_tensor("S", TensorProto.FLOAT, [k * k // 32], np.ones(k * k // 32, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_int8_blocks_are_the_kernels_activations_at_ties() -> None:
    """Inputs built to sit on or next to half-way points (x = (j + 0.5) * max / 127): a wrong
    reciprocal (``127.0 / t`` in torch is ``t.reciprocal() * 127``) or rounding mode shows here."""
    g = torch.Generator().manual_seed(0)
    k, rows = 64, 48
    amax = torch.rand(rows, k // 32, 1, generator=g) * 4.5 + 0.5
    j = torch.randint(-126, 126, (rows, k // 32, 32), generator=g).float() + 0.5
    x = (j * (amax / 127.0)).float()
    x[..., 0] = amax[..., 0]  # each block's maximum is the amax the points were built from
    x = x.reshape(rows, k)
    got = torch.from_numpy(_identity_session(k).run(None, {"A": x.numpy()})[0])
    ours = int8_blocks(x, 32)
    step = (amax / 127.0).expand(rows, k // 32, 32).reshape(rows, k)
    assert ((got - ours).abs() / step).max().item() < 0.25  # the same integer everywhere (a wrong one is a whole step off)
    assert ((got - x).abs() / step).max().item() > 0.4  # the points really are rounded


def test_int8_blocks_gradient_passes_straight_through() -> None:
    x = torch.randn(3, 64, requires_grad=True)
    int8_blocks(x, 32).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_compute_setting_survives_save_load_and_old_plans_stay_float(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet300")
    x = torch.rand(4, 1, 28, 28)
    quantize_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=4))
    assert {m.act_block for m in model.modules() if isinstance(m, QuantizedLinear)} == {4}
    with torch.no_grad():
        ref = model(x)
    ts.save(model, tmp_path / "m")
    back = ts.load(tmp_path / "m")
    assert {m.act_block for m in back.modules() if isinstance(m, QuantizedLinear)} == {4}
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, atol=0, rtol=0)
    # a plan written before QuantConfig.compute existed replays with float activations
    from torchslim._modelinfo import model_info

    plan = dict(model_info(model).plans[-1])
    plan["config"] = {k: v for k, v in plan["config"].items() if k != "compute"}
    fresh = ts.create_model("zoo:lenet300")
    replay_quantize(fresh, plan)
    assert {m.act_block for m in fresh.modules() if isinstance(m, QuantizedLinear)} == {0}


def test_float_compute_and_bad_values() -> None:
    model = ts.create_model("zoo:lenet300")
    quantize_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=4, compute="float"))
    assert {m.act_block for m in model.modules() if isinstance(m, QuantizedLinear)} == {0}
    with pytest.raises(ConfigError, match="compute must be one of"):
        QuantConfig(mode="weight-only", granularity="group", compute="int4")
    with pytest.raises(ConfigError, match="needs mode='weight-only' and granularity='group'"):
        QuantConfig(mode="static", compute="int8")
    per_channel = ts.create_model("zoo:lenet300")
    quantize_(per_channel, QuantConfig(mode="weight-only", bits=8))  # auto: per-channel weights keep float inputs
    assert {m.act_block for m in per_channel.modules() if isinstance(m, QuantizedLinear)} == {0}
