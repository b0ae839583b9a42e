"""Build and drive the C++ runner (``cpp/main.cpp``) that runs a TorchScript file with libtorch.

The runner is compiled with CMake against the libtorch inside the installed torch wheel, once
per torch version and source revision, into a cache directory (``$TORCHSLIM_CACHE`` or
``~/.cache/torchslim``). CMake's ``find_package(Torch)`` is tried first; a CUDA build of torch
makes that step look for a CUDA toolkit, so when it fails the runner is configured again
linking the wheel's CPU libraries directly (``-DTORCHSLIM_TORCH_DIR``); ``build_info.json``
beside the binary says which way was used.

Tensors travel through files in the small raw ``TSLT`` format that ``main.cpp`` documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.export._base import ExportError
from torchslim.export.parity import ParityReport, Tolerance, check_parity
from torchslim.graph.inputs import Inputs, as_inputs

__all__ = ["SOURCES", "build_runner", "run_runner", "check_cpp", "write_tensors", "read_tensors"]

SOURCES = Path(__file__).with_name("cpp")
_MAGIC = b"TSLT"
_CODES = {torch.float32: 0, torch.float64: 1, torch.int64: 2, torch.int32: 3, torch.bool: 4, torch.float16: 5}
_NP = {0: np.float32, 1: np.float64, 2: np.int64, 3: np.int32, 4: np.bool_, 5: np.float16}


def write_tensors(path: Path, tensors: Sequence[torch.Tensor]) -> None:
    """Write tensors in the runner's ``TSLT`` format."""
    with open(path, "wb") as f:
        f.write(_MAGIC + struct.pack("<II", 1, len(tensors)))
        for t in tensors:
            if t.dtype not in _CODES:
                raise ConfigError(f"the C++ runner takes {', '.join(map(str, _CODES))} tensors; got {t.dtype}")
            t = t.detach().cpu().contiguous()
            f.write(struct.pack("<II", _CODES[t.dtype], t.dim()))
            f.write(struct.pack(f"<{t.dim()}q", *t.shape))
            f.write(t.numpy().tobytes())


def read_tensors(path: Path) -> list[torch.Tensor]:
    """Read a ``TSLT`` file written by the runner."""
    data = Path(path).read_bytes()
    if data[:4] != _MAGIC:
        raise ExportError(f"{path} is not a TSLT tensor file", format="torchscript-cpp", reason="bad output file")
    _, count = struct.unpack_from("<II", data, 4)
    pos, out = 12, []
    for _ in range(count):
        code, ndim = struct.unpack_from("<II", data, pos)
        pos += 8
        shape = struct.unpack_from(f"<{ndim}q", data, pos)
        pos += 8 * ndim
        dtype = np.dtype(_NP[code])
        n = int(np.prod(shape)) if ndim else 1
        arr = np.frombuffer(data, dtype=dtype, count=n, offset=pos).reshape(shape)
        pos += n * dtype.itemsize
        out.append(torch.from_numpy(arr.copy()))
    return out


def _cache_root() -> Path:
    return Path(os.environ.get("TORCHSLIM_CACHE") or Path.home() / ".cache" / "torchslim")


def _source_hash() -> str:
    h = hashlib.sha256()
    for name in ("CMakeLists.txt", "main.cpp"):
        h.update((SOURCES / name).read_bytes())
    return h.hexdigest()[:12]


def _cmake(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _tail(proc: subprocess.CompletedProcess[str], lines: int = 6) -> str:
    text = (proc.stderr or "") + (proc.stdout or "")
    errs = [ln for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines()
    return " | ".join(ln.strip() for ln in errs[-lines:])


def build_runner(build_dir: str | os.PathLike[str] | None = None, *, timeout: float = 600.0) -> Path:
    """Compile the C++ runner (once; later calls return the cached binary).

    Returns:
        The path of the ``torchslim_runner`` executable.

    Raises:
        ExportError: cmake or a C++ compiler is missing, or the build failed (the message has
            the compiler's last error lines).
    """
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        missing.append("a C++ compiler")
    if missing:
        raise ExportError(f"building the C++ runner needs {' and '.join(missing)}, not found on PATH",
                          format="torchscript-cpp", reason="no toolchain")
    final = Path(build_dir) if build_dir else _cache_root() / f"cpp-runner-{torch.__version__}-{_source_hash()}"
    binary = final / "torchslim_runner"
    if binary.is_file():
        return binary
    final.parent.mkdir(parents=True, exist_ok=True)
    torch_dir = Path(torch.__file__).parent
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        attempts = [
            ("find_package", [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]),
            ("direct", [f"-DTORCHSLIM_TORCH_DIR={torch_dir}",
                        f"-DTORCHSLIM_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]),
        ]
        notes: dict[str, str] = {}
        for mode, extra in attempts:
            bdir = work / mode
            proc = _cmake(["cmake", "-S", str(SOURCES), "-B", str(bdir), *generator, *extra], work, timeout)
            if proc.returncode != 0:
                notes[mode] = "configure failed: " + _tail(proc, 2)
                continue
            proc = _cmake(["cmake", "--build", str(bdir), "--parallel", "2"], work, timeout)
            if proc.returncode != 0:
                notes[mode] = "build failed: " + _tail(proc)
                continue
            (bdir / "build_info.json").write_text(json.dumps({"mode": mode, "torch": torch.__version__,
                                                              "failed_attempts": notes}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(bdir, final)
            return binary
    raise ExportError("the C++ runner did not build: " + "; ".join(f"{k}: {v}" for k, v in notes.items()),
                      format="torchscript-cpp", reason="build failed")


def run_runner(binary: Path, model_path: Path, tensors: Sequence[torch.Tensor], *, runs: int = 0,
               threads: int | None = None, timeout: float = 300.0) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Run the C++ runner on ``tensors``; returns its outputs and its report (``median_ms`` with ``runs``)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        write_tensors(src, tensors)
        proc = subprocess.run([str(binary), str(model_path), str(src), str(dst), str(int(runs))],
                              capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if proc.returncode != 0:
            raise ExportError(f"the C++ runner failed on {model_path}: {proc.stderr.strip()[-400:]}",
                              format="torchscript-cpp", reason="runner failed")
        return read_tensors(dst), json.loads(proc.stdout.strip().splitlines()[-1])


def check_cpp(model: nn.Module, model_path: str | os.PathLike[str], example_inputs: Any = None, *,
              tolerance: Any = None, random_inputs: int = 2, binary: Path | None = None, seed: int = 0) -> ParityReport:
    """Parity of a TorchScript file run by libtorch from C++ (no Python in that process).

    Args:
        model: the PyTorch model the file was exported from.
        model_path: the TorchScript file (``ts.export(..., format="torchscript")``).
        example_inputs: positional tensor inputs (default: the model's remembered inputs).
        tolerance: as for ``ts.export`` (default atol = rtol = 1e-5).
        random_inputs: random input sets besides the example.
        binary: a runner already built (default: :func:`build_runner`).

    Raises:
        ConfigError: keyword or non-tensor inputs (the runner takes positional tensors).
        ExportError: the runner cannot be built or fails.
    """
    if example_inputs is None:
        from torchslim._modelinfo import example_inputs as remembered

        example_inputs = remembered(model)
    inputs = as_inputs(example_inputs).to("cpu")
    if inputs.kwargs or len(inputs.tensors()) != len(inputs.args):
        raise ConfigError("the C++ runner takes positional tensor inputs only; got keyword or non-tensor inputs")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ConfigError("check_cpp compares on the CPU: move the model to the CPU first")
    exe = binary or build_runner()

    def run(case: Inputs) -> list[torch.Tensor]:
        return run_runner(exe, Path(model_path), case.tensors())[0]
    return check_parity(model, run, inputs, format="torchscript-cpp", tolerance=Tolerance.coerce(tolerance, (1e-5, 1e-5)),
                        random_cases=random_inputs, seed=seed)
