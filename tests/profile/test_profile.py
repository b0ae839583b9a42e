"""The profiler counts right: torchvision's published figures, analytic transformer counts,
fused inference kernels, recurrent layers, unsupported ops listed, comparisons."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import torchslim as ts
from torchslim.graph import Inputs
from torchslim.profile import compare, profile

# A representative set across families; benchmarks/profile_torchvision.py checks all 80.
TORCHVISION = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "densenet121",
    "convnext_tiny",
    "googlenet",
    "vit_b_16",
    "swin_t",
    "maxvit_t",
    "alexnet",
]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_macs_and_params_match_published_meta(name: str) -> None:
    model = ts.create_model(f"torchvision:{name}")
    weights = torchvision.models.get_model_weights(name).DEFAULT
    p = profile(model, latency=False, size=False)
    assert p.params == weights.meta["num_params"]
    # torchvision publishes GMACs (labelled GFLOPS) rounded to 3 decimals
    assert abs(p.macs / 1e9 - weights.meta["_ops"]) <= 0.0005 + 1e-9, (p.macs, weights.meta["_ops"])
    assert p.unsupported_ops == {}
    assert p.flops >= 2 * p.macs


def _encoder_macs(layers: int, length: int, d: int, ffn: int, batch: int = 1) -> int:
    per_layer = 4 * length * d * d + 2 * length * length * d + 2 * length * d * ffn
    return batch * layers * per_layer


def test_vit_b16_shaped_transformer_encoder_fast_path() -> None:
    layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False).eval()
    x = torch.randn(1, 197, 768)
    t = ts.trace(enc, x)
    # in eval under no_grad PyTorch runs the fused kernel: the profiler must count it
    assert any(op.packet == "_transformer_encoder_layer_fwd" for op in t.ops)
    p = profile(enc, x, latency=False, size=False)
    expected = _encoder_macs(12, 197, 768, 3072)
    assert abs(p.macs - expected) / expected < 0.01
    assert p.unsupported_ops == {}


def test_multihead_attention_fast_path() -> None:
    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(2, 10, 64)

    class Self(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    m = Self().eval()
    t = ts.trace(m, x)
    assert any(op.packet == "_native_multi_head_attention" for op in t.ops)
    p = profile(m, x, latency=False, size=False)
    expected = 2 * (4 * 10 * 64 * 64 + 2 * 10 * 10 * 64)
    assert p.macs == expected
    # with autograd on, the unfused ops are seen, and count the same
    p_grad = profile(m.train(), x, latency=False, size=False, inference=False)
    assert abs(p_grad.macs - expected) / expected < 1e-9


def test_sdpa_counted() -> None:
    class Attn(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 32, 8), torch.randn(2, 4, 32, 8)
    p = profile(Attn(), (q, k, v), latency=False, size=False)
    assert p.macs == 2 * 4 * 16 * 32 * 8 * 2


def test_bert_base_matches_analytic_count() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig()  # bert-base: 12 layers, 768 wide, 12 heads, 3072 FFN
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 128))
    p = profile(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, latency=False, size=False)
    expected = _encoder_macs(12, 128, 768, 3072) + 768 * 768  # + pooler
    assert abs(p.macs - expected) / expected < 0.01, (p.macs, expected)
    assert p.params == sum(x.numel() for x in model.parameters())


def test_lstm_and_gru() -> None:
    lstm = nn.LSTM(32, 64, num_layers=2, batch_first=True).eval()
    p = profile(lstm, torch.randn(3, 10, 32), latency=False, size=False)
    tokens = 30
    assert p.macs == tokens * (4 * 64 * (32 + 64) + 4 * 64 * (64 + 64))
    gru = nn.GRU(16, 8, bidirectional=True).eval()
    p = profile(gru, torch.randn(5, 2, 16), latency=False, size=False)
    assert p.macs == 10 * 2 * 3 * 8 * (16 + 8)


def test_grouped_and_transposed_convolutions() -> None:
    g = nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False)
    assert profile(g, torch.randn(1, 8, 10, 10), latency=False, size=False).macs == 16 * 100 * 2 * 9
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert profile(dw, torch.randn(1, 8, 10, 10), latency=False, size=False).macs == 8 * 100 * 9
    tr = nn.ConvTranspose2d(8, 4, 3, stride=2, bias=False)
    assert profile(tr, torch.randn(1, 8, 5, 5), latency=False, size=False).macs == 200 * 4 * 9


def test_linear_exact_and_flops() -> None:
    p = profile(nn.Linear(10, 5), torch.randn(3, 10), latency=False)
    assert (p.params, p.macs) == (55, 150)
    assert p.flops == 2 * 150 + 15  # bias adds
    assert p.size_bytes is not None and p.size_bytes >= 55 * 4
    assert p.dense_fp32_bytes == 55 * 4


def test_unsupported_ops_are_listed_not_zeroed() -> None:
    lib = torch.library.Library("torchslim_test", "FRAGMENT")
    lib.define("mystery(Tensor x) -> Tensor")
    lib.impl("mystery", lambda x: x * 2.0, "CompositeExplicitAutograd")

    class Mystery(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.torchslim_test.mystery(x)

    p = profile(Mystery(), torch.randn(2, 3), latency=False, size=False)
    assert p.unsupported_ops == {"torchslim_test.mystery.default": 1}


def test_latency_stats_and_restored_mode() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.1)).train()
    p = profile(model, torch.randn(4, 16), runs=7, warmup=2)
    assert model.training  # restored
    lat = p.latency_ms
    assert lat.runs == 7 and lat.warmup == 2 and lat.batch_size == 4
    assert lat.threads == torch.get_num_threads()
    assert lat.min <= lat.p10 <= lat.median <= lat.p90 <= lat.max


def test_layers_table_and_json_keys() -> None:
    model = ts.create_model("zoo:lenet5")
    p = profile(model, latency=False)
    assert sum(layer.macs for layer in p.layers) == p.macs
    assert sum(layer.params for layer in p.layers) == p.params
    d = p.to_dict()
    for key in ("params", "macs", "flops", "size_bytes", "latency_ms", "unsupported_ops", "layers", "nonzero_params"):
        assert key in d
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(p.table())
    assert "MACs" in console.export_text()


def test_compare_ratios() -> None:
    big = profile(nn.Linear(100, 100), torch.randn(1, 100), latency=False)
    small = profile(nn.Linear(100, 25), torch.randn(1, 100), latency=False)
    c = compare(big, small)
    assert c.ratio("macs") == pytest.approx(0.25)
    assert c.ratio("params") == pytest.approx((100 * 25 + 25) / (100 * 100 + 100))
    assert c.ratio("latency_ms") is None
    assert set(c.to_dict()) >= {"params", "macs", "size_bytes", "latency_ms"}


def test_meta_device_counts_without_running() -> None:
    with torch.device("meta"):
        model = torchvision.models.resnet18()
        x = torch.randn(1, 3, 224, 224)
    p = profile(model, Inputs((x,)), latency=False, size=False)
    assert abs(p.macs / 1e9 - 1.814) <= 0.0005


def test_macs_by_precision_counts_declared_low_bit_modules() -> None:
    class OneBit(nn.Linear):
        torchslim_precision = (1, 1)

    model = nn.Sequential(nn.Linear(8, 16), OneBit(16, 4))
    p = profile(model, torch.randn(2, 8), latency=False, size=False)
    assert p.macs_by_precision == {"float": 2 * 8 * 16, "w1a1": 2 * 16 * 4}
    assert sum(p.macs_by_precision.values()) == p.macs


def test_binarized_model_reports_binary_mac_share() -> None:
    binarize = pytest.importorskip("torchslim.binarize")
    model = ts.create_model("zoo:lenet5")
    binarize.binarize_(model, binarize.BinarizeConfig(method="xnor"))
    p = profile(model, latency=False, size=False)
    assert p.macs_by_precision.get("w1a1", 0) > 0
    assert sum(p.macs_by_precision.values()) == p.macs
