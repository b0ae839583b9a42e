"""Damaged inputs are errors, not crashes (issue #25).

Every reader of a file a user gives torchslim turns damage (truncation, a flipped bit, foreign
bytes, an empty file, wrong JSON types) into one TorchslimError subclass whose message is one
line naming the file; the CLI then exits 2 with that line and no traceback.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import torchslim as ts
from torchslim import saving
from torchslim.errors import CheckpointError, TorchslimError
from torchslim.recipe import RecipeError

# ---- damage ------------------------------------------------------------------------------------


def _truncate_half(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _truncate_7(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:7])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _random_same_size(p: Path) -> None:
    p.write_bytes(random.Random(p.name).randbytes(p.stat().st_size))


def _random_short(p: Path) -> None:
    p.write_bytes(random.Random(p.name).randbytes(1000))


def _flip_at(p: Path, offset: int, bit: int = 3) -> None:
    data = bytearray(p.read_bytes())
    data[offset] ^= 1 << bit
    p.write_bytes(bytes(data))


def _flip_middle(p: Path) -> None:
    _flip_at(p, p.stat().st_size // 2)


def _flip_tensor_data(p: Path) -> None:
    """One bit in the middle of a safetensors file's tensor bytes (past its JSON header)."""
    data = p.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    assert start < len(data)
    _flip_at(p, start + (len(data) - start) // 2)


BYTE_DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated-half": _truncate_half,
    "truncated-7-bytes": _truncate_7,
    "empty": _empty,
    "random-bytes": _random_same_size,
    "random-short": _random_short,
}


def _one_line_naming(exc: BaseException, name: str) -> str:
    msg = str(exc)
    assert isinstance(exc, TorchslimError), f"{type(exc).__name__} is not a TorchslimError: {msg}"
    assert "\n" not in msg and "\r" not in msg, f"message spans lines: {msg!r}"
    assert name in msg, f"{name!r} not named in: {msg}"
    assert "Traceback" not in msg
    return msg


# ---- ts.save / ts.load -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = ts.create_model("zoo:lenet300", data="digits", seed=0)
    return model, ts.save(model, tmp_path_factory.mktemp("saved") / "m")


@pytest.fixture
def saved(original, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(original[1], d)
    return d


def _without_record(d: Path) -> Path:
    """The folder as a torchslim from before the integrity record wrote it."""
    meta = json.loads((d / "plan.json").read_text())
    del meta[saving.FILES_KEY]
    (d / "plan.json").write_text(json.dumps(meta, indent=2))
    return d


def _assert_same(model: torch.nn.Module, loaded: torch.nn.Module) -> None:
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x, y = ts.example_inputs(model), ts.example_inputs(loaded)
    assert len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y))


def test_save_records_size_and_sha256_and_loads_bit_identically(original, saved) -> None:
    import hashlib

    meta = json.loads((saved / "plan.json").read_text())
    record = meta[saving.FILES_KEY]
    assert sorted(record) == ["example_inputs.safetensors", "model.safetensors"]
    for name, entry in record.items():
        data = (saved / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _assert_same(original[0], ts.load(saved))


def test_folder_without_integrity_record_still_loads(original, saved) -> None:
    _assert_same(original[0], ts.load(_without_record(saved)))


@pytest.mark.parametrize("name", ["model.safetensors", "example_inputs.safetensors"])
@pytest.mark.parametrize("damage", [*BYTE_DAMAGE, "bit-flip-in-tensor-data"])
def test_damaged_safetensors_is_one_checkpoint_error(saved, name: str, damage: str) -> None:
    path = saved / name
    (BYTE_DAMAGE.get(damage) or _flip_tensor_data)(path)
    with pytest.raises(CheckpointError) as info:
        ts.load(saved)
    msg = _one_line_naming(info.value, str(path))
    if damage in ("truncated-half", "truncated-7-bytes", "empty"):
        assert f"truncated: {path.stat().st_size} bytes, expected" in msg
    if damage in ("bit-flip-in-tensor-data", "random-bytes"):
        assert "sha256 does not match the one recorded in plan.json" in msg


@pytest.mark.parametrize("name", ["model.safetensors", "example_inputs.safetensors"])
@pytest.mark.parametrize("damage", list(BYTE_DAMAGE))
def test_damaged_safetensors_without_record_is_one_checkpoint_error(saved, name: str, damage: str) -> None:
    """Older folders have no digests: the safetensors parser's complaint becomes the error."""
    _without_record(saved)
    BYTE_DAMAGE[damage](saved / name)
    with pytest.raises(CheckpointError) as info:
        ts.load(saved)
    _one_line_naming(info.value, str(saved / name))


def test_missing_recorded_file_is_named(saved) -> None:
    (saved / "example_inputs.safetensors").unlink()
    with pytest.raises(CheckpointError, match="is missing") as info:
        ts.load(saved)
    _one_line_naming(info.value, "example_inputs.safetensors")


def _edit_plan(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(p: Path) -> None:
        meta = json.loads(p.read_text())
        out = edit(meta)
        p.write_text(json.dumps(meta if out is None else out))

    return apply


PLAN_DAMAGE: dict[str, Callable[[Path], None]] = {
    **BYTE_DAMAGE,
    "bit-flip": _flip_middle,
    "not-an-object": _edit_plan(lambda m: [m]),
    "no-model": _edit_plan(lambda m: m.pop("model") and None),
    "model-is-3": _edit_plan(lambda m: m.update(model=3)),
    "model-kind-is-a-list": _edit_plan(lambda m: m["model"].update(kind=["zoo"])),
    "plans-is-a-string": _edit_plan(lambda m: m["model"].update(plans="prune")),
    "plan-is-a-number": _edit_plan(lambda m: m["model"].update(plans=[7])),
    "build-is-a-list": _edit_plan(lambda m: m["model"].update(build=[1, 2])),
    "build-wrong-values": _edit_plan(lambda m: m["model"]["build"].update(input_shape="big")),
    "version-is-text": _edit_plan(lambda m: m.update(version="one")),
    "example-inputs-is-3": _edit_plan(lambda m: m.update(example_inputs=3)),
    "example-args-negative": _edit_plan(lambda m: m["example_inputs"].update(args=-1)),
    "example-args-too-many": _edit_plan(lambda m: m["example_inputs"].update(args=4)),
    "example-tree-names-a-missing-tensor": _edit_plan(lambda m: m["example_inputs"]["tree"].update(args=[{"tensor": "arg9"}])),
    "example-tree-entry-unknown": _edit_plan(lambda m: m["example_inputs"]["tree"].update(args=[{"pickle": 1}])),
    "files-is-a-list": _edit_plan(lambda m: m.update(files=[])),
    "sha256-not-hex": _edit_plan(lambda m: m["files"]["model.safetensors"].update(sha256="zz")),
}


@pytest.mark.parametrize("damage", list(PLAN_DAMAGE))
def test_damaged_plan_json_is_one_checkpoint_error(saved, damage: str) -> None:
    PLAN_DAMAGE[damage](saved / "plan.json")
    with pytest.raises(CheckpointError) as info:
        ts.load(saved)
    name = "example_inputs.safetensors" if damage == "example-tree-names-a-missing-tensor" else "plan.json"
    _one_line_naming(info.value, name)


def test_weights_of_another_shape(original, saved, tmp_path) -> None:
    other = ts.save(ts.create_model("zoo:lenet300", data="mnist", seed=0), tmp_path / "other")
    shutil.copy(other / "model.safetensors", saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="sha256|bytes, expected") as info:
        ts.load(saved)  # the record says it is not the file that was saved
    _one_line_naming(info.value, "model.safetensors")
    with pytest.raises(CheckpointError, match="do not fit the rebuilt model") as info:
        ts.load(_without_record(saved))  # without one, the shapes do not fit
    _one_line_naming(info.value, "model.safetensors")


@pytest.mark.parametrize(("name", "damage"), [
    ("model.safetensors", "bit-flip-in-tensor-data"),
    ("model.safetensors", "truncated-7-bytes"),
    ("example_inputs.safetensors", "random-short"),
    ("plan.json", "truncated-half"),
    ("plan.json", "model-is-3"),
])
def test_cli_exits_2_with_one_line(saved, capsys, name: str, damage: str) -> None:
    from torchslim.cli import main

    fn = {**PLAN_DAMAGE, "bit-flip-in-tensor-data": _flip_tensor_data}[damage]
    fn(saved / name)
    capsys.readouterr()
    assert main(["profile", str(saved), "--no-latency", "--json"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchslim: error: ") and name in lines[0], err


# ---- training checkpoints (last.pt) ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from torchslim.train import TrainConfig, fit

    d = tmp_path_factory.mktemp("ckpt")
    fit(ts.create_model("zoo:lenet300", data="digits", seed=0), "digits", TrainConfig(epochs=1),
        checkpoint_dir=d, progress=False)
    assert (d / "last.pt").is_file()
    return d / "last.pt"


def _resume(ckpt_dir: Path) -> None:
    from torchslim.train import TrainConfig, fit

    fit(ts.create_model("zoo:lenet300", data="digits", seed=0), "digits", TrainConfig(epochs=2),
        checkpoint_dir=ckpt_dir, resume=True, progress=False)


class _NotWeights:
    pass


CKPT_DAMAGE: dict[str, Callable[[Path], None]] = {
    **BYTE_DAMAGE,
    "bit-flip-middle": _flip_middle,
    "bit-flip-at-30-percent": lambda p: _flip_at(p, p.stat().st_size * 3 // 10),
    "other-torch-file": lambda p: torch.save({"weights": torch.ones(3)}, p),
    "pickled-object": lambda p: torch.save({"format": "x", "obj": _NotWeights()}, p),
}


@pytest.mark.parametrize("damage", list(CKPT_DAMAGE))
def test_damaged_training_checkpoint_is_one_checkpoint_error(trained, tmp_path, damage: str) -> None:
    path = tmp_path / "last.pt"
    shutil.copy(trained, path)
    CKPT_DAMAGE[damage](path)
    with pytest.raises(CheckpointError) as info:
        _resume(tmp_path)
    msg = _one_line_naming(info.value, str(path))
    assert "resume=False" in msg  # says what to do
    if damage.startswith("bit-flip"):
        assert "damaged" in msg
    assert "weights_only" not in msg  # never advises loading unsafely


def test_checkpoint_written_with_crc_off_still_resumes(trained, tmp_path) -> None:
    """Checksums are checked when the file has them; torch can be told not to write them."""
    from torch.utils.serialization import config

    payload = torch.load(trained, weights_only=True)
    with config.patch({"save.compute_crc32": False}):
        torch.save(payload, tmp_path / "last.pt")
    _resume(tmp_path)


# ---- recipes, recipe runs (state.json) -------------------------------------------------------


RECIPE_DAMAGE: dict[str, bytes] = {
    "binary": bytes(range(256)) * 4,
    "truncated-7-bytes": b"version",
    "empty": b"",
    "top-level-list": b"- prune_channels: {ratio: 0.5}\n",
    "top-level-scalar": b"42\n",
    "control-characters": b"stages: [\x00]\n",
}


@pytest.mark.parametrize("damage", list(RECIPE_DAMAGE))
def test_damaged_recipe_is_one_recipe_error(tmp_path, damage: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(RECIPE_DAMAGE[damage])
    with pytest.raises(RecipeError) as info:
        ts.load_recipe(str(path))
    msg = _one_line_naming(info.value, str(path))
    if damage == "binary":
        assert "is not a text (UTF-8 YAML) file" in msg


def _edit_state(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    return _edit_plan(edit)


STATE_DAMAGE: dict[str, Callable[[Path], None]] = {
    **BYTE_DAMAGE,
    "not-an-object": _edit_state(lambda s: [s]),
    "version-is-text": _edit_state(lambda s: s.update(version="1")),
    "stages-is-a-number": _edit_state(lambda s: s.update(stages=3)),
    "stage-without-label": _edit_state(lambda s: s["stages"].append({"index": 1})),
    "original-is-a-list": _edit_state(lambda s: s.update(original=[])),
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_damaged_compress_state_is_one_checkpoint_error(tmp_path, damage: str) -> None:
    recipe = {"stages": [{"sparsify": {"sparsity": 0.5}}]}
    out = tmp_path / "run"
    out.mkdir()
    state = out / "state.json"
    state.write_text(json.dumps({"version": 1, "recipe": {}, "model": "zoo:lenet300", "data": None,
                                 "original": None, "stages": []}))
    STATE_DAMAGE[damage](state)
    with pytest.raises(CheckpointError) as info:
        ts.compress("zoo:lenet300", recipe, out=out, resume=True, progress=False, latency=False)
    msg = _one_line_naming(info.value, str(state))
    assert "--force" in msg


# ---- packed models (.tslim) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(original, tmp_path_factory) -> Path:
    return ts.pack(original[0], tmp_path_factory.mktemp("packed") / "m.tslim", bits=4).path


@pytest.mark.parametrize("damage", [*BYTE_DAMAGE, "bit-flip-middle", "bit-flip-header", "bit-flip-last-byte",
                                    "one-byte-appended"])
def test_damaged_tslim_is_one_checkpoint_error(packed, tmp_path, damage: str) -> None:
    from torchslim.pack import read_header

    path = tmp_path / "m.tslim"
    shutil.copy(packed, path)
    more = {
        "bit-flip-middle": _flip_middle,
        "bit-flip-header": lambda p: _flip_at(p, 30),
        "bit-flip-last-byte": lambda p: _flip_at(p, p.stat().st_size - 1),
        "one-byte-appended": lambda p: p.write_bytes(p.read_bytes() + b"\0"),
    }
    (BYTE_DAMAGE.get(damage) or more[damage])(path)
    with pytest.raises(CheckpointError) as info:
        ts.unpack(path)
    msg = _one_line_naming(info.value, str(path))
    if damage.startswith("truncated"):
        assert "truncated" in msg
    if damage not in ("bit-flip-middle", "bit-flip-last-byte"):  # read_header checks the header, not the payload
        with pytest.raises(CheckpointError):
            read_header(path)


# ---- ONNX files given to ONNX Runtime --------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from torchslim.export.onnx import export_fp32

    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    return Path(export_fp32(model, (torch.randn(1, 16),), tmp_path_factory.mktemp("onnx") / "m.onnx"))


@pytest.mark.parametrize("damage", list(BYTE_DAMAGE))
def test_damaged_onnx_is_one_checkpoint_error(onnx_file, tmp_path, damage: str) -> None:
    from torchslim.export.ort import ort_run

    path = tmp_path / "m.onnx"
    shutil.copy(onnx_file, path)
    BYTE_DAMAGE[damage](path)
    with pytest.raises(CheckpointError) as info:
        ort_run(path, torch.ones(1, 16))
    _one_line_naming(info.value, str(path))
    with pytest.raises(CheckpointError, match="does not exist") as info:
        ort_run(tmp_path / "missing.onnx", torch.ones(1, 16))
    _one_line_naming(info.value, "missing.onnx")


# ---- search studies (study.db) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def study_db(tmp_path_factory) -> Path:
    optuna = pytest.importorskip("optuna")
    from torchslim.search._storage import open_storage, sqlite_url

    d = tmp_path_factory.mktemp("study")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=open_storage(sqlite_url(d)), study_name="s")
    study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=2)
    return d / "study.db"


@pytest.mark.parametrize("damage", ["truncated-half", "truncated-7-bytes", "random-bytes", "random-short"])
def test_damaged_study_db_is_one_checkpoint_error(study_db, tmp_path, damage: str) -> None:
    from torchslim.search._storage import open_storage, sqlite_url

    path = tmp_path / "study.db"
    shutil.copy(study_db, path)
    BYTE_DAMAGE[damage](path)
    with pytest.raises(CheckpointError) as info:
        open_storage(sqlite_url(tmp_path))
    _one_line_naming(info.value, str(path.resolve()))


def test_undamaged_study_db_opens(study_db, tmp_path) -> None:
    import optuna

    from torchslim.search._storage import open_storage, sqlite_url

    shutil.copy(study_db, tmp_path / "study.db")
    assert len(optuna.load_study(study_name="s", storage=open_storage(sqlite_url(tmp_path))).trials) == 2
    assert os.path.getsize(tmp_path / "study.db") > 0


@pytest.mark.parametrize("edit", ["model-is-3", "unknown-plan", "layer-entry-is-a-list", "aliases-is-a-list",
                                  "layer-bits-text"])
def test_tslim_with_a_malformed_header_is_one_checkpoint_error(packed, tmp_path, edit: str) -> None:
    """Checksums pass (the file is as written) but the header is not one pack() writes."""
    from torchslim.pack.fileformat import container_bytes, read_container

    cont = read_container(packed)
    header = {k: v for k, v in cont.header.items() if k not in ("streams", "format", "version")}
    layer = next(iter(header["layers"]))
    if edit == "model-is-3":
        header["model"] = 3
    elif edit == "unknown-plan":
        header["model"] = dict(header["model"], plans=[{"kind": "teleport"}])
    elif edit == "layer-entry-is-a-list":
        header["layers"][layer] = [1, 2]
    elif edit == "aliases-is-a-list":
        header["raw"] = {"aliases": [1]}
    else:
        header["layers"][layer] = dict(header["layers"][layer], bits="four")
    path = tmp_path / "m.tslim"
    path.write_bytes(container_bytes(header, cont.streams)[0])
    with pytest.raises(CheckpointError) as info:
        ts.unpack(path)
    _one_line_naming(info.value, str(path))
