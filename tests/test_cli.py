"""The command line: JSON shapes, saved directories as specs, and exit code 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from torchslim.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_profile_zoo_json(capsys) -> None:
    code, out, err = run(capsys, "profile", "zoo:lenet300", "--json", "--runs", "3")
    assert code == 0, err
    d = json.loads(out)
    assert d["params"] == 266_610 and d["macs"] == 266_200
    assert d["latency_ms"]["median"] > 0 and d["latency_ms"]["runs"] == 3
    for key in ("flops", "size_bytes", "unsupported_ops", "layers", "nonzero_params"):
        assert key in d


def test_profile_table_output(capsys) -> None:
    code, out, _ = run(capsys, "profile", "zoo:resnet20", "--no-latency")
    assert code == 0
    assert "Layers" in out and "MACs" in out and "Conv2d" in out


def test_profile_user_file(capsys, tmp_path) -> None:
    f = tmp_path / "my_model.py"
    f.write_text(
        textwrap.dedent(
            """
            import torch
            def build():
                return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
            def example_inputs():
                return torch.randn(1, 3, 10, 10)
            """
        )
    )
    code, out, err = run(capsys, "profile", f"{f}:build", "--json", "--no-latency")
    assert code == 0, err
    assert json.loads(out)["macs"] == 4 * 8 * 8 * 3 * 9


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("torchslim: error:")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["profile", "torchvision:resnet5O", "--json"], "did you mean"),
        (["profile", "zoo:nope"], "zoo"),
        (["profile", "zoo:lenet300", "--input-shape", "1,3,32,32"], "does not fit"),
        (["profile", "zoo:lenet300", "--input-shape", "1,a"], "input shape"),
        (["profile", "zoo:lenet300", "--device", "cuda:7"], "--device"),
        (["train", "zoo:lenet300", "--data", "imagenet", "--out", "x"], "imagenet"),
        (["profile"], "MODEL"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, needle) -> None:
    if "--device" in argv:
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    _, err = capsys.readouterr()
    assert code == 2
    line = _one_error_line(err)
    assert needle.lower() in line.lower()


def test_file_without_factory_and_forward_that_raises(capsys, tmp_path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        textwrap.dedent(
            """
            import torch
            class Bad(torch.nn.Module):
                def forward(self, x):
                    raise RuntimeError('this model is broken')
            def bad():
                return Bad()
            """
        )
    )
    code, _, err = run(capsys, "profile", f"{f}:build")
    assert code == 2 and "no function 'build'" in _one_error_line(err)
    code, _, err = run(capsys, "profile", f"{f}:bad")
    assert code == 2 and "this model is broken" in _one_error_line(err)


def test_train_then_profile_saved_dir(capsys, tmp_path) -> None:
    out = tmp_path / "trained"
    code, stdout, err = run(
        capsys, "train", "zoo:lenet300", "--data", "mnist", "--epochs", "1", "--max-steps", "30",
        "--out", str(out), "--json", "--no-progress",
    )
    assert code == 0, err
    d = json.loads(stdout)
    assert 0.5 < d["accuracy"] <= 1.0
    assert os.path.isfile(d["files"]["weights"]) and os.path.isfile(d["files"]["plan"])
    code, stdout, err = run(capsys, "profile", str(out), "--json", "--no-latency")
    assert code == 0, err
    assert json.loads(stdout)["params"] == 266_610


def test_entry_point_resnet50_json() -> None:
    # the installed console script / module entry, as a new user runs it
    proc = subprocess.run(
        [sys.executable, "-m", "torchslim", "profile", "torchvision:resnet50", "--json", "--runs", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["params"] == 25_557_032
    assert abs(d["macs"] / 1e9 - 4.089) < 0.0005
    assert d["latency_ms"]["median"] > 0


def test_list(capsys) -> None:
    code, out, _ = run(capsys, "list", "--json")
    d = json.loads(out)
    assert code == 0 and "zoo:lenet300" in d["models"] and "mnist" in d["datasets"]


def test_demo_trains_once_then_compresses_with_the_default_recipe(capsys, tmp_path, monkeypatch) -> None:
    import yaml

    import torchslim as ts

    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))
    recipe = ts.load_recipe("default").to_dict()  # the default recipe at test size
    recipe["finetune"].update(epochs=1, max_steps_per_epoch=4)
    recipe["stages"][-1]["export"].update(batch_sizes=[1], runs=3)
    assert recipe["stages"][-1]["export"]["formats"] == ["onnx", "pte", "torch"]  # the demo reports all three
    path = tmp_path / "small-default.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "demo"
    argv = ["demo", "--model", "zoo:lenet5", "--epochs", "1", "--recipe", str(path), "--out", str(out), "--json", "--quiet"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    d = json.loads(stdout)
    assert [s["kind"] for s in d["stages"]] == ["original", "prune_channels", "distill", "quantize", "export"]
    assert d["after"]["params"] < 0.5 * d["before"]["params"] and d["after"]["macs"] < 0.6 * d["before"]["macs"]
    assert os.path.isfile(d["files"]["onnx"]) and os.path.isfile(d["files"]["onnx_original"])
    assert os.path.isfile(d["files"]["pte"]) and d["deployed"]["pte"]["format"] == "pte-int8"
    assert {g["name"] for g in d["goals"]} == {"max_accuracy_drop", "target_size", "target_latency", "not_slower"}
    assert {g["runtime"] for g in d["goals"] if g["name"] == "not_slower"} == {"onnxruntime", "xnnpack", "compile"}
    assert os.path.isfile(out / "report.html") and os.path.isfile(out / "model" / "plan.json")
    cached = list((tmp_path / "cache" / "demo").iterdir())
    assert len(cached) == 1 and (cached[0] / "plan.json").is_file()  # the dense model is cached
    # a second run reuses the cached dense model and the finished run: same figures
    code, stdout2, err = run(capsys, *argv)
    assert code == 0, err
    assert json.loads(stdout2)["stages"] == d["stages"]
    # a run left by another recipe (or an older version's resolved defaults) starts over instead of
    # refusing to resume
    state = json.loads((out / "state.json").read_text())
    state["recipe"]["stages"][0]["prune_channels"]["ratio"] = 0.123
    (out / "state.json").write_text(json.dumps(state))
    code, stdout3, err = run(capsys, *argv)
    assert code == 0, err
    assert json.loads((out / "state.json").read_text())["recipe"] == ts.load_recipe(path).to_dict()



def test_seeded_runs_repeat_byte_for_byte(tmp_path, capsys) -> None:
    """`train` from a model spec with one seed gives byte-identical weights; another seed does not."""
    import hashlib

    import torchslim as ts

    def train(out: str, seed: int) -> str:
        code, _, err = run(capsys, "train", "zoo:lenet300", "--data", "digits", "--epochs", "1", "--seed", str(seed),
                           "--no-progress", "--out", str(tmp_path / out))
        assert code == 0, err
        return hashlib.sha256((tmp_path / out / "model.safetensors").read_bytes()).hexdigest()

    assert train("a", 0) == train("b", 0) != train("c", 1)
    # the model spec itself: same seed, same initial weights; the global random state is untouched
    import torch

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ts.create_model("zoo:lenet300", data="digits", seed=0).state_dict()
    b = ts.create_model("zoo:lenet300", data="digits", seed=0).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
