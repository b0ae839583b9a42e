"""Where the C kernel comes from: the object ``pip install`` built, else a build on first use, else torch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchslim.binarize import _ckernel
from torchslim.binarize.kernel import c_kernel_status, resolve_backend, xnor_matmul
from torchslim.binarize.packing import pack_signs

ROOT = Path(__file__).resolve().parents[2]
_CC = _ckernel._compiler()
needs_cc = pytest.mark.skipif(_CC is None, reason="no C compiler here")
needs_checkout = pytest.mark.skipif(
    not (ROOT / "setup.py").is_file() or importlib.util.find_spec("setuptools") is None,
    reason="needs a source checkout and setuptools",
)


@pytest.fixture(autouse=True)
def _fresh_state(tmp_path, monkeypatch):
    """Every test looks for the kernel afresh, with an empty cache; the real one is found again after."""
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHSLIM_NO_CEXT", raising=False)
    _ckernel._reset()
    yield
    _ckernel._reset()


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").rglob("*.so"))


def _fake_installed(tmp_path: Path, monkeypatch, defines: list[tuple[str, str]] | None = None) -> Path:
    path = tmp_path / "site" / "_xnor.so"
    flags = ("-O3",)
    _ckernel.compile_shared(_CC, flags, path, defines=_ckernel.build_defines(flags) if defines is None else defines)
    monkeypatch.setattr(_ckernel, "installed_path", lambda: path)
    return path


def _check_gemm() -> None:
    a, b = torch.randint(0, 2, (5, 70)).float() * 2 - 1, torch.randint(0, 2, (3, 70)).float() * 2 - 1
    out = xnor_matmul(pack_signs(a, 64), pack_signs(b, 64), 70, backend="c")
    assert torch.equal(out.float(), a @ b.T)


@needs_cc
def test_installed_object_is_used_not_the_cache_build(tmp_path, monkeypatch):
    path = _fake_installed(tmp_path, monkeypatch)
    st = c_kernel_status()
    assert st["available"] and st["source"] == "installed" and st["path"] == str(path)
    _check_gemm()
    assert _cache_files(tmp_path) == []  # nothing was compiled on first use


@needs_cc
@pytest.mark.parametrize(
    "defines,why",
    [
        ([("TORCHSLIM_XNOR_SOURCE_KEY", '"0123456789abcdef"'), ("TORCHSLIM_XNOR_CPU_KEY", '"portable"')], "another version"),
        (None, "other features"),  # -march=native for another CPU: filled in below
        ([], "another version"),  # built without keys at all
    ],
)
def test_installed_object_that_does_not_fit_falls_back_to_the_cache_build(tmp_path, monkeypatch, defines, why):
    if defines is None:
        defines = [("TORCHSLIM_XNOR_SOURCE_KEY", f'"{_ckernel.source_key()}"'), ("TORCHSLIM_XNOR_CPU_KEY", '"0000000000000000"')]
    monkeypatch.setattr(_ckernel, "FLAG_SETS", (("-O3",),))  # the quickest cache build
    path = _fake_installed(tmp_path, monkeypatch, defines)
    st = c_kernel_status()
    assert st["available"] and st["source"] == "cache" and st["path"] != str(path)
    assert why in st["installed_error"]
    assert [str(p) for p in _cache_files(tmp_path)] == [st["path"]]
    _check_gemm()


def test_without_installed_object_or_compiler_torch_runs(monkeypatch):
    monkeypatch.setattr(_ckernel, "installed_path", lambda: None)
    monkeypatch.setattr(_ckernel, "_compiler", lambda: None)
    st = c_kernel_status()
    assert not st["available"] and st["source"] == "" and "no C compiler" in st["error"]
    assert "installed without it" in st["installed_error"]
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_no_cext_disables_the_installed_object_too(monkeypatch):
    monkeypatch.setenv("TORCHSLIM_NO_CEXT", "1")
    st = c_kernel_status()
    assert not st["available"] and "TORCHSLIM_NO_CEXT" in st["error"]


@needs_cc
def test_this_install_built_the_kernel_object(tmp_path):
    installed = _ckernel.installed_path()
    if installed is None:
        pytest.skip("this torchslim was installed before setup.py built the C kernel: reinstall (pip install -e .)")
    st = c_kernel_status()
    assert st["source"] == "installed" and st["path"] == str(installed), st
    assert _cache_files(tmp_path) == []


def _setup_build_ext(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@needs_checkout
@needs_cc
def test_setup_py_builds_an_object_the_loader_accepts(tmp_path):
    proc = _setup_build_ext(tmp_path, {})
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = list((tmp_path / "lib").rglob("_xnor*"))
    assert len(built) == 1 and built[0].parent.name == "binarize"
    _ckernel._open_installed(built[0])  # keys match this source and CPU


@needs_checkout
def test_setup_py_survives_a_failing_compiler(tmp_path):
    proc = _setup_build_ext(tmp_path, {"CC": "false", "LDSHARED": "false"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the C XNOR kernel was not built" in proc.stderr
    assert not list((tmp_path / "lib").rglob("_xnor*"))
