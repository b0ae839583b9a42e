"""Parity machinery, and parity of compressed models (pruned, sparse, factorized, binarized)."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

import torchslim as ts
from torchslim._registry import unregister
from torchslim.errors import ConfigError, TorchslimError
from torchslim.export import ExportError, Format, ParityError, Tolerance, export, register_format
from torchslim.export.parity import compare_outputs, random_inputs
from torchslim.export.torchscript import export_torchscript, load_torchscript
from torchslim.graph.inputs import Inputs

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


# ---------------------------------------------------------------------------- the machinery
def test_random_inputs_keep_dtypes_ranges_and_masks():
    ids = torch.tensor([[101, 7592, 2088, 102]])
    mask = torch.ones(1, 4, dtype=torch.int64)
    flags = torch.tensor([[True, False, True, True]])
    image = torch.randn(1, 3, 8, 8) * 5 + 2
    got = random_inputs(Inputs((image, ids), {"attention_mask": mask, "flags": flags}), batch=3, seed=1)
    x, r_ids = got.args
    assert x.dtype == torch.float32 and x.shape == (3, 3, 8, 8)
    assert abs(float(x.mean()) - 2) < 1.5 and 2 < float(x.std()) < 8
    assert r_ids.dtype == torch.int64 and r_ids.shape == (3, 4)
    assert int(r_ids.min()) >= 101 and int(r_ids.max()) <= 7592
    assert torch.equal(got.kwargs["attention_mask"], torch.ones(3, 4, dtype=torch.int64))
    assert torch.equal(got.kwargs["flags"], flags.expand(3, 4))
    again = random_inputs(Inputs((image, ids)), batch=3, seed=1)
    assert torch.equal(again.args[0], x)  # seeded


def test_compare_outputs_measures_and_flags():
    tol = Tolerance(1e-3, 0.0)
    ref = [torch.tensor([1.0, -4.0])]
    case = compare_outputs(ref, [torch.tensor([1.0005, -4.0])], tol, "c")
    assert case.ok and math.isclose(case.max_abs, 5e-4, rel_tol=1e-3) and math.isclose(case.max_rel, 5e-4 / 4, rel_tol=1e-3)
    assert not compare_outputs(ref, [torch.tensor([1.01, -4.0])], tol, "c").ok
    assert not compare_outputs(ref, [torch.zeros(3)], tol, "c").ok  # shape
    assert "outputs" in compare_outputs(ref, [], tol, "c").problem  # count
    nan = compare_outputs(ref, [torch.tensor([float("nan"), -4.0])], tol, "c")
    assert not nan.ok and "nan" in nan.problem


def test_tolerance_validates_and_round_trips():
    tol = Tolerance(1e-4, 1e-3)
    assert Tolerance.from_dict(json.loads(json.dumps(tol.to_dict()))) == tol
    assert Tolerance.coerce(0.5, (1, 1)) == Tolerance(0.5, 0.5)
    assert Tolerance.coerce(None, (1e-5, 2e-5)) == Tolerance(1e-5, 2e-5)
    for bad in (-1.0, float("nan"), "x"):
        with pytest.raises(ConfigError):
            Tolerance(bad, 0.0)
    with pytest.raises(ConfigError):
        Tolerance.coerce("loose", (1, 1))


@pytest.fixture
def broken_format():
    """A registered extension format whose runtime adds 1 to every output."""

    def load(path, device):
        inner = load_torchscript(path, device)
        return lambda inputs: [t + 1 for t in inner(inputs)]

    fmt = register_format(Format("broken-test", (".broken",), export_torchscript, load, (1e-5, 1e-5)))
    yield fmt
    unregister("export_format", fmt.name)


def test_parity_failure_raises_and_keeps_no_file(tmp_path, broken_format):
    model = ts.create_model("zoo:lenet300")
    with pytest.raises(ParityError) as err:
        export(model, path=tmp_path / "m.broken")
    assert isinstance(err.value, TorchslimError) and isinstance(err.value, ValueError)
    assert "broken-test export of" in str(err.value) and "no file was written" in str(err.value)
    assert err.value.report is not None and not err.value.report.ok
    assert math.isclose(err.value.report.max_abs, 1.0, rel_tol=1e-5)
    assert list(tmp_path.iterdir()) == []
    # not strict: the file is kept and the report says it does not match
    result = export(model, path=tmp_path / "m.broken", strict=False)
    assert result.path.is_file() and not result.parity.ok
    # a loose enough tolerance passes
    assert export(model, path=tmp_path / "m.broken", tolerance=(1.01, 0)).parity.ok


def test_register_format_refuses_a_taken_name(broken_format):
    import dataclasses

    with pytest.raises(ConfigError, match="already registered"):
        register_format(dataclasses.replace(broken_format, tolerance=(1.0, 1.0)))


# ---------------------------------------------------------------------------- compressed models
FORMATS = ("onnx", "torchscript", "pt2")
SUFFIX = {"onnx": "onnx", "torchscript": "pt", "pt2": "pt2"}


def _export_all(model, tmp_path, formats=FORMATS):
    results = {}
    for fmt in formats:
        results[fmt] = export(model, path=tmp_path / f"m.{SUFFIX[fmt]}", random_inputs=1)
        assert results[fmt].parity.ok, results[fmt].parity.summary()
    return results


def test_channel_pruned_model_exports_with_its_smaller_shapes(tmp_path):
    model = ts.create_model("zoo:resnet20")
    before = sum(p.numel() for p in model.parameters())
    ts.prune_channels_(model, ratio=0.5)
    assert sum(p.numel() for p in model.parameters()) < 0.5 * before
    results = _export_all(model, tmp_path, ("torchscript", "pt2"))
    loaded = torch.jit.load(str(results["torchscript"].path))
    state = dict(loaded.named_parameters())
    assert state["conv1.weight"].shape == model.conv1.weight.shape  # the pruned width, not the original


def test_finalized_sparse_model_exports_dense_weights_with_its_zeros(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = ts.create_model("zoo:lenet300")
    ts.sparsify_(model, 0.9)
    ts.finalize_(model)
    assert any("::" in k for k in model.state_dict())  # stored compressed in the state dict
    results = _export_all(model, tmp_path)
    proto = onnx.load(str(results["onnx"].path))
    weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.endswith("weight")}
    assert weights["fc1.weight"].shape == (300, 784)
    assert abs(float((weights["fc1.weight"] == 0).mean()) - 0.9) < 0.01


def test_factorized_model_exports(tmp_path):
    try:
        lowrank = importlib.import_module("torchslim.lowrank")
    except ImportError as exc:
        pytest.skip(f"torchslim.lowrank is not importable yet ({exc})")
    model = ts.create_model("zoo:conv4")
    lowrank.factorize_(model, lowrank.FactorizeConfig(method="svd", rank=0.25))
    assert any(type(m).__name__ == "Sequential" and hasattr(m, "reduce") for m in model.modules())
    _export_all(model, tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_binarized_model_exports(tmp_path, fmt):
    try:
        binarize = importlib.import_module("torchslim.binarize")
    except ImportError as exc:
        pytest.skip(f"torchslim.binarize is not importable yet ({exc})")
    model = ts.create_model("zoo:lenet5")
    binarize.binarize_(model)
    try:
        result = export(model, path=tmp_path / f"b.{SUFFIX[fmt]}", random_inputs=1)
    except ExportError as exc:
        # binarize's sign must use plain ops under no_grad: an autograd.Function cannot be traced
        pytest.fail(f"binarized model did not export to {fmt}: {exc}")
    assert result.parity.ok, result.parity.summary()
    if fmt == "onnx" and result.info.get("parity_retries"):
        # onnxscript's optimizer miscompiled the graph; the unoptimized export is the one kept
        assert result.info["optimized"] is False


@pytest.mark.slow
def test_pruned_torchvision_resnet18_exports_in_every_format(tmp_path):
    model = ts.create_model("torchvision:resnet18", num_classes=10)
    ts.set_example_inputs(model, torch.randn(1, 3, 64, 64))
    ts.prune_channels_(model, ratio=0.5)
    _export_all(model, tmp_path)


@pytest.mark.slow
def test_small_bert_exports_in_every_format(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 120, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded sequence: the mask must reach every runtime's attention
    inputs = {"input_ids": ids, "attention_mask": mask}
    for fmt in FORMATS:
        result = export(model, inputs, tmp_path / f"bert.{SUFFIX[fmt]}", random_inputs=1)
        assert result.parity.ok, result.parity.summary()
