"""search measures latency in the runtime the budget names (onnxruntime here): contracts only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.cli import main
from torchslim.errors import ConfigError
from torchslim.search import SearchConfig, search


def test_budget_sets_runtime_and_bad_runtime_refused() -> None:
    cfg = SearchConfig(budget=ts.Budget(latency=0.5, runtime="onnxruntime", threads=1))
    assert (cfg.budget, cfg.runtime, cfg.threads) == ({"latency": 0.5}, "onnxruntime", 1)
    with pytest.raises(ConfigError, match="runtime must be one of"):
        SearchConfig(budget="latency=0.5", runtime="tensorrt")


def test_latency_objective_measured_in_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    data = ts.load_data("synthetic:1x3x8x8:n=48")
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10))
    cfg = SearchConfig(evaluation="none", startup_trials=1, final_epochs=0, runtime="onnxruntime", threads=1)
    result = search(model, data, objectives="accuracy,latency", trials=1, out=tmp_path / "s", config=cfg,
                    progress=False, best_model=False, example_inputs=data.example_batch(1))
    done = [t for t in result.study.trials if t.user_attrs.get("latency_runtime")]
    assert done and done[0].user_attrs["latency_runtime"] == "onnxruntime"
    assert done[0].user_attrs["absolute"]["latency_ms"] > 0


def test_cli_bad_runtime_exit_2(capsys, tmp_path: Path) -> None:
    code = main(["search", "zoo:lenet5", "--data", "synthetic:1x28x28:n=32", "--budget", "latency=0.5",
                 "--runtime", "tensorrt", "--out", str(tmp_path / "o"), "--json"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "runtime" in err
    assert torch.get_num_threads() >= 1


def test_cli_target_latency_is_the_latency_bound_and_given_once() -> None:
    import argparse

    from torchslim.search._cli import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    base = ["search", "zoo:lenet5", "--data", "mnist", "--out", "x", "--runtime", "onnxruntime"]
    cfg = config_from_args(parser.parse_args(base + ["--target-latency", "0.6", "--budget", "macs=0.5"]))
    assert cfg.budget == {"macs": 0.5, "latency": 0.6} and cfg.runtime == "onnxruntime"
    with pytest.raises(ConfigError, match="latency bound once"):
        config_from_args(parser.parse_args(base + ["--target-latency", "0.6", "--budget", "latency=0.5"]))
