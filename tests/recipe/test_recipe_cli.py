"""``torchslim compress`` on the command line: exit codes, one-line errors before any work, the JSON,
resume after a real kill, and the HTML report rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from torchslim.cli import main

TINY = {"epochs": 1, "max_steps_per_epoch": 3, "batch_size": 32}


def _recipe(tmp_path: Path, stages: list, goals: dict | None = None, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"finetune": TINY, "stages": stages, "goals": goals or {}}))
    return str(path)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("stages", "goals", "needle"),
    [
        ([{"prune_channels": {"ratio": 0.5}}, {"distil": {}}], None, "stage 2: unknown stage 'distil' (did you mean 'distill'?)"),
        ([{"quantize": {"mode": "static", "bitz": 8}}], None, "stage 1 (quantize): unknown field 'bitz' (did you mean 'bits'?)"),
        ([{"finetune": {"epochs": "many"}}], None, "stage 1 (finetune): field 'epochs'"),
        ([{"quantize": {"mode": "dynamic"}}], {"target_macs": 0.5}, "goals: field 'target_macs': impossible goal"),
    ],
)
def test_bad_recipe_exit_2_one_line_before_any_work(stages, goals, needle, tmp_path: Path, capsys) -> None:
    path = _recipe(tmp_path, stages, goals)
    out_dir = tmp_path / "out"
    code, out, err = _run(["compress", "zoo:lenet5", "--recipe", path, "--data", "mnist", "--out", str(out_dir)], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and needle in lines[0], err
    assert not out_dir.exists()  # nothing was started


def test_existing_out_refused_without_resume_or_force(tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "x").write_text("keep")
    code, _, err = _run(["compress", "zoo:lenet5", "--recipe", "quantize-int8", "--data", "mnist", "--out", str(out_dir)], capsys)
    assert code == 2 and "already exists" in err and "--resume" in err and "--force" in err
    assert (out_dir / "x").read_text() == "keep"
    code, _, err = _run(["compress", "zoo:lenet5", "--data", "mnist", "--out", str(out_dir), "--resume", "--force"], capsys)
    assert code == 2 and "contradict" in err


def test_missing_data_is_refused(tmp_path: Path, capsys) -> None:
    code, _, err = _run(["compress", "zoo:lenet5", "--recipe", "default", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "need data" in err and "--data" in err


def test_a_model_made_for_bundled_data_trains_on_it_by_default(tmp_path: Path, capsys) -> None:
    path = _recipe(tmp_path, [{"quantize": {"mode": "static", "calibration_batches": 1}}, {"finetune": {}}])
    code, out, err = _run(["compress", "pretrained:mnist_cnn", "--recipe", path, "--out", str(tmp_path / "o"),
                           "--no-latency"], capsys)
    assert code == 0, err
    assert "training / calibration data: mnist (the bundled data pretrained:mnist_cnn is made for" in " ".join(out.split())
    assert json.loads((tmp_path / "o" / "report.json").read_text())["data"] == "mnist"
    # a model with no data of its own is still refused (test_missing_data_is_refused), and --data wins
    code, _, err = _run(["compress", "pretrained:mnist_cnn", "--recipe", path, "--data", "nosuch", "--out",
                         str(tmp_path / "p"), "--no-latency"], capsys)
    assert code == 2 and "nosuch" in err


def test_json_is_the_common_shape_with_stages_goals_and_onnx_files(tmp_path: Path, capsys) -> None:
    path = _recipe(tmp_path, [{"prune_channels": {"ratio": 0.5}}, {"finetune": {}},
                              {"export": {"batch_sizes": [1], "runs": 3}}], {"target_macs": 0.5, "max_accuracy_drop": 1.0})
    code, out, err = _run(["compress", "zoo:lenet5", "--recipe", path, "--data", "mnist", "--out",
                           str(tmp_path / "o"), "--json", "--no-latency"], capsys)
    assert code == 0, err
    rep = json.loads(out)  # stdout holds only the JSON
    for key in ("model", "data", "before", "after", "accuracy_before", "accuracy_after", "files", "stages", "goals"):
        assert key in rep
    assert rep["model"] == "zoo:lenet5" and rep["data"] == "mnist"
    assert rep["after"]["macs"] < rep["before"]["macs"]
    assert [s["kind"] for s in rep["stages"]] == ["original", "prune_channels", "finetune", "export"]
    assert all("ratios" in s and "accuracy" in s for s in rep["stages"])
    macs = next(g for g in rep["goals"] if g["name"] == "target_macs")
    assert macs["met"] == (rep["after"]["macs"] / rep["before"]["macs"] <= 0.5)
    assert Path(rep["files"]["onnx"]).is_file() and Path(rep["files"]["onnx_original"]).is_file()
    assert Path(rep["files"]["report_html"]).is_file()
    assert (tmp_path / "o" / "resolved_recipe.yaml").is_file()


def _state(out: Path) -> dict:
    try:
        return json.loads((out / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def test_killed_run_resumes_to_the_same_report(tmp_path: Path) -> None:
    """A real SIGKILL during stage 2 (distill), then --resume: same accuracies and sizes as a run never stopped."""
    stages = [{"prune_channels": {"ratio": 0.5}}, {"distill": {"train": {"epochs": 3, "max_steps_per_epoch": 12}}},
              {"quantize": {"mode": "dynamic"}}]
    path = _recipe(tmp_path, stages)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import torchslim as ts

    model_dir = tmp_path / "lenet5"  # one fixed starting model for every process
    ts.save(ts.create_model("zoo:lenet5", data="mnist"), model_dir)

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torchslim", "compress", str(model_dir), "--recipe", path, "--data", "mnist",
                "--out", str(out), "--json", "--no-latency", "--quiet", *extra]

    full = subprocess.run(cmd(tmp_path / "full"), capture_output=True, text=True, env=env, timeout=600)
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    proc = subprocess.Popen(cmd(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until stage 2 is under way (its training checkpoint exists)
        if (cut / "stages" / "02-distill" / "train.checkpoint" / "last.pt").exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [s["label"] for s in _state(cut).get("stages", [])] == ["01-prune_channels"], "kill came too late"
    refused = subprocess.run(cmd(cut), capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    resumed = subprocess.run(cmd(cut, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(full.stdout), json.loads(resumed.stdout)

    def figures(rep: dict) -> list:
        return [(s["label"], s["accuracy"], s["params"], s["macs"], s["size_bytes"]) for s in rep["stages"]]

    assert figures(a) == figures(b)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:  # the test setup installs it
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], env=env,
                       capture_output=True, timeout=900)
        return shutil.which("chromium")
    return None


def test_report_html_renders_in_headless_chromium(tmp_path: Path, capsys) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium and no apt-get as root to install it")
    path = _recipe(tmp_path, [{"prune_channels": {"ratio": 0.5}}, {"finetune": {}},
                              {"export": {"formats": ["onnx"], "batch_sizes": [1], "runs": 5}}],
                   {"max_accuracy_drop": 1.0, "target_size": 0.9})
    out = tmp_path / "o"
    assert main(["compress", "zoo:lenet5", "--recipe", path, "--data", "mnist", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    html_path = out / "report.html"
    # Chromium parses and lays out the page, runs a script that reports what rendered, and dumps the DOM
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace(
        "</body>",
        "<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
        "document.body.setAttribute('data-probe',JSON.stringify({tables:document.querySelectorAll('table').length,"
        "rows:document.querySelectorAll('#stages tbody tr').length,"
        "head:document.getElementById('headline').getBoundingClientRect().bottom,screen:window.innerHeight,"
        "first:document.querySelector('#headline li').textContent,"
        "goals:[...document.querySelectorAll('#goals tbody tr')].map(r=>r.textContent),"
        "images:imgs.length,decoded:imgs.filter(i=>i.complete&&i.naturalWidth>0).length}));});</script></body>"))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--window-size=1280,800", "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    import re

    m = re.search(r"data-probe=\"([^\"]+)\"", dom.stdout)
    assert m, dom.stdout[:2000]
    import html as html_text

    probe_data = json.loads(html_text.unescape(m.group(1)))
    assert probe_data["tables"] >= 3 and probe_data["rows"] == 4  # original + 3 stages
    # the headline (what ships, and the goals) is the first thing on the page, inside the first screen
    assert 0 < probe_data["head"] <= probe_data["screen"] <= 800, probe_data  # the window less its frame
    assert re.match(r"ONNX in ONNX Runtime: \d+\.\d\dx smaller \(.*KiB -> .*KiB\), .* at batch 1, accuracy ", probe_data["first"])
    assert any(g.startswith("accuracy dropat most 100.00 points") and "points" in g for g in probe_data["goals"])
    assert any(g.startswith("sizeat most 0.90 of the original (1.11x smaller)") for g in probe_data["goals"])
    assert probe_data["images"] >= 2 and probe_data["decoded"] == probe_data["images"]  # every embedded PNG decodes
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2000", html_path.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000  # a page with content, not blank
