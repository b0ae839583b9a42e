"""Every table the public API returns prints as plain text (and still renders on a rich console)."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

import torchslim as ts


def _check(table) -> None:
    text = str(table)
    assert "<rich" not in text and "object at 0x" not in text
    assert "\x1b[" not in text  # no colour codes under print()
    buf = io.StringIO()
    Console(file=buf, width=120).print(table)
    assert buf.getvalue().strip()


def test_binary_summary_and_search_space_print_as_text() -> None:
    from torchslim.binarize import BinarizeConfig, binarize_
    from torchslim.binarize._summary import summary
    from torchslim.search.space import build_space

    model = ts.create_model("zoo:lenet300", data="digits", seed=0)
    _check(build_space(model, ts.example_inputs(model)).table())
    binarize_(model, BinarizeConfig(method="xnor"))
    _check(summary(model).table())


def test_wanda_after_cluster_is_refused_before_any_change() -> None:
    from torchslim.errors import ConfigError
    from torchslim.pack import cluster_
    from torchslim.prune.wanda import wanda_

    model = ts.create_model("zoo:lenet300", data="digits", seed=0)
    cluster_(model, bits=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="wanda_ cannot take 'fc1'.*cluster_"):
        wanda_(model, sparsity=0.5, calibration=[torch.randn(4, 1, 8, 8)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
