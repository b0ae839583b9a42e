"""Profile depends on nothing above it: size estimators plug in, remembered inputs read from the record."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError, SpecError
from torchslim.profile import api as profile_api
from torchslim.profile import register_size_estimator


def test_size_estimator_fills_its_field_and_unknown_fields_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(profile_api, "_SIZE_ESTIMATORS", {})
    model = torch.nn.Linear(4, 2)
    assert ts.profile(model, torch.randn(1, 4), latency=False).packed_bytes is None
    register_size_estimator("packed_bytes", lambda m: 123)
    assert ts.profile(model, torch.randn(1, 4), latency=False).packed_bytes == 123
    assert ts.profile(model, torch.randn(1, 4), latency=False, size=False).packed_bytes is None
    with pytest.raises(ConfigError, match="unknown size field 'zipped'"):
        register_size_estimator("zipped", lambda m: 1)
    with pytest.raises(ConfigError, match="estimator must be callable"):
        register_size_estimator("packed_bytes", 3)  # type: ignore[arg-type]


def test_pack_registers_its_estimator() -> None:
    from torchslim.pack.api import packed_size_if_clustered

    assert profile_api._SIZE_ESTIMATORS["packed_bytes"] is packed_size_if_clustered


def test_remembered_inputs_are_read_from_the_record() -> None:
    model = torch.nn.Linear(4, 2)
    with pytest.raises(SpecError, match="does not remember example inputs"):
        ts.profile(model, latency=False)
    ts.set_example_inputs(model, torch.randn(1, 4))
    assert ts.profile(model, latency=False).input_shapes == [[1, 4]]


def test_latency_states_spread_threads_and_cpu() -> None:
    before = torch.get_num_threads()
    lat = ts.profile(torch.nn.Linear(4, 2), torch.randn(1, 4), runs=5, warmup=1, size=False, threads=1).latency_ms
    assert torch.get_num_threads() == before
    assert lat.runs == 5 and lat.warmup == 1 and lat.threads == 1 and lat.cpu
    assert lat.min <= lat.p10 <= lat.p25 <= lat.median <= lat.p75 <= lat.p90 <= lat.max
    d = lat.to_dict()
    assert {"median", "p10", "p90", "p25", "p75", "threads", "cpu"} <= set(d)


def test_tables_render_from_profile() -> None:
    from rich.console import Console

    from torchslim.report import profile_table

    p = ts.profile(torch.nn.Linear(4, 2), torch.randn(1, 4), runs=3, warmup=0)
    console = Console(record=True, width=160)
    console.print(p.table())
    text = console.export_text()
    assert "p25" in text and "latency" in text
    assert profile_table(p) is not None
    assert "params" in p.summary()
