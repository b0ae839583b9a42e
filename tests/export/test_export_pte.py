"""ExecuTorch programs (.pte, XNNPACK delegate): fp32 and int8, every kind of compressed model, CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.cli import main
from torchslim.errors import ConfigError, MissingDependencyError
from torchslim.export import ExportError, Tolerance, export
from torchslim.export.parity import check_parity
from torchslim.export.pte import load_pte
from torchslim.graph.inputs import Inputs

pytest.importorskip("executorch.exir")
pytest.importorskip("torchao")


def _run(path, x: torch.Tensor) -> torch.Tensor:
    return load_pte(path)(Inputs((x,)))[0]


def _lenet5() -> nn.Module:
    torch.manual_seed(0)
    return ts.create_model("zoo:lenet5").eval()


def test_fp32_pte_is_delegated_to_xnnpack_and_matches_eager(tmp_path):
    model = _lenet5()
    result = export(model, path=tmp_path / "m.pte")
    assert result.format == "pte" and result.path.read_bytes()[4:8] == b"ET12"  # an ExecuTorch flatbuffer
    info = result.info
    assert info["backend"] == "XnnpackBackend" and info["delegated_subgraphs"] >= 1
    assert info["undelegated_ops"] == []  # every op of the CNN runs on XNNPACK
    assert result.parity.ok and result.parity.max_abs <= 1e-4 and len(result.parity.cases) == 3
    x = torch.randn(1, 1, 28, 28)  # a new input, run through the file by ExecuTorch's runtime
    with torch.no_grad():
        torch.testing.assert_close(_run(result.path, x), model(x), atol=1e-4, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pte"]  # no staging leftovers


def test_float_model_to_int8_pte_is_smaller_and_within_quantization_steps(tmp_path):
    model = _lenet5()
    x = torch.randn(1, 1, 28, 28)
    calib = [torch.randn(8, 1, 28, 28) for _ in range(3)]
    fp32 = export(model, x, tmp_path / "fp32.pte", random_inputs=0)
    result = export(model, x, tmp_path / "int8.pte", format="pte-int8", calibration=calib)
    assert result.format == "pte-int8" and result.info["quantized"] == "pt2e" and result.info["scheme"] == "static"
    assert result.info["calibration"] == "given" and result.info["undelegated_ops"] == []
    assert "_reference" not in result.info and json.dumps(result.to_dict())  # facts only, JSON-able
    agreement = result.info["vs_model"]  # int8 program against the float model itself
    assert agreement["min_sqnr_db"] > 20 and agreement["top1_agreement"] == 1.0
    assert result.size_bytes * 3 < fp32.size_bytes  # int8 weights: about a quarter of the float file
    report = result.parity
    assert report.ok and report.tolerance == Tolerance(0.0, 0.0, steps=16.0)
    for case in report.cases:
        assert case.sqnr_db > 25 and case.top1_agreement == 1.0
    # the check can fail: against the float model, int8 does not meet a hundredth of a step
    strict = check_parity(model, load_pte(result.path), Inputs((x,)), format="pte-int8",
                          tolerance=Tolerance(0.0, 0.0, steps=0.01), random_cases=0)
    assert not strict.ok


def test_int8_pte_calibrated_on_real_digits_passes_parity_on_random_inputs(tmp_path):
    """Parity is checked against the program that was lowered, so random parity inputs unlike the
    calibration data (noise against digits) do not fail a good file (torchslim compress ships this)."""
    digits = ts.load_data("mnist", seed=0)
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet5", data=digits).eval()
    calib = [b[0] for _, b in zip(range(4), digits.loader("train", 32, shuffle=False))]
    result = export(model, path=tmp_path / "m.pte", format="pte-int8", calibration=calib)
    assert result.parity.ok, result.parity.summary()
    assert all(c.max_steps <= 16 for c in result.parity.cases)
    assert result.info["vs_model"]["top1_agreement"] >= 0.9


def test_int8_parity_counts_in_the_programs_own_output_step(tmp_path):
    """One row of ten logits can span far less than the output's int8 range; a one-step rounding
    difference of XNNPACK's requantization is then many "steps of the row's range". Parity counts
    in the program's real output step (the scale of its last dequantize)."""
    from torchslim.export.parity import compare_outputs
    from torchslim.export.pte import export_pte_int8

    model = _lenet5()
    x = torch.randn(1, 1, 28, 28)
    info = export_pte_int8(model, Inputs((x,)), tmp_path / "m.pte", calibration=[torch.randn(8, 1, 28, 28)])
    steps = info["_reference"].output_steps
    program = info["_reference"].__dict__["program"]
    last = next(n for n in program.graph.nodes if n.op == "output").args[0][0]
    assert len(steps) == 1 and steps[0] == pytest.approx(float(last.args[1])) and steps[0] > 0
    ref = torch.linspace(0.0, 2 * steps[0], 10).unsqueeze(0)  # a narrow row: its range step is 2/255 of a real step
    off = ref.clone()
    off[0, 3] += steps[0]  # one real output step away
    assert compare_outputs([ref], [off], Tolerance(0, 0, 16), "c", known_steps=steps).max_steps == pytest.approx(1.0, rel=1e-4)
    assert not compare_outputs([ref], [off], Tolerance(0, 0, 16), "c").ok  # counted in the row's range: fails
    off[0, 3] += 16 * steps[0]  # 17 real steps: fails either way
    assert not compare_outputs([ref], [off], Tolerance(0, 0, 16), "c", known_steps=steps).ok


def test_static_quantized_model_routes_to_int8_pte(tmp_path):
    model = _lenet5()
    calib = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    ts.quantize_(model, ts.QuantConfig(mode="static"), calibration=calib)
    result = export(model, calib[0][:1], tmp_path / "m.pte", random_inputs=1)
    assert result.format == "pte-int8" and result.info["quantized"] == "static"
    assert result.info["calibration"] == "random" and "recalibrated" in result.info["ranges"]
    assert result.parity.ok, result.parity.summary()


def test_dynamic_quantized_model_uses_xnnpack_dynamic_int8(tmp_path):
    model = _lenet5()
    ts.quantize_(model, ts.QuantConfig(mode="dynamic"))
    result = export(model, path=tmp_path / "m.pte", random_inputs=1)
    assert result.format == "pte-int8" and result.info["scheme"] == "dynamic" and result.info["quantized"] == "dynamic"
    assert "calibration" not in result.info and result.info["undelegated_ops"] == []
    assert result.parity.ok, result.parity.summary()


def _pruned() -> nn.Module:
    model = _lenet5()
    ts.prune_channels_(model, ratio=0.5)
    return model


def _sparse() -> nn.Module:
    model = _lenet5()
    ts.sparsify_(model, 0.8)
    ts.finalize_(model)
    return model


def _factorized() -> nn.Module:
    from torchslim import lowrank

    torch.manual_seed(0)
    model = ts.create_model("zoo:conv4").eval()
    lowrank.factorize_(model, lowrank.FactorizeConfig(method="svd", rank=0.25))
    return model


@pytest.mark.parametrize("build", [_pruned, _sparse, _factorized], ids=["pruned", "sparse", "factorized"])
def test_compressed_models_export_fp32_pte(tmp_path, build):
    model = build()
    result = export(model, path=tmp_path / "m.pte", random_inputs=1)
    assert result.parity.ok and result.parity.max_abs <= 1e-4, result.parity.summary()
    assert result.info["undelegated_ops"] == []


def test_pruned_model_exports_int8_pte(tmp_path):
    model = _pruned()
    result = export(model, path=tmp_path / "m.pte", format="pte-int8", random_inputs=1)
    assert result.parity.ok, result.parity.summary()


class _TinyMobileNet(nn.Module):
    """MobileNetV2's building blocks (inverted residuals, depthwise convs, ReLU6), small."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.mobilenetv2 import InvertedResidual

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 24, 2, 6), InvertedResidual(24, 24, 1, 6))
        self.pool = nn.AdaptiveAvgPool2d(1)  # as MobileNetV2 (XNNPACK takes it; a bare mean over (2, 3) it does not)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


def _with_batchnorm_statistics(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Random weights, but BatchNorm statistics from data, so activations have a sensible scale."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape))
    return model.eval()


def test_mobilenet_blocks_run_on_xnnpack_and_match_eager(tmp_path):
    model = _with_batchnorm_statistics(_TinyMobileNet(), (8, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    result = export(model, x, tmp_path / "m.pte", random_inputs=1)
    assert result.parity.ok and result.info["undelegated_ops"] == []
    assert result.parity.max_rel <= 1e-4


@pytest.mark.slow
def test_torchvision_mobilenet_v2_pte_matches_eager(tmp_path):
    """The full torchvision MobileNetV2 (random weights), fp32 and int8 (about a minute)."""
    from torchvision.models import mobilenet_v2

    model = _with_batchnorm_statistics(mobilenet_v2(), (4, 3, 224, 224))
    x = torch.randn(1, 3, 224, 224)
    fp32 = export(model, x, tmp_path / "m.pte", random_inputs=0)
    assert fp32.parity.ok and fp32.parity.max_rel <= 1e-4 and fp32.info["undelegated_ops"] == []
    int8 = export(model, x, tmp_path / "q.pte", format="pte-int8", random_inputs=0)
    assert int8.parity.ok and int8.size_bytes * 3 < fp32.size_bytes


def test_a_loaded_program_survives_a_thread_pool_change(tmp_path):
    from torchslim.export.pte import set_threads

    model = _lenet5()
    result = export(model, path=tmp_path / "m.pte", random_inputs=0)
    x = torch.randn(1, 1, 28, 28)
    run = load_pte(result.path)
    before = set_threads(1)
    try:
        set_threads(2)  # the pool the program was loaded with is gone; running it must not crash
        out = run(Inputs((x,)))[0]
    finally:
        set_threads(before)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)


class _DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


def test_capture_failure_names_the_format_and_leaves_the_old_file(tmp_path):
    old = tmp_path / "d.pte"
    old.write_bytes(b"previous export")
    with pytest.raises(ExportError) as err:
        export(_DataDependent(), (torch.randn(2, 4),), old)
    assert str(err.value).startswith("pt2 export of _DataDependent failed") or "pte" in str(err.value)
    assert old.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.pte"]


def test_calibration_is_refused_for_fp32_pte(tmp_path):
    with pytest.raises(ConfigError, match="calibration= is for int8 exports"):
        export(_lenet5(), path=tmp_path / "m.pte", calibration=[torch.randn(2, 1, 28, 28)])
    assert list(tmp_path.iterdir()) == []


def test_missing_executorch_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # import executorch.exir raises ImportError
    with pytest.raises(MissingDependencyError) as err:
        export(_lenet5(), path=tmp_path / "m.pte")
    message = str(err.value)
    assert "torchslim[executorch]" in message and len(message.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_fp32_and_int8_pte_with_parity(tmp_path, capsys):
    out = tmp_path / "exports"
    code = main(["export", "zoo:lenet5", "--format", "pte,pte-int8", "--out", str(out), "--random-inputs", "1",
                 "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload["files"]) == {"pte", "pte-int8"}
    assert payload["files"]["pte"].endswith("model.pte") and payload["files"]["pte-int8"].endswith("model.int8.pte")
    assert payload["parity"]["pte"]["ok"] and payload["parity"]["pte-int8"]["ok"]
    assert payload["exporters"]["pte-int8"]["quantized"] == "pt2e"
    assert payload["sizes"]["pte-int8"] * 3 < payload["sizes"]["pte"]
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.pte", "model.pte"]


def test_cli_pte_suffix_selects_the_format(tmp_path, capsys):
    target = tmp_path / "m.pte"
    assert main(["export", "zoo:lenet5", "--out", str(target), "--random-inputs", "0"]) == 0
    text = capsys.readouterr().out
    assert target.exists() and "pte" in text and "ok" in text
