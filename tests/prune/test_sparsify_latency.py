"""``sparsify_(target=Budget(latency=...))``: sparsity searched on measured latency where a sparse
kernel runs (CSR nn.Linear in eager PyTorch), refused elsewhere with the model unchanged (#24)."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.graph.state import state_digest
from torchslim.prune import to_csr_inference
from torchslim.prune.masks import finalize_


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))


def test_latency_budget_in_eager_is_met_within_5_percent_or_refused_with_the_model_unchanged(cache) -> None:
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet300")
    before = state_digest(model)
    budget = ts.Budget(latency=0.7, runtime="eager", threads=1, batch=32)
    try:
        plan = ts.sparsify_(model, target=budget)
    except ConfigError as exc:  # a loaded machine may move every trial out of the band: then nothing changed
        assert "\n" not in str(exc) and "closest" in str(exc)
        assert state_digest(model) == before
        return
    lat = plan.latency
    assert abs(lat["latency"] - 0.7) <= 0.05 * 0.7
    assert lat["runtime"] == "eager" and lat["batch"] == 32 and len(lat["trials"]) <= 8
    assert plan.sparsity == pytest.approx(lat["sparsity"]) and plan.overall == pytest.approx(lat["sparsity"], abs=0.01)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(lat["csr_layers"]) <= linears
    for name in lat["csr_layers"]:  # a layer runs CSR only where that was measured faster
        assert lat["layers"][name]["csr_ms"] < lat["layers"][name]["dense_ms"]
    # the deployment the plan names computes what the masked model computes
    x = torch.randn(4, *ts.example_inputs(model)[0].shape[1:])
    with torch.no_grad():
        want = model.eval()(x)
    finalize_(model)
    fast = to_csr_inference(model, layers=lat["csr_layers"])
    with torch.no_grad():
        assert torch.allclose(fast(x), want, atol=1e-5)


@pytest.mark.parametrize("runtime", ["onnxruntime", "compile", "xnnpack"])
def test_runtimes_without_a_sparse_kernel_are_refused_before_any_work(runtime: str) -> None:
    model = ts.create_model("zoo:lenet300")
    before = state_digest(model)
    with pytest.raises(ConfigError, match=f"cannot meet a latency budget in {runtime}.*prune_channels_") as info:
        ts.sparsify_(model, target=ts.Budget(latency=0.5, runtime=runtime))
    assert "\n" not in str(info.value)
    assert state_digest(model) == before


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"sparsity": 0.5, "target": ts.Budget(latency=0.5)}, "not both"),
    ({"pattern": "2:4", "target": ts.Budget(latency=0.5)}, "unstructured"),
    ({"target": ts.Budget(macs=0.5)}, "latency Budget only"),
    ({"target": {"latency": 0.5, "runtime": "nosuch"}}, "runtime must be one of"),
])
def test_bad_latency_targets_are_one_line_errors(kwargs, needle: str) -> None:
    model = ts.create_model("zoo:lenet300")
    before = state_digest(model)
    with pytest.raises(ConfigError, match=needle):
        ts.sparsify_(model, **kwargs)
    assert state_digest(model) == before


def test_a_model_without_linear_layers_is_refused(cache) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    ts.set_example_inputs(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="no nn.Linear"):
        ts.sparsify_(model, target=ts.Budget(latency=0.5, runtime="eager"))
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_to_csr_inference_converts_exactly_the_named_layers_and_refuses_unknown_names() -> None:
    model = ts.create_model("zoo:lenet300")
    ts.sparsify_(model, 0.9)
    finalize_(model)
    fast = to_csr_inference(model, layers=["fc2"])
    assert type(fast.fc2).__name__ == "CSRLinear" and type(fast.fc1) is torch.nn.Linear
    with pytest.raises(ConfigError, match="nosuch is no nn.Linear"):
        to_csr_inference(model, layers=["nosuch"])
