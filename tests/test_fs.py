"""Publishing results: atomic replace of files and folders, and what a kill at any step leaves.

The kill tests run ``torchslim prune BASE --out NAME --force`` in a child process whose file-system
steps are wrapped so that the process dies (``os._exit``, no cleanup, like SIGKILL) at one chosen
point of the replace; the parent then checks what ``ts.load(NAME)`` finds.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torchslim as ts
from torchslim import _fs
from torchslim._cli_common import writing
from torchslim.errors import CheckpointError


def test_replace_path_swaps_folders_and_files(tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("new")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "old-only").write_text("old")
    _fs.replace_path(tmp_path / "new", tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # the old copy is gone, nothing hidden left
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["a"]
    (tmp_path / "f").write_text("new file")
    _fs.replace_path(tmp_path / "f", tmp_path / "dst")  # a file onto a folder
    assert (tmp_path / "dst").read_text() == "new file"


def test_replace_path_without_exchange_uses_two_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(a: Path, b: Path) -> None:
        raise OSError(errno.ENOSYS, "no renameat2")

    monkeypatch.setattr(_fs, "_exchange", unsupported)
    (tmp_path / "new").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "x").write_text("old")
    _fs.replace_path(tmp_path / "new", tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"] and not any((tmp_path / "dst").iterdir())


def test_writing_removes_its_copy_and_the_folders_it_made_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "result"
    with pytest.raises(RuntimeError), writing(out) as tmp:
        tmp.mkdir()
        (tmp / "half").write_text("half-written")
        raise RuntimeError("the work failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "mine").write_text("a user's file")
    with pytest.raises(RuntimeError), writing(tmp_path / "keep") as tmp:
        tmp.mkdir()
        raise RuntimeError("the work failed")
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]
    assert (tmp_path / "keep" / "mine").read_text() == "a user's file"


# ---- a kill at each step of a --force replace ------------------------------------------------------
_CHILD = textwrap.dedent("""
    import errno, os, sys
    from torchslim import _fs
    from torchslim.cli import main

    step = sys.argv[1]
    real_exchange, real_rename, real_remove = _fs._exchange, os.rename, _fs.remove_path

    def die():
        os._exit(137)  # no finally blocks, no cleanup: as SIGKILL

    if step == "before_publish":
        _fs.replace_path = lambda src, dst: die()
    elif step == "after_exchange":
        def exchange(a, b):
            real_exchange(a, b)
            die()
        _fs._exchange = exchange
    else:  # the fallback of systems without renameat2(RENAME_EXCHANGE)
        def unsupported(a, b):
            raise OSError(errno.ENOSYS, "no renameat2")
        _fs._exchange = unsupported
        if step == "between_renames":
            def rename(a, b):
                real_rename(a, b)
                if ".previous-" in str(b):
                    die()
            _fs.os.rename = rename
        elif step == "after_renames":
            def remove(p):
                if ".previous-" in str(p):
                    die()
                real_remove(p)
            _fs.remove_path = remove
    sys.exit(main(sys.argv[2:]))
""")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kill")
    ts.save(ts.create_model("zoo:lenet300", data="digits", seed=0), root / "base")
    return root


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return ts.load(path).state_dict()


@pytest.mark.parametrize("step", ["before_publish", "after_exchange", "between_renames", "after_renames"])
def test_a_kill_during_a_forced_replace_loses_nothing(step: str, models: Path, tmp_path: Path) -> None:
    name = tmp_path / "pruned"
    old = ts.create_model("zoo:lenet300", data="digits", seed=1)
    ts.save(old, name)
    old_weights = _weights(name)
    argv = ["prune", str(models / "base"), "--ratio", "0.5", "--no-latency", "--json", "--out", str(name), "--force"]
    done = subprocess.run([sys.executable, "-c", _CHILD, step, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 137, done.stderr[-2000:]
    if step == "between_renames":  # no copy under the name: the reader names both survivors
        with pytest.raises(CheckpointError) as exc:
            ts.load(name)
        message = str(exc.value)
        assert "\n" not in message and "interrupted" in message
        previous = next(tmp_path.glob(".pruned.previous-*"))
        new = next(tmp_path.glob(".pruned.new-*"))
        assert str(previous) in message and str(new) in message
        assert all(torch.equal(a, b) for a, b in zip(_weights(previous).values(), old_weights.values()))
        os.rename(new, name)  # following the pointer gives the complete new model
        assert ts.load(name).fc1.out_features == 150
        return
    loaded = ts.load(name)  # a complete model under the name: the old one, or the new one
    if step == "before_publish":
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old_weights.values()))
    else:
        assert loaded.fc1.out_features == 150  # the pruned model (300 -> 150 channels)
