"""Latency in the target runtime: paired timing, per-layer tables and their per-machine cache."""

import json

import pytest
import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.export import runtime_latency as rl


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))


def _net(width=32):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 8, 3), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10)).eval()


def test_bad_runtime_memory_format_and_threads_are_refused_in_one_line():
    for kwargs, word in (({"runtime": "tensorrt"}, "runtime must be one of eager, compile, onnxruntime, xnnpack"),
                         ({"runtime": "eager", "memory_format": "nhwc"}, "memory_format must be one of"),
                         ({"runtime": "eager", "threads": 0}, "threads must be an integer >= 1")):
        with pytest.raises(ConfigError, match=word):
            rl.paired_latency({"a": _net()}, torch.randn(1, 3, 8, 8), **kwargs)


def test_ratio_is_the_candidates_median_over_the_originals_from_one_interleaved_run():
    big, small = _net(64), _net(4)
    x = torch.randn(1, 3, 8, 8)
    ratio, t = rl.latency_ratio(big, small, x, "eager", threads=1, runs=5, warmup=1)
    assert t["original"].runs == t["candidate"].runs == 5
    assert ratio == pytest.approx(t["candidate"].median_ms / t["original"].median_ms)


def test_channels_last_times_a_copy_and_leaves_the_model_as_it_was():
    m = _net()
    before = m[0].weight.stride()
    t = rl.paired_latency({"m": m}, torch.randn(1, 3, 8, 8), "eager", threads=1, runs=3, warmup=1,
                          memory_format="channels_last")
    assert t["m"].runs == 3 and m[0].weight.stride() == before


def test_onnxruntime_times_the_exported_file():
    pytest.importorskip("onnxruntime")
    t = rl.paired_latency({"a": _net(), "b": _net(8)}, torch.randn(1, 3, 8, 8), "onnxruntime", threads=1, runs=3,
                          warmup=1)
    assert set(t) == {"a", "b"} and all(v.median_ms > 0 for v in t.values())


def test_layer_table_measures_every_conv_and_linear_once_then_reads_the_cache(tmp_path):
    m = _net()
    x = torch.randn(1, 3, 8, 8)
    rows = rl.layer_table(m, x, "eager", threads=1, runs=3)
    assert sorted(r.name for r in rows) == ["0", "2", "4"]
    assert {r.name: r.input_shape for r in rows}["4"] == [1, 288]
    assert sum(r.share for r in rows) == pytest.approx(1.0)
    assert not any(r.cached for r in rows)
    cache = tmp_path / "cache" / "latency" / "eager.json"
    stored = json.loads(cache.read_text())
    assert len(stored) == 3
    again = rl.layer_table(m, x, "eager", threads=1, runs=3)
    assert all(r.cached for r in again)
    assert {r.name: r.median_ms for r in again} == {r.name: r.median_ms for r in rows}
    # another thread count is another key: measured, not read
    assert not any(r.cached for r in rl.layer_table(m, x, "eager", threads=2, runs=3))


def test_a_damaged_cache_is_measured_again(tmp_path):
    cache = tmp_path / "cache" / "latency" / "eager.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    ms = rl.layer_latency(nn.Linear(16, 16), [4, 16], "eager", runs=3)
    assert ms > 0 and len(json.loads(cache.read_text())) == 1


def test_fastest_widths_times_each_candidate_width():
    got = rl.fastest_widths(nn.Conv2d(8, 32, 3), [1, 8, 16, 16], [24, 32, 28], "eager")
    assert sorted(got) == [24, 28, 32] and all(v > 0 for v in got.values())
    with pytest.raises(ConfigError, match="widths must be integers >= 1"):
        rl.fastest_widths(nn.Linear(4, 4), [1, 4], [0])
    with pytest.raises(ConfigError, match="Conv1d/2d/3d and Linear"):
        rl.layer_latency(nn.ReLU(), [1, 4])


def test_a_conv_subclass_with_its_own_constructor_is_timed_as_the_plain_conv(tmp_path, monkeypatch) -> None:
    from torch import nn

    from torchslim.export.runtime_latency import conv_class, fastest_widths, layer_latency

    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path))

    class SamePadConv(nn.Conv2d):  # like EfficientNet's static-"same" conv: one more required argument
        def __init__(self, cin: int, cout: int, k: int, image_size: int) -> None:
            super().__init__(cin, cout, k)
            self.pad = nn.ZeroPad2d(k // 2)

        def forward(self, x):
            return super().forward(self.pad(x))

    conv = SamePadConv(4, 8, 3, image_size=16)
    assert conv_class(conv) is nn.Conv2d
    assert layer_latency(conv, [1, 4, 16, 16], "eager", runs=3, warmup=1) > 0
    assert set(fastest_widths(conv, [1, 4, 16, 16], [4, 8], "eager")) == {4, 8}
