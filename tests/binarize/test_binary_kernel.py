"""The XNOR-popcount kernel computes exactly what the float simulation computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchslim as ts
from torchslim.binarize import BinarizeConfig, binarize_, binary_layers, set_backend_
from torchslim.binarize.kernel import binary_conv2d, binary_linear, c_kernel_status, popcount, xnor_matmul
from torchslim.binarize.layers import sign
from torchslim.binarize.packing import pack_signs
from torchslim.errors import ConfigError

_C = c_kernel_status()["available"]
BACKENDS = ["torch", pytest.param("c", marks=pytest.mark.skipif(not _C, reason="no C compiler here"))]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pm1(*shape: int) -> torch.Tensor:
    return torch.randint(0, 2, shape).float() * 2 - 1


def test_popcount_matches_python():
    vals = [0, 1, -1, 2**63 - 1, -(2**63), 0x0F0F, 12345678901234, -987654321]
    x = torch.tensor(vals, dtype=torch.int64)
    assert popcount(x.clone()).tolist() == [bin(v & (2**64 - 1)).count("1") for v in vals]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("word_bits", [32, 64])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 5, 7), (17, 9, 64), (8, 33, 65), (40, 3, 257), (5, 70, 1000)])
def test_xnor_matmul_equals_float_matmul_exactly(backend, word_bits, m, n, k):
    a, b = _pm1(m, k), _pm1(n, k)
    out = xnor_matmul(pack_signs(a, word_bits), pack_signs(b, word_bits), k, backend=backend)
    assert out.dtype == torch.int32
    assert torch.equal(out.float(), a @ b.T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_leaves_out_zero_entries(backend):
    a, b = _pm1(6, 100), _pm1(4, 100)
    valid = torch.rand(6, 100) > 0.3
    ref = (a * valid) @ b.T  # masked entries are real zeros
    out = xnor_matmul(pack_signs(a, 64), pack_signs(b, 64), 100, mask=pack_signs(valid.float() - 0.5, 64), backend=backend)
    assert torch.equal(out.float(), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_linear_equals_float(backend):
    x, w = torch.randn(2, 7, 130), _pm1(20, 130)
    assert torch.equal(binary_linear(x, pack_signs(w), 130, backend=backend), F.linear(sign(x), w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cin,cout,k,stride,pad,dil,groups",
    [(3, 8, 3, 1, 1, 1, 1), (4, 6, 5, 2, 2, 1, 2), (8, 8, 3, 1, 0, 2, 1), (3, 5, 1, 1, 0, 1, 1), (16, 16, 3, 2, 1, 1, 4), (2, 4, 3, 1, 3, 2, 1)],
)
def test_binary_conv2d_equals_float_conv_exactly(backend, cin, cout, k, stride, pad, dil, groups):
    x, w = torch.randn(2, cin, 11, 9), _pm1(cout, cin // groups, k, k)
    ref = F.conv2d(sign(x), w, None, stride, pad, dil, groups)  # zero padding: real zeros, not ±1
    out = binary_conv2d(
        x, pack_signs(w.reshape(cout, -1), 32), w.shape, stride=stride, padding=pad, dilation=dil, groups=groups, backend=backend
    )
    assert out.shape == ref.shape and out.is_contiguous()
    assert torch.equal(out, ref)


def test_bad_kernel_input_raises_config_error():
    a = pack_signs(_pm1(3, 100), 64)
    with pytest.raises(ConfigError, match="words per row"):
        xnor_matmul(a, a, 200)
    with pytest.raises(ConfigError, match="one dtype"):
        xnor_matmul(a, pack_signs(_pm1(3, 100), 32), 100)
    with pytest.raises(ConfigError, match="backend"):
        xnor_matmul(a, a, 100, backend="gpu")
    with pytest.raises(ConfigError, match="channels"):
        binary_conv2d(torch.randn(1, 3, 5, 5), pack_signs(_pm1(2, 18)), (2, 2, 3, 3))


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("method", ["bnn", "xnor", "bireal"])
@pytest.mark.parametrize("spec,shape", [("zoo:lenet5", (3, 1, 28, 28)), ("zoo:resnet20", (2, 3, 16, 16))])
def test_models_on_the_kernel_give_identical_outputs(backend, method, spec, shape):
    model = ts.create_model(spec)
    binarize_(model, BinarizeConfig(method=method, scale_activations=method == "xnor"))
    model.eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
        assert set_backend_(model, backend) == len(binary_layers(model))
        out = model(x)
    assert torch.equal(out, ref)


def test_kernel_is_not_used_in_training():
    model = ts.create_model("zoo:lenet300")
    binarize_(model, BinarizeConfig(method="bnn"))
    set_backend_(model, "torch")
    out = model(torch.randn(4, 1, 28, 28))
    out.sum().backward()  # the float path keeps gradients
    assert model.fc2.weight.grad is not None and model.fc2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 63, 64, 65, 300])
def test_pack_rows_equals_pack_signs(backend, k):
    from torchslim.binarize.kernel import pack_rows

    x = torch.randn(7, k)
    x[0, 0] = 0.0
    x[1, -1] = -0.0  # both pack as +1
    assert torch.equal(pack_rows(x, backend), pack_signs(x, 64))


@pytest.mark.parametrize("spec,shape", [("zoo:lenet5", (3, 1, 28, 28)), ("zoo:resnet20", (2, 3, 16, 16))])
def test_fastest_route_gives_identical_outputs_and_records_a_route_per_shape(spec, shape):
    model = ts.create_model(spec)
    binarize_(model, BinarizeConfig(method="xnor"))
    model.eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref, ref1 = model(x), model(x[:1])
        set_backend_(model, "fastest")
        assert torch.equal(model(x), ref)  # the measuring call
        assert torch.equal(model(x), ref)  # the chosen routes
        assert torch.equal(model(x[:1]), ref1)  # a new shape is measured again
    for layer in binary_layers(model).values():
        assert len(layer.routes) == 2 and set(layer.routes.values()) <= {"packed", "float"}
    set_backend_(model, "fastest")
    assert all(not layer.routes for layer in binary_layers(model).values())


@pytest.mark.parametrize("slow", ["packed", "float"])
def test_fastest_route_keeps_the_faster_one(monkeypatch, slow):
    import time

    from torchslim.binarize import BinaryLinear

    layer = BinaryLinear.from_float(torch.nn.Linear(64, 8), "bnn").eval()
    set_backend_(layer, "fastest")
    calls = {"packed": 0, "float": 0}
    kernel_op, float_product = layer._kernel_op, layer._float_product

    def timed(name, fn):
        def run(*args):
            calls[name] += 1
            if name == slow:
                time.sleep(0.01)
            return fn(*args)

        return run

    monkeypatch.setattr(layer, "_kernel_op", timed("packed", kernel_op))
    monkeypatch.setattr(layer, "_float_product", timed("float", float_product))
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = F.linear(sign(x), sign(layer.weight)) * 64**-0.5 + layer.bias
        assert torch.allclose(layer(x), ref, atol=1e-6)
        assert list(layer.routes.values()) == ["float" if slow == "packed" else "packed"]
        before = dict(calls)
        layer(x)
    fast = "float" if slow == "packed" else "packed"
    assert calls[fast] == before[fast] + 1 and calls[slow] == before[slow]  # only the faster route runs now
