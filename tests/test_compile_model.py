"""``torchslim._compile.compile_model``: one compile path, family compilers found in the registry."""

from __future__ import annotations

import copy

import pytest
import torch

import torchslim as ts
from torchslim._compile import compile_model, compiler_for
from torchslim._registry import lookup

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = ts.create_model("zoo:conv2").eval()
    shape = ts.example_inputs(model)[0].shape[1:]
    calib = [torch.randn(8, *shape) for _ in range(4)]
    q = copy.deepcopy(model)
    ts.quantize_(q, ts.QuantConfig(mode="static"), calibration=calib)
    return model, q.eval()


def test_static_int8_goes_to_the_int8_compiler_and_float_to_plain_inductor(pair):
    model, q = pair
    assert compiler_for(model) is None
    assert compiler_for(q) == "int8"
    assert lookup("compiler", "int8").family == "quantize"


def test_compiled_int8_runs_at_two_batch_sizes_and_matches_eager(pair):
    _, q = pair
    run = compile_model(q)
    for b in (1, 5):  # a second shape compiles again (static shapes): it used to fail on symbolic sizes
        x = torch.randn(b, *ts.example_inputs(q)[0].shape[1:])
        with torch.no_grad():
            want = q(x)
        got = run(x)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=0.1 * want.abs().max().item() + 1e-3)
        assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.8


def test_bench_compile_row_of_an_int8_model_names_the_int8_kernels(pair):
    from torchslim.export.bench import bench

    _, q = pair
    result = bench(q, ts.example_inputs(q)[0][:1], runtimes=["eager", "compile"], runs=3, warmup=1, threads=1)
    row = next(r for r in result.rows if r.runtime == "compile")
    assert row.status == "ok", row.reason
    assert row.info.get("kernels") == "int8"


def test_new_shapes_compile_past_dynamos_recompile_limit() -> None:
    """Past ``recompile_limit`` versions of one forward dynamo silently runs it eagerly; the callable
    compile_model returns compiles each new shape with the limit lifted (and leaves the limit as it was)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    run = compile_model(model)
    with torch._dynamo.config.patch(recompile_limit=1):
        before = counters["stats"]["unique_graphs"]
        for b in (1, 2, 3):
            with torch.no_grad():
                assert torch.allclose(run(torch.ones(b, 8)), model(torch.ones(b, 8)))
        assert counters["stats"]["unique_graphs"] - before == 3  # every shape compiled, none ran eagerly
        assert torch._dynamo.config.recompile_limit == 1
