"""Dynamic int8 LSTM / GRU: output SQNR, shapes and states, real file bytes, save/load, CLI, bad input."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.cli import main
from torchslim.errors import ConfigError
from torchslim.quantize import QuantConfig, quantize_, sqnr
from torchslim.quantize.dynamic_rnn import QuantizedRNN
from torchslim.quantize.primitives import QScheme

_MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(32, 64, num_layers=2, bidirectional=True, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]


    def build():
        torch.manual_seed(0)
        return Tagger()


    def example_inputs():
        return (torch.randn(1, 6, 32),)
    """
)


class _Net(nn.Module):
    def __init__(self, rnn: nn.Module, head: int = 0) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), head) if head else None

    def forward(self, x: torch.Tensor, hx=None):
        return self.rnn(x, hx)


def _rnns() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "lstm": nn.LSTM(24, 48, num_layers=2, bidirectional=True, batch_first=True),
        "gru": nn.GRU(24, 48, num_layers=2, bidirectional=True),
    }


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dynamic_int8_rnn_sqnr_shapes_and_states(kind: str) -> None:
    torch.manual_seed(1)
    model = _Net(_rnns()[kind], head=5).eval()
    x = torch.randn(4, 9, 24) if kind == "lstm" else torch.randn(9, 4, 24)  # batch_first only for the LSTM
    with torch.no_grad():
        y, state = model(x)
    plan = quantize_(model, QuantConfig(mode="dynamic"))
    assert sorted(plan.layers) == ["head", "rnn"]
    q = model.rnn
    assert isinstance(q, QuantizedRNN) and q.dynamic_act
    assert all(getattr(q, n + "_int").dtype == torch.int8 for n in q.weight_names)
    assert len(q.weight_names) == 8  # ih + hh, 2 layers x 2 directions
    with torch.no_grad():
        yq, state_q = model(x)
    assert yq.shape == y.shape
    assert sqnr(y, yq) > 30
    states = (state, state_q) if kind == "gru" else None
    pairs = list(zip(state, state_q)) if kind == "lstm" else [states]
    for ref, got in pairs:
        assert got.shape == ref.shape
        assert sqnr(ref, got) > 30
    # the state carries over: a second chunk fed with the returned state
    with torch.no_grad():
        y2, _ = _rnns()[kind].eval()(x, state)
        y2q, _ = model(x, state_q)
    assert sqnr(y2, y2q) > 30


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrence_matches_torch_and_16_bit_is_near_identity(kind: str) -> None:
    rnn = _rnns()[kind].eval()
    x = torch.randn(3, 7, 24) if kind == "lstm" else torch.randn(7, 3, 24)
    q8 = QuantizedRNN.from_float(rnn, QScheme(bits=8, granularity="channel"))
    with torch.no_grad():
        ref = rnn(x)[0]
        # without activation quantization the loop is PyTorch's recurrence on the dequantized weights
        assert torch.allclose(q8(x)[0], q8.to_float().eval()(x)[0], atol=1e-5)
        y16 = QuantizedRNN.from_float(rnn, QScheme(bits=16, granularity="channel"))(x)[0]
    assert ((y16 - ref).norm() / ref.norm()).item() < 1e-3


def test_unbatched_input_projection_and_bias_free() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(10, 16, num_layers=2, proj_size=6).eval()
    gru = nn.GRU(10, 16, bias=False).eval()
    x = torch.randn(5, 10)  # unbatched (T, in)
    with torch.no_grad():
        for rnn in (lstm, gru):
            q = QuantizedRNN.from_float(rnn, QScheme(bits=8, granularity="channel"), dynamic_act=True)
            y, yq = rnn(x), q(x)
            assert yq[0].shape == y[0].shape
            assert sqnr(y[0], yq[0]) > 30


def _write_model(tmp_path) -> str:
    path = tmp_path / "tagger.py"
    path.write_text(_MODEL_FILE)
    return f"{path}:build"


def test_lstm_file_is_really_smaller_and_save_load_round_trips(tmp_path) -> None:
    spec = _write_model(tmp_path)
    model = ts.create_model(spec)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        y = model(x)
    ts.save(model, tmp_path / "fp32")
    quantize_(model, QuantConfig(mode="dynamic"))
    with torch.no_grad():
        yq = model(x)
    assert sqnr(y, yq) > 30
    ts.save(model, tmp_path / "int8")
    ratio = os.path.getsize(tmp_path / "fp32" / "model.safetensors") / os.path.getsize(tmp_path / "int8" / "model.safetensors")
    assert ratio >= 3.5
    loaded = ts.load(tmp_path / "int8")
    assert isinstance(loaded.rnn, QuantizedRNN) and loaded.rnn.dynamic_act
    with torch.no_grad():
        assert torch.equal(loaded(x), yq)


def test_cli_dynamic_picks_up_the_lstm(tmp_path, capsys) -> None:
    spec = _write_model(tmp_path)
    out = tmp_path / "q"
    code = main(["quantize", spec, "--mode", "dynamic", "--out", str(out), "--json", "--no-onnx", "--no-latency", "--no-progress"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["quantize"]["layers"] == ["rnn"]
    model = ts.load(out)
    assert isinstance(model.rnn, QuantizedRNN)
    assert model(torch.randn(3, 4, 32)).shape == (3, 4, 128)


def test_bad_rnn_input_leaves_model_unchanged() -> None:
    model = _Net(_rnns()["lstm"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="group_size"):  # 24 and 48 are not multiples of 32
        quantize_(model, QuantConfig(mode="dynamic", granularity="group", group_size=32))
    assert isinstance(model.rnn, nn.LSTM)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="select no .*LSTM/GRU"):
        quantize_(model, QuantConfig(mode="dynamic", skip=("rnn",)))
    quantize_(model, QuantConfig(mode="dynamic"))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_(model, QuantConfig(mode="dynamic"))


def test_lstm_onnx_export_is_int8_with_dynamic_batch(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from torchslim.export.onnx_int import export_integer_onnx
    from torchslim.quantize import QuantConfig, quantize_
    from torchslim.quantize.onnx_lowering import onnx_parity

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(32, 64, num_layers=2, batch_first=True)
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = Tagger().eval()
    x = torch.randn(4, 12, 32)
    quantize_(model, QuantConfig(mode="dynamic"))
    files = export_integer_onnx(model, (x[:1],), tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(files["onnx"]).graph.node]
    assert ops.count("DynamicQuantizeLSTM") == 2 and "LSTM" not in ops  # ONNX Runtime's int8 LSTM kernel
    assert os.path.getsize(files["onnx_fp32"]) > 3 * os.path.getsize(files["onnx"])
    parity = onnx_parity(model, files, x)  # batch 4 through a file exported at batch 1
    assert parity["fp32_vs_torch_float_db"] > 80
    assert parity["int8_vs_torch_quantized_db"] > 35
