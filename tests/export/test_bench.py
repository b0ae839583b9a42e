"""``torchslim.export.bench`` and ``torchslim bench``: rows per runtime, baseline, failures, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from torchslim.cli import main
from torchslim.errors import ConfigError
from torchslim.export.bench import RUNTIMES, BenchResult, bench, parse_runtimes

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


class _Tokens(nn.Module):
    """A model called with keyword inputs, like a transformers encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)
        return self.out(h.sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1))


def test_one_row_per_runtime_with_positive_medians_and_eager_baseline():
    pytest.importorskip("onnxruntime")
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    threads = torch.get_num_threads()
    result = bench(model, torch.randn(2, 16), runtimes="torchscript,onnxruntime,onnxruntime-xnnpack", runs=5, warmup=1)
    assert isinstance(result, BenchResult)
    assert [r.runtime for r in result.rows] == ["eager", "torchscript", "onnxruntime", "onnxruntime-xnnpack"]  # eager first
    eager = result.row("eager")
    assert eager.ok and eager.ratio_to_eager == 1.0 and eager.max_abs_diff == 0.0
    for name in ("torchscript", "onnxruntime"):
        row = result.row(name)
        assert row.ok, row.reason
        assert 0 < row.p10_ms <= row.median_ms <= row.p90_ms
        assert row.ratio_to_eager == pytest.approx(row.median_ms / eager.median_ms)
        assert row.max_abs_diff < 1e-4  # the runtime computes what eager does
    import onnxruntime as ort

    xnn = result.row("onnxruntime-xnnpack")
    if "XnnpackExecutionProvider" in ort.get_available_providers():
        assert xnn.ok, xnn.reason
    else:
        assert xnn.status == "unavailable" and "not in this onnxruntime build" in xnn.reason
        assert xnn.median_ms is None
    assert result.threads == 1 and result.batch_size == 2 and result.runs == 5
    assert torch.get_num_threads() == threads  # restored
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    json.dumps(result.to_dict())  # serialisable


def test_keyword_inputs_run_in_every_runtime():
    pytest.importorskip("onnxruntime")
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    result = bench(_Tokens(), {"input_ids": ids, "attention_mask": mask},
                   runtimes=["eager", "torchscript", "onnxruntime"], runs=3, warmup=1)
    for row in result.rows:
        assert row.ok, f"{row.runtime}: {row.reason}"
        assert row.max_abs_diff < 1e-4


def test_a_runtime_that_fails_gets_a_row_with_the_reason(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    result = bench(_mlp(), torch.randn(1, 16), runtimes="eager,compile,torchscript", runs=3, warmup=1)
    row = result.row("compile")
    assert row.status == "failed" and "InvalidCxxCompiler" in row.reason and row.median_ms is None
    assert result.row("torchscript").ok and result.row("eager").ok


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"runtimes": "eager,tensorrt"}, "unknown runtime 'tensorrt'; allowed: eager, compile, torchscript"),
        ({"runtimes": ["onnxruntime", "onnxruntime"]}, "twice"),
        ({"runtimes": "eager,xnnpack"}, "'xnnpack' was renamed: use 'onnxruntime-xnnpack'.*or 'executorch'"),
        ({"runtimes": ""}, "empty"),
        ({"threads": 0}, "threads"),
        ({"runs": 0}, "runs"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_bad_arguments_raise_config_error_before_running(kwargs, match):
    calls = []
    model = _mlp()
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match=match):
        bench(model, torch.randn(1, 16), **kwargs)
    assert calls == []  # nothing ran


def test_int8_that_is_neither_a_model_nor_a_function_is_refused_before_running():
    from torchslim.errors import TorchslimError

    calls = []
    model = _mlp()
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(TorchslimError, match="int8 must be a quantized nn.Module, a function"):
        bench(model, torch.randn(1, 16), runtimes="eager-int8", int8="static")
    assert calls == []


def test_parse_runtimes_defaults_to_all_with_eager_first():
    assert parse_runtimes(None) == RUNTIMES
    assert parse_runtimes("onnxruntime, eager") == ("eager", "onnxruntime")
    assert parse_runtimes(["torchscript"]) == ("eager", "torchscript")


def test_cli_json_has_one_object_per_runtime(capsys):
    pytest.importorskip("onnxruntime")
    code = main(["bench", "zoo:lenet300", "--runtimes", "eager,torchscript,onnxruntime", "--runs", "3",
                 "--warmup", "1", "--batch-size", "2", "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)  # stdout holds only the JSON object
    assert payload["verb"] == "bench" and payload["model"] == "zoo:lenet300"
    assert payload["threads"] == 1 and payload["batch_size"] == 2 and payload["inputs"] == "[2, 1, 28, 28]"
    assert [r["runtime"] for r in payload["runtimes"]] == ["eager", "torchscript", "onnxruntime"]
    for row in payload["runtimes"]:
        assert set(row) >= {"runtime", "status", "median_ms", "ratio_to_eager", "max_abs_diff", "reason"}
        assert row["status"] == "ok" and row["median_ms"] > 0
    assert payload["runtimes"][0]["ratio_to_eager"] == 1.0


def test_cli_prints_a_table(capsys):
    assert main(["bench", "zoo:lenet300", "--runtimes", "torchscript", "--runs", "2", "--warmup", "0"]) == 0
    text = capsys.readouterr().out
    assert "eager" in text and "torchscript" in text and "median ms" in text


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--runtimes", "eager,tflite"], "unknown runtime 'tflite'"),
        (["--threads", "0"], "--threads"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(capsys, argv, match):
    assert main(["bench", "zoo:lenet300", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_torch_compile_row_matches_eager():
    """Real inductor compilation (C++ codegen: ~30 s on a cold cache)."""
    result = bench(_mlp(), torch.randn(2, 16), runtimes="compile", runs=3, warmup=1)
    row = result.row("compile")
    if not row.ok:  # a machine without a C++ toolchain: the row must say why, not crash
        assert row.status == "failed" and row.reason
        pytest.skip(f"torch.compile cannot run here: {row.reason}")
    assert row.median_ms > 0 and row.max_abs_diff < 1e-4


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_executorch_row_runs_the_pte_with_the_same_threads():
    pytest.importorskip("executorch.runtime")
    from torchslim.export.pte import set_threads

    pool = set_threads(2)  # a pool size the bench must put back
    try:
        result = bench(_cnn(), torch.randn(1, 1, 12, 12), runtimes="executorch", runs=3, warmup=1, threads=1)
        assert set_threads(2) == 2  # restored after the bench
    finally:
        set_threads(pool)
    row = result.row("executorch")
    assert row.ok, row.reason
    assert row.info["backend"] == "XNNPACK delegate" and row.info["size_bytes"] > 0
    assert row.max_abs_diff < 1e-4 and row.median_ms > 0
    assert result.environment["executorch"]


def test_int8_rows_of_a_float_model_need_an_int8_model():
    result = bench(_cnn(), torch.randn(1, 1, 12, 12), runtimes="eager-int8,compile-int8", runs=2, warmup=0)
    for name in ("eager-int8", "compile-int8"):
        row = result.row(name)
        assert row.status == "unavailable" and "the model is float: pass int8=" in row.reason


def test_int8_rows_time_the_quantized_copy_in_every_runtime():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("executorch.runtime")
    import torchslim as ts

    model, x = _cnn(), torch.randn(1, 1, 12, 12)
    made = []

    def quantized_copy(m, inputs):
        import copy

        q = copy.deepcopy(m)
        ts.quantize_(q, ts.QuantConfig(mode="static"), calibration=[torch.randn(8, 1, 12, 12) for _ in range(2)])
        made.append(q)
        return q

    result = bench(model, x, runtimes="eager-int8,executorch-int8,onnxruntime-int8", runs=3, warmup=1,
                   int8=quantized_copy)
    assert len(made) == 1  # one quantized copy for every int8 row
    assert [r.runtime for r in result.rows] == ["eager", "eager-int8", "executorch-int8", "onnxruntime-int8"]
    scale = float(model(x).abs().max())
    for name in ("eager-int8", "executorch-int8", "onnxruntime-int8"):
        row = result.row(name)
        assert row.ok, f"{name}: {row.reason}"
        assert row.info["int8"] == "quantized copy"
        assert row.max_abs_diff < 0.1 * scale  # int8, so not exact, but the same function
    assert result.row("executorch-int8").info["quantized"] == "static"
    assert result.row("onnxruntime-int8").info["quantized"] == "static"
    assert not any(type(m).__name__.startswith("Quant") for m in model.modules())  # the float model is untouched


def test_int8_factory_failure_is_reported_in_every_int8_row():
    def broken(model, inputs):
        raise RuntimeError("no int8 today")

    result = bench(_cnn(), torch.randn(1, 1, 12, 12), runtimes="eager-int8,compile-int8", runs=2, warmup=0,
                   int8=broken)
    for name in ("eager-int8", "compile-int8"):
        row = result.row(name)
        assert row.status == "failed" and "no int8 today" in row.reason
    assert result.row("eager").ok


def test_cli_int8_rows_quantize_a_copy(capsys):
    pytest.importorskip("executorch.runtime")
    code = main(["bench", "zoo:lenet5", "--runtimes", "executorch,eager-int8,executorch-int8", "--runs", "3",
                 "--warmup", "1", "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    rows = {r["runtime"]: r for r in payload["runtimes"]}
    assert list(rows) == ["eager", "executorch", "eager-int8", "executorch-int8"]
    for name, row in rows.items():
        assert row["status"] == "ok", f"{name}: {row['reason']}"
    assert rows["executorch-int8"]["info"]["int8"] == "quantized copy"
    assert rows["executorch-int8"]["info"]["size_bytes"] < rows["executorch"]["info"]["size_bytes"] / 2
