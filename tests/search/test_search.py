"""``torchslim search`` end to end on SQLite: JSON shape, recipe and model written, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import torchslim as ts
from torchslim.cli import main
from torchslim.errors import ConfigError
from torchslim.search import SearchConfig, search

DATA = "synthetic:1x1x28x28:n=160"
FAST = ["--finetune-steps", "2", "--startup-trials", "2", "--final-epochs", "1", "--no-progress", "--json"]


def _run(capsys: pytest.CaptureFixture, args: list[str]) -> tuple[int, dict | None, str]:
    code = main(["search", "zoo:lenet5", "--data", DATA, *args])
    cap = capsys.readouterr()
    return code, (json.loads(cap.out) if code == 0 and cap.out.strip() else None), cap.err


def _study(out: Path):  # noqa: ANN202
    import optuna

    return optuna.load_study(study_name="torchslim-search", storage=f"sqlite:///{out / 'study.db'}")


def test_cli_json_recipe_model_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    common = ["--budget", "macs=0.3", "--out", str(out), *FAST]
    code, payload, err = _run(capsys, ["--trials", "2", *common])
    assert code == 0, err
    assert payload["trials"]["complete"] + payload["trials"]["pruned"] == 2
    best = payload["best"]
    assert set(best["values"]) == {"accuracy"} and best["metrics"]["macs"] <= 0.3
    assert payload["pareto"] and all(Path(p["recipe"]).is_file() for p in payload["pareto"])
    assert best["trial"] in {p["trial"] for p in payload["pareto"]}
    for key in ("before", "after", "accuracy_before", "accuracy_after", "files"):
        assert key in payload
    for name in ("trials.csv", "trials.json", "pareto.json", "pareto.png", "search.json", "study.db"):
        assert (out / name).is_file()
    # the recipe is valid for `torchslim compress` and prunes per group
    from torchslim.recipe import load_recipe

    recipe = load_recipe(best["recipe"])
    assert [s.kind for s in recipe.stages][:2] == ["prune_channels", "finetune"]
    # the saved best model is within budget and loads
    model = ts.load(best["model"])
    base = ts.profile(ts.create_model("zoo:lenet5", input_shape=(1, 28, 28)), latency=False, size=False).macs
    assert ts.profile(model, latency=False, size=False).macs / base <= 0.3

    # an existing output directory is refused without --resume, and nothing changes
    kept = [(t.number, t.params, t.values) for t in _study(out).trials]
    code, _, err = _run(capsys, ["--trials", "4", *common])
    assert code == 2 and "--resume" in err
    assert len(_study(out).trials) == 2
    # --resume continues the same study to 4 trials, the first 2 kept as they were
    code, second, err = _run(capsys, ["--trials", "4", "--resume", "--no-best-model", *common])
    assert code == 0, err
    trials = _study(out).trials
    assert second["trials"]["complete"] + second["trials"]["pruned"] == 4 == len(trials)
    assert [(t.number, t.params, t.values) for t in trials[:2]] == kept


def test_multi_objective_front_is_non_dominated(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, payload, err = _run(capsys, ["--objective", "accuracy,size", "--budget", "macs=0.8", "--trials", "4",
                                       "--bits", "4,8", "--ranks", "0.5,1", "--out", str(tmp_path / "m"),
                                       "--no-best-model", *FAST])
    assert code == 0, err
    front = [(p["values"]["accuracy"], p["values"]["size"]) for p in payload["pareto"]]
    assert front
    for a, m in front:
        assert not any(a2 >= a and m2 <= m and (a2, m2) != (a, m) for a2, m2 in front)
    trials = json.loads((tmp_path / "m" / "trials.json").read_text())
    done = [t for t in trials if t["state"] == "complete"]
    assert done and all(set(t["layer_bits"]) == {"classifier.0", "classifier.2", "classifier.4"} for t in done)
    assert all(set(t["ranks"]) == {"features.0", "features.3", "classifier.0", "classifier.2", "classifier.4"}
               for t in done)
    header = (tmp_path / "m" / "trials.csv").read_text().splitlines()[0].split(",")
    assert "rank:classifier.0" in header and "bits:classifier.0" in header


def test_searched_ranks_go_into_the_recipe_and_compress_rebuilds_the_model(tmp_path: Path) -> None:
    import yaml
    from torch import nn

    data = ts.load_data(DATA)
    model = ts.create_model("zoo:lenet5")
    cfg = SearchConfig(ranks=(0.5,), bits=(4, 8), finetune_steps=2, startup_trials=2, final_epochs=0)
    result = search(model, data, budget="macs=0.3", trials=2, out=tmp_path / "r", config=cfg, progress=False)
    best = result.study.trials[result.best["trial"]]
    factorized = best.user_attrs["factorized"]
    assert factorized and set(factorized) <= set(best.user_attrs["ranks"])
    assert 0.3 * 0.98 <= best.user_attrs["metrics"]["macs"] <= 0.3  # channels repaired to the budget
    recipe = yaml.safe_load(Path(result.best["recipe"]).read_text())
    kinds = [next(iter(st)) for st in recipe["stages"]]
    assert kinds[0] == "prune_channels" and kinds[-1] == "quantize" and "factorize" in kinds
    stages = [st["factorize"] for st in recipe["stages"] if "factorize" in st]
    assert len({(st["method"], st["rank"]) for st in stages}) == len(stages)  # one stage per method and rank
    assert sorted(n for st in stages for n in st["modules"]) == sorted(factorized)  # exact names
    # ts.compress of the written recipe rebuilt the very model the trial measured
    assert result.report["best_model"]["built_by"] == "ts.compress"
    base = ts.profile(model, latency=False, size=False).macs
    assert result.report["after"]["macs"] / base == pytest.approx(best.user_attrs["metrics"]["macs"], rel=1e-9)
    built = result.model
    assert all(isinstance(built.get_submodule(name), nn.Sequential) for name in factorized)
    bits = next(st["quantize"] for st in recipe["stages"] if "quantize" in st).get("layer_bits", {})
    names = {n for n, _ in built.named_modules()}
    assert set(bits) <= names  # a factorized layer's bits name the layers it became


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--budget", "macs=0.001"], "cannot be met"),
        (["--budget", "macs=0"], "(0, 1]"),
        (["--budget", "speed=0.5"], "not known"),
        (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open storage"),
        (["--storage", "not-a-url"], "not a database URL"),
        (["--objective", "speed"], "not known"),
        (["--bits", "four"], "--bits"),
        (["--ranks", "0.5,2"], "(0, 1]"),
        (["--ranks", "half"], "--ranks"),
        (["--ranks", "0.5", "--conv-rank-method", "cp"], "conv_rank_method"),
    ],
)
def test_bad_input_fails_before_any_trial(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                          needle: str) -> None:
    out = tmp_path / "bad"
    code, _, err = _run(capsys, ["--trials", "2", "--out", str(out), *args, *FAST])
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written, no study created


def test_empty_space_fails_before_any_trial(tmp_path: Path) -> None:
    import torch

    model = ts.create_model("zoo:lenet300", input_shape=(8,))
    data = ts.load_data("synthetic:1x8:n=40")
    with pytest.raises(ConfigError, match="empty"):
        search(model, data, out=tmp_path / "e", config=SearchConfig(skip=("*",), trials=1), progress=False,
               example_inputs=torch.randn(1, 8))
    assert not (tmp_path / "e").exists()


def test_python_api_bn_proxy_static_bits_and_latency(tmp_path: Path) -> None:
    from torch import nn

    data = ts.load_data("synthetic:1x3x8x8:n=48")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3), nn.BatchNorm2d(12),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))
    cfg = SearchConfig(evaluation="bn", bn_batches=2, batch_size=8, startup_trials=2, final_epochs=0, bits=(4, 8),
                       quant_mode="static")
    result = search(model, data, budget={"params": 0.5}, objectives="accuracy,latency", trials=2, out=tmp_path / "p",
                    config=cfg, progress=False, best_model=False, example_inputs=data.example_batch(1))
    assert result.trials["complete"] + result.trials["pruned"] == 2
    assert result.best is not None and result.best["metrics"]["params"] <= 0.5
    assert result.best["values"]["latency"] > 0 and (tmp_path / "p" / "pareto.png").is_file()
    assert result.model is None and Path(result.best["recipe"]).is_file()
    best = result.study.trials[result.best["trial"]]
    assert set(best.user_attrs["layer_bits"]) == {"0", "3", "8"}  # both convs and the linear, statically
    assert "quantize" in Path(result.best["recipe"]).read_text()
