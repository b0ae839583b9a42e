"""The XNOR-popcount GEMM in C (OpenMP, hardware popcount), loaded through :mod:`ctypes`.

The C source is ``_xnor.c`` next to this file. :func:`load` looks for the kernel in this order:

1. **installed**: the object ``pip install`` built (``setup.py`` compiles ``_xnor.c`` as the
   extension module ``torchslim.binarize._xnor``, into the package, editable installs included),
   used when its build keys match this source and, for a ``-march=native`` build, this CPU;
2. **cache**: built on first use with the system C compiler (``$CC``, ``cc``, ``gcc``, ``clang``)
   into ``$TORCHSLIM_CACHE/kernels`` (default ``~/.cache/torchslim/kernels``), named by a hash
   of the source, the flags and the CPU's feature flags (``-march=native`` code is never reused
   on another CPU);
3. none: :func:`load` returns ``None`` and the kernel falls back to the torch backend.

``TORCHSLIM_NO_CEXT=1`` disables both (at install time too). :func:`status` says which one runs.

This module imports nothing but the standard library at the top: ``setup.py`` loads it on its own
(before torch or torchslim can be imported) to share the flags and build keys.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["load", "status", "xnor_gemm", "pack_f32", "installed_path", "build_defines", "FLAG_SETS"]

SOURCE_PATH = Path(__file__).with_name("_xnor.c")
EXTENSION_NAME = "_xnor"  # torchslim.binarize._xnor, built by setup.py
NATIVE_FLAG = "-march=native"
PORTABLE = "portable"
# tried in order, both at install time and for the cache build (which adds -shared -fPIC)
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", NATIVE_FLAG, "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"lib": None, "tried": False, "error": "", "path": "", "source": "", "installed_error": ""}


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_text() -> str:
    """The C source of the kernel."""
    return SOURCE_PATH.read_text()


def source_key() -> str:
    """Hash of the C source (an object built from other source is never used)."""
    return _hash(source_text())


def cpu_key() -> str:
    """Hash of this CPU's feature flags and architecture (what ``-march=native`` code depends on)."""
    return _hash(_cpu_flags() + platform.machine())


def build_defines(flags: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """The ``-D`` macros that record an object's build keys (checked by :func:`load`)."""
    cpu = cpu_key() if NATIVE_FLAG in flags else PORTABLE
    return [("TORCHSLIM_XNOR_SOURCE_KEY", f'"{source_key()}"'), ("TORCHSLIM_XNOR_CPU_KEY", f'"{cpu}"')]


def installed_path() -> Path | None:
    """The kernel object ``pip install`` built into the package, if there is one."""
    here = SOURCE_PATH.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{EXTENSION_NAME}{suffix}"
        if path.is_file():
            return path
    return None


def _cache_dir() -> Path:
    root = os.environ.get("TORCHSLIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "torchslim")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def compile_shared(
    cc: str, flags: tuple[str, ...] | list[str], dest: Path, *, defines: list[tuple[str, str]] | None = None
) -> None:
    """Compile ``_xnor.c`` into the shared object ``dest`` (written to a temp name, then renamed).

    Raises:
        RuntimeError: the compiler failed (its last line of output is in the message).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="torchslim-cc-") as tmp:
        so = Path(tmp) / "xnor.so"
        cmd = [cc, *flags, "-shared", "-fPIC", *(f"-D{k}={v}" for k, v in defines or ()), str(SOURCE_PATH), "-o", str(so)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise RuntimeError(f"{cc} {' '.join(flags)}: {last[0]}")
        part = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copy(so, part)
        os.replace(part, dest)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.xnor_gemm.restype = None
    lib.xnor_gemm.argtypes = [ctypes.c_void_p] * 4 + [
        ctypes.c_int64, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
    ]
    lib.pack_f32.restype = None
    lib.pack_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib


def _open_installed(path: Path) -> ctypes.CDLL:
    """Open the installed object after checking its build keys (``RuntimeError`` says why not)."""
    try:
        lib = ctypes.CDLL(str(path))
        lib.torchslim_xnor_source_key.restype = ctypes.c_char_p
        lib.torchslim_xnor_cpu_key.restype = ctypes.c_char_p
        built_source = lib.torchslim_xnor_source_key().decode()
        built_cpu = lib.torchslim_xnor_cpu_key().decode()
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"cannot read its build keys ({exc})") from exc
    if built_source != source_key():
        raise RuntimeError("it was built from another version of _xnor.c (reinstall torchslim to rebuild it)")
    if built_cpu not in (PORTABLE, cpu_key()):
        raise RuntimeError(f"it was built with {NATIVE_FLAG} on a CPU with other features")
    return _open(path)


def _build() -> tuple[ctypes.CDLL, Path]:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    text = source_text()
    errors = []
    for flags in FLAG_SETS:
        path = _cache_dir() / f"xnor_gemm_{_hash(text + ' '.join(flags) + _cpu_flags() + platform.machine())}.so"
        if not path.is_file():
            try:
                compile_shared(cc, flags, path)
            except (RuntimeError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
                continue
        return _open(path), path
    raise RuntimeError("; ".join(errors))


def _reset() -> None:
    """Forget what :func:`load` found (tests)."""
    with _LOCK:
        _STATE.update(lib=None, tried=False, error="", path="", source="", installed_error="")


def load() -> ctypes.CDLL | None:
    """The kernel library (installed, else built once into the cache); ``None`` if neither works."""
    if _STATE["tried"]:
        return _STATE["lib"]
    with _LOCK:
        if not _STATE["tried"]:
            if os.environ.get("TORCHSLIM_NO_CEXT", "") not in ("", "0"):
                _STATE["error"] = "disabled by TORCHSLIM_NO_CEXT"
            else:
                installed = installed_path()
                if installed is not None:
                    try:
                        _STATE.update(lib=_open_installed(installed), path=str(installed), source="installed")
                    except (OSError, RuntimeError) as exc:
                        _STATE["installed_error"] = f"{installed.name}: {exc}"
                else:
                    _STATE["installed_error"] = "torchslim was installed without it (no C compiler at install time?)"
                if _STATE["lib"] is None:
                    try:
                        lib, path = _build()
                        _STATE.update(lib=lib, path=str(path), source="cache")
                    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                        _STATE["error"] = str(exc)
            _STATE["tried"] = True
    return _STATE["lib"]


def status() -> dict[str, Any]:
    """Whether the C kernel is available, which object runs and where, or why not.

    Keys: ``available``; ``source`` (``"installed"``, ``"cache"`` or ``""``); ``path``; ``error``
    (why none is available); ``installed_error`` (why the installed object was not used).
    """
    lib = load()
    return {
        "available": lib is not None, "source": _STATE["source"], "path": _STATE["path"], "error": _STATE["error"],
        "installed_error": _STATE["installed_error"],
    }


def xnor_gemm(a: Any, b: Any, mask: Any, kvalid: Any, k: int, out: Any, threads: int) -> None:
    """Call the C kernel on contiguous CPU int64/int32 tensors (see ``kernel.xnor_matmul``)."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"the C XNOR kernel is not available: {_STATE['error']}")
    M, W = a.shape
    N = b.shape[0]
    lib.xnor_gemm(
        a.data_ptr(), b.data_ptr(), mask.data_ptr() if mask is not None else None,
        kvalid.data_ptr() if kvalid is not None else None, mask.shape[0] if mask is not None else 1,
        int(k), M, N, W, out.data_ptr(), int(threads),
    )


def pack_f32(x: Any, threads: int) -> Any:
    """64-bit packed signs of the rows of a contiguous 2-D float32 CPU tensor (see ``packing.pack_signs``)."""
    import torch

    lib = load()
    if lib is None:
        raise RuntimeError(f"the C XNOR kernel is not available: {_STATE['error']}")
    rows, k = x.shape
    out = torch.empty(rows, -(-k // 64), dtype=torch.int64)
    lib.pack_f32(x.data_ptr(), rows, k, out.data_ptr(), int(threads))
    return out
