"""Many workers on one PostgreSQL study: one set of trials, no duplicates, a killed worker loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchslim.cli import main

DATA = "synthetic:1x1x28x28:n=400"
ARGS = ["--data", DATA, "--budget", "macs=0.5", "--startup-trials", "2", "--no-progress", "--no-best-model", "--json"]


def _worker(url: str, study: str, out: Path, trials: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torchslim", "search", "zoo:lenet5", *ARGS, "--trials", str(trials),
           "--storage", url, "--study", study, "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _load(url: str, study: str):  # noqa: ANN202
    import optuna

    from torchslim.search._storage import _with_driver  # postgresql:// -> the installed driver

    return optuna.load_study(study_name=study, storage=_with_driver(url))


def test_two_workers_share_one_study(postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    n = 5
    procs = [_worker(postgres_url, "shared", tmp_path / f"w{i}", n, "--finetune-steps", "12") for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, e) in zip(procs, outs):
        assert p.returncode == 0, e
    reports = [json.loads(o) for o, _ in outs]
    study = _load(postgres_url, "shared")
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # one numbering, no duplicates
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) >= n
    workers = {t.user_attrs.get("worker", "").rpartition(":")[2] for t in trials}
    assert workers == {str(p.pid) for p in procs}  # both workers ran trials of this one study
    for r in reports:
        assert r["study"] == "shared" and r["trials"]["complete"] + r["trials"]["pruned"] >= n
    # reproducible from the storage alone: a run with nothing left to do gives the same best and recipe
    code = main(["search", "zoo:lenet5", *ARGS, "--trials", str(n), "--storage", postgres_url, "--study", "shared",
                 "--out", str(tmp_path / "again")])
    again = json.loads(capsys.readouterr().out)
    assert code == 0
    assert len(_load(postgres_url, "shared").trials) == len(trials)  # no new trial
    done = [t for t in trials if t.state.name == "COMPLETE"]
    best = min(done, key=lambda t: (-t.values[0], t.user_attrs["metrics"]["macs"], t.number))
    assert again["best"]["trial"] == best.number and again["best"]["values"]["accuracy"] == best.values[0]
    import yaml

    recipe = yaml.safe_load(Path(again["best"]["recipe"]).read_text())
    ratios = {k: v for k, v in best.user_attrs["ratios"].items() if v > 0}
    assert recipe["stages"][0]["prune_channels"]["ratios"] == ratios
    # each worker reports the best of the trials it saw, which the study's best can only match or beat
    by_number = {t.number: t for t in done}
    for r in reports:
        seen = by_number[r["best"]["trial"]]
        assert r["best"]["values"]["accuracy"] == seen.values[0] <= best.values[0]


def test_killed_worker_trial_is_failed_and_retried(postgres_url: str, tmp_path: Path) -> None:
    url, study = postgres_url, "kill"
    # a trial long enough (1,200 steps on 5,600 training samples) that it is surely still running
    # when the kill lands, even on a quiet machine
    big = ("--data", "synthetic:1x1x28x28:n=8000")
    victim = _worker(url, study, tmp_path / "victim", 1, *big, "--heartbeat", "1", "--finetune-steps", "1200",
                     "--batch-size", "4")
    killed = None
    deadline = time.time() + 120
    try:
        while killed is None and time.time() < deadline and victim.poll() is None:
            time.sleep(0.2)
            try:
                trials = _load(url, study).get_trials(deepcopy=False)
            except KeyError:  # the study does not exist yet
                continue
            running = [t for t in trials if t.state.name == "RUNNING"
                       and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")]
            if running:
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=30)
                killed = running[0].number
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert killed is not None, "the worker never started a trial"
    states = [t.state.name for t in _load(url, study).trials]
    assert states[killed] == "RUNNING", states  # dead, but nobody knows yet
    time.sleep(2.5)  # longer than the grace period (2 heartbeats)
    rescuer = _worker(url, study, tmp_path / "rescuer", 1, *big, "--heartbeat", "1", "--finetune-steps", "5")
    out, err = rescuer.communicate(timeout=240)
    assert rescuer.returncode == 0, err
    trials = _load(url, study).trials
    seen = [(t.number, t.state.name, t.system_attrs) for t in trials]
    assert trials[killed].state.name == "FAIL", seen
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].state.name in ("COMPLETE", "PRUNED"), seen
    assert retried[0].params == trials[killed].params  # the same configuration, run again
    report = json.loads(out)
    assert report["trials"]["failed"] == 1
    assert report["trials"]["complete"] + report["trials"]["pruned"] >= 1
