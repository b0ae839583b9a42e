"""Observers give the ranges they promise on known inputs."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize.observers import OBSERVERS, make_observer
from torchslim.quantize.primitives import QScheme, fake_quantize

ASYM = QScheme(symmetric=False, signed=False)


def test_minmax_and_moving_average() -> None:
    mm = make_observer("minmax", ASYM)
    ma = make_observer("moving_average", ASYM, momentum=0.5)
    for batch in (torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 4.0])):
        mm.update(batch)
        ma.update(batch)
    assert [float(v) for v in mm.range()] == [-3.0, 4.0]
    assert [float(v) for v in ma.range()] == [-2.0, 3.0]


def test_minmax_per_channel() -> None:
    obs = make_observer("minmax", QScheme(granularity="channel"))
    obs.update(torch.tensor([[1.0, -2.0], [5.0, 3.0]]))
    lo, hi = obs.range()
    assert lo.flatten().tolist() == [-2.0, 3.0] and hi.flatten().tolist() == [1.0, 5.0]


def test_percentile_on_uniform_values() -> None:
    obs = make_observer("percentile", ASYM, percentile=99.0)
    obs.update(torch.arange(0, 10001, dtype=torch.float32))
    lo, hi = obs.range()
    assert abs(float(lo) - 100) < 1 and abs(float(hi) - 9900) < 1


@pytest.mark.parametrize("name", ["entropy", "mse", "percentile"])
def test_clipping_observers_ignore_an_outlier(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(200_000)
    x[0] = 100.0
    obs = make_observer(name, QScheme(bits=8))
    obs.update(x)
    lo, hi = obs.range()
    assert 1.5 < float(hi) < 20.0  # far below the outlier, above the bulk
    scale, zp = obs.qparams()
    mm = make_observer("minmax", QScheme(bits=8))
    mm.update(x)
    s2, z2 = mm.qparams()
    bulk = x[1:]
    err = (fake_quantize(bulk, scale, zp, QScheme(bits=8)) - bulk).pow(2).mean()
    err_mm = (fake_quantize(bulk, s2, z2, QScheme(bits=8)) - bulk).pow(2).mean()
    assert err < err_mm  # a clipped range quantizes the bulk better


def test_mse_per_channel_never_worse_than_minmax() -> None:
    w = torch.randn(8, 64)
    w[:, 0] = 20.0
    s = QScheme(bits=4, granularity="channel")
    obs, mm = make_observer("mse", s), make_observer("minmax", s)
    obs.update(w)
    mm.update(w)
    e1 = (fake_quantize(w, *obs.qparams(), s) - w).pow(2).mean()
    e2 = (fake_quantize(w, *mm.qparams(), s) - w).pow(2).mean()
    assert e1 <= e2 + 1e-9


def test_registry_and_bad_names() -> None:
    assert {f"quantize.observer.{n}" for n in OBSERVERS} <= set(ts.list_methods("quantize"))
    with pytest.raises(ConfigError, match="unknown observer"):
        make_observer("kl", ASYM)
    with pytest.raises(ConfigError, match="per tensor"):
        make_observer("entropy", QScheme(granularity="channel"))
    with pytest.raises(ConfigError, match="saw no data"):
        make_observer("minmax", ASYM).range()
