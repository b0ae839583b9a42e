"""Applying one method after another: a layer a verb cannot take is refused up front.

Each in-place verb checks, before it changes anything, that the layers it selected are ones it
can take (``torchslim._modelinfo.refuse_applied``: the layer's class, the parametrizations on
its weight and the model's record of plans). A refusal is one ``ConfigError`` line naming the
verb, the layer, what was applied to it and by which verb, and what to do instead; the model is
exactly as before (state dict, Parameter objects, buffers, plain attributes, hooks, record) and
still runs. Orders that compose keep working.

The pairs below were found by applying every verb after every other on ``zoo:lenet5``; the
refused ones raised a raw ``TypeError`` (binarize_ on a masked, fake-quantized or clustered
layer), a raw ``RuntimeError`` (a mask on a clustered weight) or silently dropped what the first
verb did (factorize_ or quantize_ replacing a binary or fake-quantized layer by a float one).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchslim as ts
from torchslim._modelinfo import applied_to, model_info
from torchslim._utils import evaluating
from torchslim.errors import ConfigError


@pytest.fixture(scope="module")
def data():
    return ts.load_data("mnist")


def _lenet() -> torch.nn.Module:
    return ts.create_model("zoo:lenet5", data="mnist", seed=0)


# the verbs, small and quick: name -> apply(model, data)
VERBS: dict[str, Callable[[torch.nn.Module, Any], Any]] = {
    "sparsify": lambda m, d: ts.sparsify_(m, sparsity=0.5),
    "finalize": lambda m, d: (ts.sparsify_(m, sparsity=0.5), ts.finalize_(m)),
    "wanda": lambda m, d: ts.wanda_(m, 0.5, data=d, calibration_batches=2),
    "sparsegpt": lambda m, d: ts.sparsegpt_(m, 0.5, data=d, calibration_batches=2),
    "prune": lambda m, d: ts.prune_channels_(m, ratio=0.5),
    "factorize": lambda m, d: ts.factorize_(m, method="svd", rank=0.5),
    "static": lambda m, d: ts.quantize_(m, mode="static", calibration_batches=2, data=d),
    "qat": lambda m, d: ts.quantize_(m, mode="qat", calibration_batches=2, data=d),
    "dynamic": lambda m, d: ts.quantize_(m, mode="dynamic"),
    "weight-only": lambda m, d: ts.quantize_(m, mode="weight-only", bits=4, granularity="group", group_size=4),
    "gptq": lambda m, d: ts.gptq_(m, ts.QuantConfig(mode="weight-only", bits=4, calibration_batches=2), data=d),
    "binarize": lambda m, d: ts.binarize_(m, method="xnor"),
    "cluster": lambda m, d: ts.cluster_(m, bits=4),
}

# (first, then, what the refusal says): each crashed or silently undid the first verb before
REFUSED = [
    ("sparsify", "binarize", r"^binarize_ cannot take 'features\.3' \(and 2 more: 'classifier\.0', 'classifier\.2'\): "
     r"it was masked by sparsify_ \(a reversible WeightMask on its weight\); make it permanent first with "
     r"ts\.finalize_\(model\), or apply binarize_ before sparsify_$"),
    ("wanda", "binarize", r"binarize_ cannot take 'classifier\.0'.*masked by sparsify_"),
    ("sparsegpt", "binarize", r"binarize_ cannot take 'classifier\.0'.*masked by sparsify_"),
    # static int8 layers are integer modules (Int8Conv / Int8Linear, int8 weights): the verbs that
    # select Conv/Linear layers find none left (as after dynamic / weight-only quantization)
    ("static", "binarize", r"^no layer to binarize \(the model has no Linear/Conv2d layer\)"),
    ("qat", "binarize", r"binarize_ cannot take 'features\.3'.*quantized by quantize_ \(qat"),
    ("cluster", "binarize", r"binarize_ cannot take 'features\.3'.*clustered by cluster_ \(SharedWeight on its weight\); "
     r"make it permanent first with ts\.finalize_\(model\), or apply binarize_ before cluster_"),
    ("cluster", "sparsify", r"^sparsify_ cannot take 'features\.0' \(and 4 more: .*\): it was clustered by cluster_"),
    ("cluster", "sparsegpt", r"^sparsegpt_ cannot take 'classifier\.0'.*clustered by cluster_"),
    ("static", "factorize", r"^method 'svd' found no layer to factorize in LeNet5"),
    ("qat", "factorize", r"factorize_ cannot take 'features\.0'.*quantize_ \(qat"),
    ("binarize", "factorize", r"^factorize_ cannot take 'features\.3' .*binarized by binarize_ \(BinaryConv2d\); "
     r"apply factorize_ to the float model, before binarize_$"),
    ("binarize", "static", r"^quantize_ cannot take 'features\.3' .*binarized by binarize_ \(BinaryConv2d\); a layer is "
     r"binary or quantized, not both: leave those layers out with skip=\['features\.3', 'classifier\.0', 'classifier\.2'\]$"),
    ("binarize", "qat", r"quantize_ cannot take 'features\.3'.*binarized by binarize_"),
    ("binarize", "dynamic", r"quantize_ cannot take 'classifier\.0'.*BinaryLinear.*skip=\['classifier\.0', 'classifier\.2'\]"),
    ("binarize", "weight-only", r"quantize_ cannot take 'classifier\.0'.*binarized by binarize_"),
    ("binarize", "gptq", r"^gptq_ cannot take 'classifier\.0'.*binarized by binarize_"),
    ("static", "cluster", r"select no Linear/Conv/Embedding layer to cluster"),
    ("static", "sparsify", r"selects no Linear/Conv layer to prune"),
    ("static", "wanda", r"selects no nn\.Linear"),
]

# orders that compose, and keep working
COMPOSE = [
    ("sparsify", "static"), ("sparsify", "qat"), ("sparsify", "factorize"), ("sparsify", "cluster"),
    ("sparsify", "prune"), ("sparsify", "dynamic"), ("finalize", "binarize"), ("factorize", "static"),
    ("factorize", "binarize"), ("prune", "binarize"), ("prune", "static"), ("binarize", "sparsify"),
    ("binarize", "prune"), ("binarize", "cluster"), ("cluster", "static"), ("cluster", "dynamic"),
    ("qat", "sparsify"), ("qat", "prune"), ("gptq", "cluster"),
]


def _snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a refused call must leave as it was."""
    def plain(m: torch.nn.Module) -> dict[str, Any]:
        out = {}
        for k, v in vars(m).items():
            if k in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(v, torch.Tensor):
                out[k] = ("tensor", v.detach().clone())
            elif isinstance(v, dict):  # hooks and the like: which, not their internals
                out[k] = ("dict", list(v))
            else:
                out[k] = ("repr", repr(v))
        return out

    info = model_info(model)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": {n: (id(p), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modules": {n: (type(m), plain(m)) for n, m in model.named_modules()},
        "plans": copy.deepcopy(info.plans) if info is not None else None,
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _out(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 28, 28)
    with evaluating(model), torch.no_grad():  # every module's own mode restored after
        return model(x)


@pytest.mark.parametrize(("first", "then", "message"), REFUSED, ids=[f"{a}-then-{b}" for a, b, _ in REFUSED])
def test_a_layer_the_verb_cannot_take_is_refused_and_the_model_is_untouched(data, first, then, message) -> None:
    model = _lenet()
    VERBS[first](model, data)
    y = _out(model)  # first: a forward may fill caches (binary layers keep their packed weights)
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=message) as err:
        VERBS[then](model, data)
    assert "\n" not in str(err.value)
    after = _snapshot(model)
    for part in before:
        assert _same(before[part], after[part]), f"{part} changed by the refused call"
    assert torch.equal(_out(model), y)  # still runs, same outputs


@pytest.mark.parametrize(("first", "then"), COMPOSE, ids=[f"{a}-then-{b}" for a, b in COMPOSE])
def test_orders_that_compose_keep_working(data, first, then) -> None:
    model = _lenet()
    VERBS[first](model, data)
    VERBS[then](model, data)
    assert torch.isfinite(_out(model)).all()


def test_the_advice_of_a_refusal_works(data) -> None:
    """finalize_ first (masks, clusters), or skip= the binary layers: then the second verb runs."""
    model = _lenet()
    ts.sparsify_(model, sparsity=0.5)
    ts.finalize_(model)
    assert ts.binarize_(model).layers == ["features.3", "classifier.0", "classifier.2"]

    model = _lenet()
    ts.cluster_(model, bits=4)
    ts.finalize_(model)
    ts.sparsify_(model, sparsity=0.5)

    model = _lenet()
    ts.binarize_(model)
    plan = ts.quantize_(model, mode="static", calibration_batches=2, data=data,
                        skip=["features.3", "classifier.0", "classifier.2"])
    assert plan.layers == ["features.0", "classifier.4"]


def test_the_readme_order_is_refused_at_binarize(data) -> None:
    """sparsify, finalize, factorize, quantize, then binarize (the order the README's tour had)."""
    model = _lenet()
    ts.sparsify_(model, sparsity=0.9, scope="global")
    ts.finalize_(model)
    ts.factorize_(model, ts.FactorizeConfig(method="tucker", rank="vbmf"))
    ts.quantize_(model, ts.QuantConfig(mode="static", observer="mse", calibration_batches=2), data=data)
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=r"^no layer to binarize"):  # every layer is an int8 module now
        ts.binarize_(model, ts.BinarizeConfig(method="xnor"))
    assert _same(before, _snapshot(model))


def test_channel_pruning_of_a_static_int8_model_is_refused_naming_the_layer(data) -> None:
    """Integer weights are not pruned, sparsified, factorized or clustered: each verb names the
    int8 layers and the order that works, and leaves the model as it was."""
    from torchslim.pack import cluster_

    model = _lenet()
    VERBS["static"](model, data)
    y = _out(model)
    before = _snapshot(model)
    named = r"features\.0 \(Int8Conv\), features\.3 \(Int8Conv\), classifier\.0 \(Int8Linear\) and 2 more hold integer weights"
    with pytest.raises(ConfigError, match=r"prune_channels_ cannot take this model: " + named + r".*before quantize_"):
        ts.prune_channels_(model, ratio=0.5)
    for verb, call in [("sparsify_", lambda: ts.sparsify_(model, sparsity=0.5)),
                       ("factorize_", lambda: ts.factorize_(model, rank=2)),
                       ("cluster_", lambda: cluster_(model))]:
        with pytest.raises(ConfigError, match=named + f".*apply {verb} to the float model, before quantize_"):
            call()
    assert _same(before, _snapshot(model)) and torch.equal(_out(model), y)


def test_applied_to_reads_the_layer_and_the_record(data) -> None:
    model = _lenet()
    assert applied_to(model, "features.0") == []
    ts.gptq_(model, ts.QuantConfig(mode="weight-only", bits=4, calibration_batches=2), data=data)
    (a,) = applied_to(model, "classifier.0")
    assert (a.verb, a.family, a.what, a.past) == ("gptq_", "quantize", "weight-only, QuantizedLinear", "quantized")
    ts.sparsify_(model, sparsity=0.5)
    assert [x.verb for x in applied_to(model, "features.3")] == ["sparsify_"]
    ts.finalize_(model)
    assert applied_to(model, "features.3") == []  # permanent now: a plain layer


def test_finalizing_a_deep_copy_leaves_the_original_masked() -> None:
    """A deep copy of a parametrized module shares its class: finalize_ must not strip the original's weight."""
    model = _lenet()
    ts.sparsify_(model, sparsity=0.5)
    y = _out(model)
    twin = copy.deepcopy(model)
    ts.finalize_(twin)
    assert torch.equal(_out(twin), y)
    assert torch.equal(_out(model), y)  # before the fix: AttributeError, no attribute 'weight'
    assert ts.prune.masked_weights(model)
