"""The one timer: warm-up, timed runs, median with its spread, threads and CPU stated.

Every latency torchslim reports comes from here: ``ts.profile``, ``ts.bench``, the latency
budget of ``prune_channels_``, the recipe's export figures and the search's latency objective.

* :func:`measure` times one callable: ``warmup`` untimed calls, then ``runs`` timed calls.
* :func:`measure_pair` times two callables interleaved call by call (A, B, A, B, ...), so a
  burst of load from other processes slows both alike; :func:`measure_interleaved` does the
  same for any number, rotating the order every round.
* :func:`speedup` is the one definition of a ratio of two timings.

The statistic is the **median** of the timed runs, reported with its 25th and 75th
percentiles (linear interpolation between closest ranks, as ``numpy.percentile``). The median
is used everywhere, paired timings included: unlike the minimum it does not reward one lucky
run, and unlike the mean it is not dragged by the few runs another process interrupted. A paired
ratio is the ratio of the two medians taken over the same interleaved rounds.

CUDA work is asynchronous: pass ``sync=device`` (or any callable) and the device is
synchronised before the clock starts and before it stops. The clock is injectable (seconds as
a float, ``time.perf_counter`` by default) so the bookkeeping can be tested without timing.

Example:
    >>> t = measure(lambda: sum(range(100)), runs=5, warmup=1)
    >>> t.runs, t.warmup, t.p25_ms <= t.median_ms <= t.p75_ms
    (5, 1, True)
    >>> a, b = measure_pair(lambda: None, lambda: None, runs=3, warmup=0)
    >>> a.runs == b.runs == 3
    True
"""

from __future__ import annotations

import functools
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from torchslim._utils import is_int, is_number, num_threads
from torchslim.errors import ConfigError

__all__ = [
    "Timing",
    "cpu_name",
    "measure",
    "measure_interleaved",
    "measure_pair",
    "quantile",
    "speedup",
    "synchronizer",
]

Clock = Callable[[], float]
Sync = Callable[[], Any] | torch.device | str | None


@dataclass(frozen=True)
class Timing:
    """What :func:`measure` measured, in milliseconds.

    Attributes:
        median_ms: the median of the timed runs (the figure to report).
        p25_ms, p75_ms: the 25th and 75th percentiles (the spread around it).
        runs, warmup: timed and untimed calls.
        threads: torch intra-op threads in force during the runs.
        cpu: the CPU's model name (:func:`cpu_name`).
        runtime: a label for what ran (``"eager"``, ``"onnxruntime"``, ...).
        device: where it ran (``"cpu"``, ``"cuda:0"``).
        times_ms: every timed run, in the order measured.
    """

    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int
    warmup: int
    threads: int
    cpu: str
    runtime: str = "eager"
    device: str = "cpu"
    times_ms: tuple[float, ...] = ()

    @property
    def spread_ms(self) -> float:
        """Interquartile range, ``p75_ms - p25_ms``."""
        return self.p75_ms - self.p25_ms

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the timed runs, interpolated like ``p25_ms`` / ``p75_ms``."""
        return quantile(self.times_ms, q)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the individual runs)."""
        return {
            "median_ms": self.median_ms,
            "p25_ms": self.p25_ms,
            "p75_ms": self.p75_ms,
            "spread_ms": self.spread_ms,
            "runs": self.runs,
            "warmup": self.warmup,
            "threads": self.threads,
            "cpu": self.cpu,
            "runtime": self.runtime,
            "device": self.device,
        }


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linear between closest ranks (``numpy`` default).

    Example:
        >>> quantile([4.0, 1.0, 3.0, 2.0], 0.5), quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.25)
        (2.5, 2.0)
    """
    if not values:
        raise ConfigError("quantile of no values: time at least one run")
    ordered = sorted(values)
    pos = min(max(q, 0.0), 1.0) * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform``), for the record."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def synchronizer(sync: Sync) -> Callable[[], Any]:
    """A no-argument function that waits for ``sync``'s pending work.

    ``sync`` is a callable (returned as is), a CUDA device (``torch.cuda.synchronize`` on it),
    any other device or ``None`` (nothing to wait for).
    """
    if sync is None:
        return lambda: None
    if callable(sync):
        return sync
    device = torch.device(sync)
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    return lambda: None


def _device_label(sync: Sync) -> str:
    if isinstance(sync, (torch.device, str)):
        return str(torch.device(sync))
    return "cpu"


def _check(runs: Any, warmup: Any, threads: Any, min_time_s: Any = None, max_runs: Any = None) -> None:
    if runs is not None and (not is_int(runs) or runs < 1):
        raise ConfigError(f"runs must be an integer >= 1 (or None to run for min_time_s); got {runs!r}")
    if not is_int(warmup) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0; got {warmup!r}")
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ConfigError(f"threads must be an integer >= 1 or None (torch's current setting); got {threads!r}")
    if min_time_s is not None and (not is_number(min_time_s) or min_time_s <= 0):
        raise ConfigError(f"min_time_s must be a number > 0; got {min_time_s!r}")
    if max_runs is not None and (not is_int(max_runs) or max_runs < 1):
        raise ConfigError(f"max_runs must be an integer >= 1; got {max_runs!r}")


def _timing(times_ms: list[float], warmup: int, threads: int, runtime: str, device: str) -> Timing:
    return Timing(
        median_ms=quantile(times_ms, 0.5),
        p25_ms=quantile(times_ms, 0.25),
        p75_ms=quantile(times_ms, 0.75),
        runs=len(times_ms),
        warmup=warmup,
        threads=threads,
        cpu=cpu_name(),
        runtime=runtime,
        device=device,
        times_ms=tuple(times_ms),
    )


def measure(
    fn: Callable[[], Any],
    *,
    runs: int | None = 20,
    warmup: int = 3,
    threads: int | None = None,
    sync: Sync = None,
    runtime: str = "eager",
    min_time_s: float = 1.0,
    max_runs: int = 200,
    clock: Clock = time.perf_counter,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``runs`` timed calls; the median and its spread.

    Args:
        fn: what to time, called with no arguments (wrap a model: ``lambda: model(x)``).
        runs: timed calls. ``None`` picks the count from the first timed call so the runs take
            about ``min_time_s`` seconds (at least 5, at most ``max_runs``).
        warmup: untimed calls first (caches, allocator, lazy initialisation).
        threads: torch intra-op threads during the calls (restored after); ``None`` keeps the
            current setting.
        sync: a CUDA device (or a callable) to synchronise before the clock starts and stops;
            ``None`` for CPU work.
        runtime: a label kept in the result.
        min_time_s, max_runs: the time budget when ``runs`` is None.
        clock: seconds as a float (``time.perf_counter``); injectable for tests.

    Returns:
        A :class:`Timing` in milliseconds.

    Raises:
        ConfigError: ``runs`` < 1, ``warmup`` < 0, ``threads`` < 1 (or not integers). Nothing ran.
    """
    _check(runs, warmup, threads, min_time_s, max_runs)
    wait = synchronizer(sync)
    times: list[float] = []
    with num_threads(threads) as n:
        for _ in range(warmup):
            fn()
        wait()
        target = runs
        while target is None or len(times) < target:
            t0 = clock()
            fn()
            wait()
            times.append((clock() - t0) * 1e3)
            if target is None:
                target = int(min(max_runs, max(5, min_time_s * 1e3 / max(times[0], 1e-3))))
    return _timing(times, warmup, n, runtime, _device_label(sync))


def measure_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    sync: Sync = None,
    rotate: bool = True,
    clock: Clock = time.perf_counter,
) -> dict[str, Timing]:
    """Time several callables round by round: every round times one call of each.

    Warm-up is interleaved the same way. With ``rotate`` the order shifts by one every round
    (A, B, C, then B, C, A, ...), so no callable always runs first. Each result's ``runtime``
    is its key in ``fns``.

    Args:
        fns: label -> callable, in the order of the first round.
        runs, warmup, threads, sync, clock: as in :func:`measure` (``runs`` must be given).
        rotate: shift the order every round.

    Returns:
        label -> :class:`Timing`, in the order of ``fns``.

    Raises:
        ConfigError: bad ``runs`` / ``warmup`` / ``threads``, or no callables. Nothing ran.
    """
    _check(runs, warmup, threads)
    if runs is None:
        raise ConfigError("runs must be an integer >= 1 for interleaved timing; got None")
    if not fns:
        raise ConfigError("fns must hold at least one callable to time")
    wait = synchronizer(sync)
    order = list(fns)
    times: dict[str, list[float]] = {k: [] for k in order}
    with num_threads(threads) as n:
        for _ in range(warmup):
            for k in order:
                fns[k]()
        wait()
        for r in range(runs):
            shift = r % len(order) if rotate else 0
            for k in order[shift:] + order[:shift]:
                t0 = clock()
                fns[k]()
                wait()
                times[k].append((clock() - t0) * 1e3)
    device = _device_label(sync)
    return {k: _timing(times[k], warmup, n, k, device) for k in order}


def measure_pair(
    fn_a: Callable[[], Any],
    fn_b: Callable[[], Any],
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    sync: Sync = None,
    runtimes: tuple[str, str] = ("a", "b"),
    clock: Clock = time.perf_counter,
) -> tuple[Timing, Timing]:
    """Time two callables side by side: A, B, A, B, ... (warm-up too), one median each.

    Both see the same machine load, so ``speedup(a, b)`` stays honest on a busy machine. The
    statistic is each side's median over the same interleaved runs (see the module docstring).

    Args:
        fn_a, fn_b: the two callables (e.g. the original and the compressed model).
        runs: timed calls of each.
        warmup, threads, sync, clock: as in :func:`measure`.
        runtimes: the labels of the two results.

    Returns:
        ``(timing_a, timing_b)``.

    Raises:
        ConfigError: bad ``runs`` / ``warmup`` / ``threads``. Nothing ran.
    """
    a, b = runtimes
    if a == b:
        raise ConfigError(f"runtimes must be two different labels; got {runtimes!r}")
    out = measure_interleaved({a: fn_a, b: fn_b}, runs=runs, warmup=warmup, threads=threads, sync=sync,
                              rotate=False, clock=clock)
    return out[a], out[b]


def speedup(baseline: Timing, candidate: Timing) -> float:
    """How many times faster ``candidate`` runs than ``baseline``: the ratio of their medians.

    ``> 1`` means the candidate is faster; ``inf`` when the candidate's median is 0.

    Example:
        >>> base = Timing(10.0, 9.0, 11.0, 5, 1, 1, "cpu")
        >>> speedup(base, Timing(4.0, 3.5, 4.5, 5, 1, 1, "cpu"))
        2.5
    """
    if candidate.median_ms <= 0:
        return math.inf
    return baseline.median_ms / candidate.median_ms
