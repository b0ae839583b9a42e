"""Integer kernels of QuantizedLinear: chosen by scheme / dtype / shape, equal to the reference
path within a stated tolerance, never in the state dict, rebuilt when the buffers change.

Tolerances (relative to the largest output of the reference path):

* dynamic int8 (``quantized::linear_dynamic``, float32): 1e-4 -- the same integer products as
  the reference's fake-quantized activations; what is left is float summation order (a rounding
  tie of one activation may land on the other integer: one step of one product);
* ``int8_float_mm`` (float32): 1e-5 -- the same dequantized products, the scale applied after;
* ``int8pack`` / ``int4pack`` / ``int8_float_mm`` (bfloat16): 2e-2 -- both paths compute in bfloat16 (8-bit
  mantissa, relative step 2**-8), in another order and with the scales rounded to bfloat16;
* ``unpacked_int4``: 0 -- the reference's own arithmetic on cached unpacked integers.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch

import torchslim as ts
from torchslim.profile.api import serialized_bytes
from torchslim.quantize import QuantConfig, QuantizedLinear, kernels, quantize_
from torchslim.quantize.kernels import choose_kernel, reference_kernels
from torchslim.quantize.primitives import QScheme

TOL = {"fbgemm_dynamic": 1e-4, "int8_float_mm": 1e-5, "int8pack": 2e-2, "int4pack": 2e-2, "unpacked_int4": 0.0}

INT8 = QScheme(bits=8, granularity="channel")
INT8_ASYM = QScheme(bits=8, symmetric=False, signed=False, granularity="channel")
INT8_TENSOR = QScheme(bits=8, granularity="tensor")
INT4 = QScheme(bits=4, granularity="group", group_size=32)
INT4_ASYM = QScheme(bits=4, symmetric=False, signed=False, granularity="group", group_size=32)
INT4_SIGNED_ASYM = QScheme(bits=4, symmetric=False, signed=True, granularity="group", group_size=32)


def _layer(scheme: QScheme, dynamic: bool, k: int = 96, n: int = 48, bias: bool = True, dtype=torch.float32) -> QuantizedLinear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=bias)
    return QuantizedLinear.from_float(lin, scheme, dynamic_act=dynamic).to(dtype)


def _need(kernel: str) -> None:
    if kernel != "reference" and not kernels._has(kernel):
        pytest.skip(f"{kernel} is not available (or not exact) in this torch build")


CASES = [  # scheme, dynamic, input dtype, expected kernel
    (INT8, True, torch.float32, "fbgemm_dynamic"),
    (INT8_ASYM, True, torch.float32, "fbgemm_dynamic"),
    (INT8_TENSOR, True, torch.float32, "fbgemm_dynamic"),
    (INT8, False, torch.float32, "int8_float_mm"),
    (INT8_TENSOR, False, torch.float32, "int8_float_mm"),
    (INT8, False, torch.bfloat16, "int8pack"),
    (INT8_TENSOR, False, torch.bfloat16, "int8pack"),
    (INT4, False, torch.bfloat16, "int4pack"),
    (INT4_ASYM, False, torch.bfloat16, "int4pack"),
    (INT4_SIGNED_ASYM, False, torch.bfloat16, "int4pack"),
    (INT4, False, torch.float32, "unpacked_int4"),
    (INT4_ASYM, False, torch.float32, "unpacked_int4"),
    (QScheme(bits=3, symmetric=False, signed=False, granularity="channel"), False, torch.float32, "unpacked_int4"),
    (QScheme(bits=4, granularity="tensor"), False, torch.float16, "unpacked_int4"),
]


@pytest.mark.parametrize(("scheme", "dynamic", "dtype", "expected"), CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 96), (2, 7, 96), (1, 96)])
def test_kernel_matches_reference(scheme, dynamic, dtype, expected, bias, shape) -> None:
    _need(expected)
    q = _layer(scheme, dynamic, bias=bias, dtype=dtype)
    torch.manual_seed(1)
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        assert choose_kernel(q, x) == expected
        got = q(x)
        ref = q.reference_forward(x)
    assert got.shape == ref.shape == (*shape[:-1], 48)
    assert got.dtype == ref.dtype == dtype
    err = float((got.float() - ref.float()).abs().max())
    assert err <= TOL[expected] * float(ref.float().abs().max()), (expected, err)
    with reference_kernels(), torch.no_grad():
        assert torch.equal(q(x), ref)  # forcing gives the reference itself


@pytest.mark.parametrize(
    ("scheme", "dynamic", "dtype", "k", "n", "expected", "why"),
    [
        (INT8, False, torch.bfloat16, 100, 48, "int8_float_mm", "int8pack needs in_features % 16 == 0"),
        (INT8_ASYM, False, torch.float32, 96, 48, "reference", "asymmetric weight-only int8"),
        (INT8_ASYM, False, torch.bfloat16, 96, 48, "reference", "asymmetric weight-only int8"),
        (QScheme(bits=8, granularity="group", group_size=32), True, torch.float32, 96, 48, "reference", "dynamic with groups"),
        (INT8, True, torch.bfloat16, 96, 48, "reference", "dynamic with bfloat16 inputs"),
    ],
)
def test_shapes_and_schemes_the_kernels_do_not_take(scheme, dynamic, dtype, k, n, expected, why) -> None:
    q = _layer(scheme, dynamic, k=k, n=n, dtype=dtype)
    x = torch.randn(3, k).to(dtype)
    with torch.no_grad():
        assert choose_kernel(q, x) == expected, why
        got, ref = q(x), q.reference_forward(x)
    if expected == "reference":
        assert torch.equal(got, ref)
    else:  # int8_float_mm in bfloat16
        assert float((got.float() - ref.float()).abs().max()) <= 2e-2 * float(ref.float().abs().max())


@pytest.mark.parametrize(
    ("scheme", "k", "n"), [(INT4, 96, 24), (QScheme(bits=4, granularity="group", group_size=16), 96, 48)]
)
def test_int4_shapes_int4pack_does_not_take_run_unpacked_and_exact(scheme, k, n) -> None:
    q = _layer(scheme, False, k=k, n=n, dtype=torch.bfloat16)  # int4pack: out % 16, groups 32..256
    x = torch.randn(3, k, dtype=torch.bfloat16)
    with torch.no_grad():
        assert choose_kernel(q, x) == "unpacked_int4"
        assert torch.equal(q(x), q.reference_forward(x))


def test_bfloat16_rows_beyond_the_packed_kernels_limit_cast_the_weight() -> None:
    q8 = _layer(INT8, False, dtype=torch.bfloat16)
    q4 = _layer(INT4, False, dtype=torch.bfloat16)
    with torch.no_grad():
        for q, small, large, limit in ((q8, "int8pack", "int8_float_mm", kernels.INT8PACK_MAX_ROWS),
                                       (q4, "int4pack", "unpacked_int4", kernels.INT4PACK_MAX_ROWS)):
            _need(small)
            assert choose_kernel(q, torch.randn(limit, 96, dtype=torch.bfloat16)) == small
            x = torch.randn(limit + 1, 96, dtype=torch.bfloat16)
            assert choose_kernel(q, x) == large
            ref = q.reference_forward(x).float()
            assert float((q(x).float() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
            q(torch.randn(2, 96, dtype=torch.bfloat16))  # both layouts stay cached side by side
            assert set(q.__dict__["_kernel_cache"]) == {small, large}


def test_other_devices_empty_and_1d_inputs_use_the_reference() -> None:
    q = _layer(INT8, True)
    with torch.no_grad():
        assert choose_kernel(q, torch.randn(3, 96, device="meta")) == "reference"
        assert choose_kernel(q, torch.randn(0, 96)) == "reference"
        assert q(torch.randn(0, 96)).shape == (0, 48)
        v = torch.randn(96)
        assert choose_kernel(q, v) == "reference"
        assert torch.equal(q(v), q.reference_forward(v))


def test_forcing_restores_on_exit_even_after_an_error() -> None:
    q = _layer(INT8, True)
    x = torch.randn(2, 96)
    before = choose_kernel(q, x)
    with pytest.raises(RuntimeError, match="boom"):
        with reference_kernels():
            assert choose_kernel(q, x) == "reference"
            raise RuntimeError("boom")
    assert choose_kernel(q, x) == before
    with reference_kernels():
        with reference_kernels(False):
            assert choose_kernel(q, x) == before
        assert choose_kernel(q, x) == "reference"


def test_gradients_input_takes_the_reference_bias_gets_its_gradient() -> None:
    _need("fbgemm_dynamic")
    q = _layer(INT8, True)
    x = torch.randn(4, 96, requires_grad=True)
    assert choose_kernel(q, x) == "reference"  # straight-through gradient for the input
    q(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    q.bias.grad = None
    x2 = torch.randn(4, 96)
    assert choose_kernel(q, x2) == "fbgemm_dynamic"
    q(x2).pow(2).sum().backward()
    kernel_grad = q.bias.grad.clone()
    q.bias.grad = None
    q.reference_forward(x2).pow(2).sum().backward()
    assert torch.allclose(kernel_grad, q.bias.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("scheme", "dynamic", "dtype", "expected"), [CASES[0], CASES[3], CASES[5], CASES[8]])
def test_layouts_stay_out_of_the_state_dict_and_follow_the_buffers(scheme, dynamic, dtype, expected) -> None:
    _need(expected)
    q = _layer(scheme, dynamic, dtype=dtype)
    keys, size = set(q.state_dict()), serialized_bytes(q)
    x = torch.randn(3, 96).to(dtype)
    with torch.no_grad():
        q(x)
        assert set(q.state_dict()) == keys == {"qweight", "scale", "zero_point", "bias"}
        assert serialized_bytes(q) == size
        # load other weights in place: the kernel must see them, not its cached layout
        other = _layer(scheme, dynamic, dtype=dtype)
        with torch.no_grad():
            other.qweight.copy_(other.qweight.flip(0))
            other.bias.mul_(3)
        q.load_state_dict(other.state_dict())
        assert choose_kernel(q, x) == expected
        err = float((q(x).float() - other.reference_forward(x).float()).abs().max())
        assert err <= TOL[expected] * float(other.reference_forward(x).float().abs().max())
        q.bias.add_(1.0)  # an in-place edit (as bias correction does)
        err = float((q(x).float() - q.reference_forward(x).float()).abs().max())
        assert err <= TOL[expected] * float(q.reference_forward(x).float().abs().max())


def test_copies_and_pickles_run_after_a_kernel_call() -> None:
    _need("fbgemm_dynamic")
    q = _layer(INT8, True)
    x = torch.randn(3, 96)
    with torch.no_grad():
        y = q(x)
        assert torch.equal(copy.deepcopy(q)(x), y)
        assert torch.equal(pickle.loads(pickle.dumps(q))(x), y)


def test_dtype_cast_keeps_the_stored_fp16_scales() -> None:
    q = _layer(INT4_ASYM, False)
    scale, zp = q.scale.clone(), q.zero_point.clone()
    q.to(torch.bfloat16)
    assert q.scale.dtype == q.zero_point.dtype == torch.float16
    assert torch.equal(q.scale, scale) and torch.equal(q.zero_point, zp)
    assert q.bias.dtype == torch.bfloat16
    q.float()
    assert q.scale.dtype == torch.float16 and q.bias.dtype == torch.float32


def test_dynamic_model_save_load_runs_kernels_with_the_same_outputs(tmp_path) -> None:
    _need("fbgemm_dynamic")
    model = ts.create_model("zoo:lenet300").eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        y_fp32 = model(x)
    quantize_(model, QuantConfig(mode="dynamic"))
    with torch.no_grad():
        y = model(x)
        with reference_kernels():
            y_ref = model(x)
    assert float((y - y_ref).abs().max()) <= 1e-4 * float(y_ref.abs().max())
    assert float((y - y_fp32).abs().max()) <= 0.05 * float(y_fp32.abs().max())
    ts.save(model, tmp_path / "m")
    back = ts.load(tmp_path / "m").eval()
    layers = [m for m in back.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.qweight.dtype == torch.int8 for m in layers)
    with torch.no_grad():
        assert all(choose_kernel(m, torch.randn(2, m.in_features)) == "fbgemm_dynamic" for m in layers)
        assert torch.equal(back(x), y)


def test_profile_and_export_see_the_reference_ops() -> None:
    model = ts.create_model("zoo:lenet300").eval()
    quantize_(model, QuantConfig(mode="dynamic"))
    p = ts.profile(model, latency=False)
    with reference_kernels():
        r = ts.profile(model, latency=False)
    assert p.macs == r.macs > 0 and not p.unsupported_ops
    assert p.size_bytes == r.size_bytes == serialized_bytes(model)
    q = _layer(INT8, True)
    x = torch.randn(3, 96)
    ep = torch.export.export(q, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("quantized" in t or "int8pack" in t for t in targets), targets
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), q.reference_forward(x))


def test_environment_forces_the_reference_path() -> None:
    code = (
        "import torch; from torchslim.quantize.kernels import choose_kernel, kernels_forced_off;"
        "from torchslim.quantize import QuantizedLinear; from torchslim.quantize.primitives import QScheme;"
        "q = QuantizedLinear.from_float(torch.nn.Linear(32, 16), QScheme(bits=8, granularity='channel'), dynamic_act=True);"
        "print(kernels_forced_off(), choose_kernel(q, torch.randn(2, 32)))"
    )
    env = {**os.environ, "TORCHSLIM_QUANT_KERNELS": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == ["True", "reference"]


def test_a_kernel_that_cannot_take_the_weights_falls_back_with_a_warning(monkeypatch) -> None:
    _need("fbgemm_dynamic")
    q = _layer(INT8, True)
    x = torch.randn(3, 96)

    def refuse(*args, **kwargs):
        raise RuntimeError("no packing for this engine")

    monkeypatch.setattr(kernels, "_build", refuse)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="fbgemm_dynamic could not prepare"):
        y = q(x)
    with torch.no_grad():
        assert torch.equal(y, q.reference_forward(x))
        assert choose_kernel(q, x) == "reference"  # decided once, no warning per call
