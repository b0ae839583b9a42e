"""torch.export programs (.pt2): round trips, dynamic batch, capture failures named."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.export import ExportError, export

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def test_zoo_model_round_trips_with_dynamic_batch(tmp_path):
    model = ts.create_model("zoo:resnet20")
    result = export(model, path=tmp_path / "resnet20.pt2")
    assert result.format == "pt2" and result.info["dynamic_batch"] is True
    assert result.parity.ok and result.parity.max_abs <= 1e-5
    assert any(c.batch == 3 for c in result.parity.cases)  # the other-batch case was run
    program = torch.export.load(str(result.path)).module()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), atol=1e-5, rtol=1e-5)


def test_torchvision_model_round_trips(tmp_path):
    model = ts.create_model("torchvision:resnet18", num_classes=10)
    ts.set_example_inputs(model, torch.randn(1, 3, 64, 64))
    result = export(model, path=tmp_path / "resnet18.pt2", random_inputs=1)
    assert result.parity.ok and result.parity.max_abs <= 1e-4


class _PinnedBatch(torch.nn.Module):
    def forward(self, x):
        return x.view(1, 4) * 2  # only works for batch 1


def test_model_that_pins_its_batch_is_exported_static(tmp_path):
    result = export(_PinnedBatch(), (torch.randn(1, 4),), tmp_path / "p.pt2")
    assert result.info["dynamic_batch"] is False and result.info["static_reason"]
    assert result.parity.ok and all(c.batch == 1 for c in result.parity.cases)


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_capture_failure_names_format_and_reason(tmp_path):
    old = tmp_path / "d.pt2"
    old.write_bytes(b"previous export")
    with pytest.raises(ExportError) as err:
        export(_DataDependent(), (torch.randn(2, 4),), old)
    assert str(err.value).startswith("pt2 export of _DataDependent failed")
    assert "data-dependent" in str(err.value)
    assert err.value.format == "pt2"
    # the file that was there is untouched, and no staging leftovers
    assert old.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.pt2"]
