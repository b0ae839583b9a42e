"""TorchScript export: trace, script fallback, loaded back in Python and (slow) by libtorch from C++."""

from __future__ import annotations

import shutil

import pytest
import torch

import torchslim as ts
from torchslim.export import ExportError, export

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def test_zoo_model_round_trips(tmp_path):
    model = ts.create_model("zoo:resnet20")
    result = export(model, path=tmp_path / "resnet20.pt")
    assert result.format == "torchscript" and result.info["method"] == "trace"
    assert result.parity.ok and result.parity.max_abs <= 1e-5
    loaded = torch.jit.load(str(result.path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


def test_torchvision_model_round_trips(tmp_path):
    model = ts.create_model("torchvision:mobilenet_v3_small", num_classes=10)
    ts.set_example_inputs(model, torch.randn(1, 3, 64, 64))
    result = export(model, path=tmp_path / "mnv3.ts", random_inputs=1)
    assert result.format == "torchscript" and result.parity.ok


class _Branchy(torch.nn.Module):
    """Control flow on tensor values: a trace would freeze one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if bool(y.sum() > 0):
            return y * 2
        return y - 1


def test_script_fallback_keeps_data_dependent_control_flow(tmp_path):
    model = _Branchy().eval()
    result = export(model, (torch.randn(2, 4),), tmp_path / "b.pt")
    assert result.info["method"] == "script"
    assert result.info["trace_warnings"]  # why the trace was not kept
    loaded = torch.jit.load(str(result.path))
    # inputs aligned with / against the layer's column sums take the two branches
    x_pos = (model.fc.weight.detach().sum(0).sign() * 100).unsqueeze(0)
    with torch.no_grad():
        assert bool(model.fc(x_pos).sum() > 0) != bool(model.fc(-x_pos).sum() > 0)
        for x in (x_pos, -x_pos, torch.randn(3, 4)):
            torch.testing.assert_close(loaded(x), model(x))


def test_forced_trace_is_reported(tmp_path):
    result = export(_Branchy().eval(), (torch.randn(2, 4),), tmp_path / "b.pt", method="trace", strict=False)
    assert result.info["method"] == "trace" and result.info["trace_warnings"]


class _Untraceable(torch.nn.Module):
    """Returns a string (no trace) and takes **kwargs (no script)."""

    def forward(self, x, **options):
        return x * 2, "label"


def test_model_that_neither_traces_nor_scripts_raises_export_error(tmp_path):
    with pytest.raises(ExportError) as err:
        export(_Untraceable(), (torch.randn(1, 4),), tmp_path / "u.pt")
    msg = str(err.value)
    assert msg.startswith("torchscript export of _Untraceable failed")
    assert "trace:" in msg and "script:" in msg
    assert list(tmp_path.iterdir()) == []


def test_bad_method_is_config_error(tmp_path):
    with pytest.raises(ts.errors.ConfigError, match="trace, script"):
        export(_Branchy(), (torch.randn(1, 4),), tmp_path / "b.pt", method="compile")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None, reason="needs cmake and a C++ compiler")
def test_cpp_runner_builds_and_matches_pytorch(tmp_path):
    from torchslim.export._cpp import build_runner, check_cpp, run_runner

    try:
        binary = build_runner()  # cached under $TORCHSLIM_CACHE after the first build
    except ExportError as exc:
        if exc.reason != "build failed":
            raise
        pytest.skip(f"the C++ runner does not build offline here: {exc}")
    model = ts.create_model("zoo:lenet5")
    result = export(model, path=tmp_path / "lenet5.pt")
    report = check_cpp(model, result.path, binary=binary)
    assert report.ok and report.format == "torchscript-cpp" and len(report.cases) == 3
    outs, info = run_runner(binary, result.path, [torch.randn(4, 1, 28, 28)], runs=3)
    assert outs[0].shape == (4, 10) and info["median_ms"] > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None, reason="needs cmake and a C++ compiler")
def test_cli_check_cpp_reports_cpp_parity(tmp_path, capsys):
    import json

    from torchslim.cli import main

    code = main(["export", "zoo:lenet5", "--format", "torchscript,onnx", "--out", str(tmp_path / "o"), "--json",
                 "--check-cpp", "--isolated-ort", "--random-inputs", "1"])
    captured = capsys.readouterr()
    if code == 2 and "runner did not build" in captured.err:
        pytest.skip(f"the C++ runner does not build offline here: {captured.err.strip()}")
    assert code == 0, captured.err
    parity = json.loads(captured.out)["parity"]
    assert parity["torchscript-cpp"]["ok"] is True and parity["onnx-isolated"]["ok"] is True
