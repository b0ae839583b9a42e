"""Contracts of the one timer (profile/latency.py), checked with a fake clock: no timed assertions."""

from __future__ import annotations

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.profile.latency import Timing, measure, measure_interleaved, measure_pair, quantile, speedup


class FakeClock:
    """A clock that only moves when a fake workload says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def work(self, label: str, durations_s: list[float]):
        it = iter(durations_s)

        def fn() -> None:
            self.calls.append(label)
            self.now += next(it, 0.0)

        return fn


def test_warmup_and_runs_counted_and_warmup_untimed():
    clock = FakeClock()
    # three warm-up calls of 1 s each must not enter the statistics
    fn = clock.work("a", [1.0, 1.0, 1.0, 0.001, 0.002, 0.003, 0.004, 0.005])
    t = measure(fn, runs=5, warmup=3, clock=clock)
    assert len(clock.calls) == 8
    assert (t.runs, t.warmup) == (5, 3)
    assert t.times_ms == pytest.approx((1.0, 2.0, 3.0, 4.0, 5.0))
    assert t.median_ms == pytest.approx(3.0)
    assert (t.p25_ms, t.p75_ms) == (pytest.approx(2.0), pytest.approx(4.0))
    assert t.spread_ms == pytest.approx(2.0)


def test_statistics_on_injected_timings_even_count():
    clock = FakeClock()
    fn = clock.work("a", [0.010, 0.001, 0.004, 0.002])  # sorted: 1, 2, 4, 10 ms
    t = measure(fn, runs=4, warmup=0, clock=clock)
    assert t.median_ms == pytest.approx(3.0)
    assert t.p25_ms == pytest.approx(1.75)  # 1 + 0.75 * (2 - 1)
    assert t.p75_ms == pytest.approx(5.5)  # 4 + 0.25 * (10 - 4)
    assert t.times_ms == pytest.approx((10.0, 1.0, 4.0, 2.0))  # kept in measured order


def test_quantile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    values = [3.0, 7.0, 1.0, 9.0, 4.0, 4.5]
    for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.percentile(values, q * 100)))


def test_runs_none_picks_count_from_time_budget():
    clock = FakeClock()
    fn = clock.work("a", [0.01] * 1000)  # 10 ms a call
    t = measure(fn, runs=None, warmup=0, min_time_s=0.1, clock=clock)
    assert t.runs == 10
    t = measure(clock.work("b", [0.01] * 1000), runs=None, warmup=0, min_time_s=100.0, max_runs=7, clock=clock)
    assert t.runs == 7
    t = measure(clock.work("c", [1.0] * 1000), runs=None, warmup=0, min_time_s=0.1, clock=clock)
    assert t.runs == 5  # never fewer than five


def test_pair_interleaves_warmup_and_runs():
    clock = FakeClock()
    a = clock.work("A", [0.002] * 10)
    b = clock.work("B", [0.001] * 10)
    ta, tb = measure_pair(a, b, runs=3, warmup=2, clock=clock, runtimes=("orig", "small"))
    assert clock.calls == ["A", "B"] * 5
    assert (ta.runtime, tb.runtime) == ("orig", "small")
    assert (ta.runs, tb.runs, ta.warmup) == (3, 3, 2)
    assert ta.median_ms == pytest.approx(2.0) and tb.median_ms == pytest.approx(1.0)
    assert speedup(ta, tb) == pytest.approx(2.0)


def test_interleaved_rotates_order():
    clock = FakeClock()
    fns = {k: clock.work(k, [0.001] * 10) for k in "ABC"}
    out = measure_interleaved(fns, runs=3, warmup=0, clock=clock)
    assert clock.calls == list("ABC" "BCA" "CAB")
    assert list(out) == ["A", "B", "C"]


def test_threads_set_during_runs_and_restored():
    before = torch.get_num_threads()
    seen: list[int] = []
    t = measure(lambda: seen.append(torch.get_num_threads()), runs=2, warmup=1, threads=1)
    assert seen == [1, 1, 1] and t.threads == 1
    assert torch.get_num_threads() == before

    def boom() -> None:
        raise RuntimeError("fails inside")

    with pytest.raises(RuntimeError):
        measure(boom, runs=1, warmup=0, threads=1)
    assert torch.get_num_threads() == before


def test_default_threads_is_current_setting():
    t = measure(lambda: None, runs=1, warmup=0)
    assert t.threads == torch.get_num_threads()
    assert t.cpu and t.device == "cpu"


def test_sync_called_before_each_clock_stop():
    clock = FakeClock()
    events: list[str] = []
    fn = clock.work("f", [0.001] * 5)
    measure(lambda: (events.append("f"), fn()), runs=2, warmup=1, sync=lambda: events.append("sync"), clock=clock)
    assert events == ["f", "sync", "f", "sync", "f", "sync"]


BAD = [({"runs": 0}, "runs"), ({"runs": 2.5}, "runs"), ({"warmup": -1}, "warmup"), ({"threads": 0}, "threads")]


@pytest.mark.parametrize(("kwargs", "name"), [*BAD, ({"runs": None, "min_time_s": 0}, "min_time_s")])
def test_bad_arguments_raise_config_error_naming_parameter(kwargs, name):
    calls: list[int] = []
    with pytest.raises(ConfigError, match=rf"^{name} must"):
        measure(lambda: calls.append(1), **kwargs)
    assert calls == []  # nothing ran


@pytest.mark.parametrize(("kwargs", "name"), BAD)
def test_pair_bad_arguments_raise_before_running(kwargs, name):
    calls: list[int] = []
    with pytest.raises(ConfigError, match=rf"^{name} must"):
        measure_pair(lambda: calls.append(1), lambda: calls.append(1), **kwargs)
    assert calls == []


def test_to_dict_and_speedup():
    t = Timing(median_ms=2.0, p25_ms=1.5, p75_ms=3.0, runs=5, warmup=1, threads=2, cpu="x")
    d = t.to_dict()
    assert d["median_ms"] == 2.0 and d["spread_ms"] == 1.5 and d["threads"] == 2 and d["cpu"] == "x"
    assert speedup(t, Timing(0.0, 0.0, 0.0, 1, 0, 1, "x")) == float("inf")


def test_cuda_device_synchronizes_that_device(monkeypatch):
    seen: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(device))
    t = measure(lambda: None, runs=2, warmup=1, sync="cuda:0")
    assert seen == [torch.device("cuda:0")] * 3  # after the warm-up, then before each clock stop
    assert t.device == "cuda:0"
    seen.clear()
    measure(lambda: None, runs=2, warmup=1, sync=torch.device("cpu"))
    assert seen == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_times_a_cuda_model():
    model = torch.nn.Linear(64, 64).cuda()
    x = torch.randn(8, 64, device="cuda")
    t = measure(lambda: model(x), runs=5, warmup=2, sync=x.device)
    assert t.runs == 5 and t.median_ms > 0 and t.device.startswith("cuda")
