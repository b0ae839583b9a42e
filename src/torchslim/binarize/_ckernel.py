"""The XNOR-popcount GEMM in C (OpenMP, hardware popcount), built on first use with the system
compiler and loaded through :mod:`ctypes`.

No torch headers, no downloads: one C file, compiled in well under a second by ``cc``/``gcc``
into ``$TORCHSLIM_CACHE`` (default ``~/.cache/torchslim``) under a name keyed by the source, the
flags and the CPU's feature flags (``-march=native`` code is never reused on another CPU). When
no compiler works, :func:`load` returns ``None`` and the kernel falls back to the torch backend;
``TORCHSLIM_NO_CEXT=1`` forces that.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["load", "status", "xnor_gemm", "pack_f32"]

_SOURCE = r"""
#include <stdint.h>

/* out[m, n] = kvalid[m] - 2 * popcount((a[m] ^ b[n]) & mask[m]) over W 64-bit words:
   the dot product of two rows of +-1 entries (bit 1 = +1) whose valid entries the mask marks
   (no mask: all k entries are valid and kvalid[m] = k). Row m uses mask row m % mrows. Rows of b are tiled so that a tile stays
   in cache while every row of a passes over it; rows of a run in parallel. */
#define NT 64
void xnor_gemm(const uint64_t *a, const uint64_t *b, const uint64_t *mask, const int32_t *kvalid,
               int64_t mrows, int32_t k, int64_t M, int64_t N, int64_t W, int32_t *out, int nthreads) {
    for (int64_t n0 = 0; n0 < N; n0 += NT) {
        int64_t n1 = n0 + NT < N ? n0 + NT : N;
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            const uint64_t *ar = a + m * W;
            int32_t kv = kvalid ? kvalid[m % mrows] : k;
            if (mask) {
                const uint64_t *mr = mask + (m % mrows) * W;
                for (int64_t n = n0; n < n1; ++n) {
                    const uint64_t *br = b + n * W;
                    int64_t acc = 0;
                    for (int64_t w = 0; w < W; ++w) acc += __builtin_popcountll((ar[w] ^ br[w]) & mr[w]);
                    out[m * N + n] = kv - 2 * (int32_t)acc;
                }
            } else {
                for (int64_t n = n0; n < n1; ++n) {
                    const uint64_t *br = b + n * W;
                    int64_t acc = 0;
                    for (int64_t w = 0; w < W; ++w) acc += __builtin_popcountll(ar[w] ^ br[w]);
                    out[m * N + n] = kv - 2 * (int32_t)acc;
                }
            }
        }
    }
}

/* Pack the signs of rows of k floats, 64 to a word, bit j of word w = entry 64 w + j >= 0. */
void pack_f32(const float *x, int64_t rows, int64_t k, uint64_t *out, int nthreads) {
    int64_t W = (k + 63) / 64;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * k;
        uint64_t *o = out + r * W;
        for (int64_t w = 0; w < W; ++w) {
            int64_t base = w * 64, end = base + 64 < k ? base + 64 : k;
            uint64_t word = 0;
            for (int64_t j = base; j < end; ++j) word |= (uint64_t)(xr[j] >= 0.0f) << (j - base);
            o[w] = word;
        }
    }
}
"""

_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"],
    ["-O3", "-fopenmp", "-shared", "-fPIC"],
    ["-O3", "-shared", "-fPIC"],
)
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"lib": None, "tried": False, "error": "", "path": ""}


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("TORCHSLIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "torchslim")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256((_SOURCE + " ".join(flags) + _cpu_key() + platform.machine()).encode()).hexdigest()[:16]
        path = _cache_dir() / f"xnor_gemm_{key}.so"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="torchslim-cc-") as tmp:
                src = Path(tmp) / "xnor_gemm.c"
                src.write_text(_SOURCE)
                so = Path(tmp) / "xnor_gemm.so"
                proc = subprocess.run([cc, *flags, str(src), "-o", str(so)], capture_output=True, text=True, timeout=120)
                if proc.returncode != 0:
                    errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
                    continue
                os.replace(shutil.copy(so, path.with_suffix(f".{os.getpid()}.tmp")), path)
        lib = ctypes.CDLL(str(path))
        lib.xnor_gemm.restype = None
        lib.xnor_gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        lib.pack_f32.restype = None
        lib.pack_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        _STATE["path"] = str(path)
        return lib
    raise RuntimeError("; ".join(errors))


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it once per process if needed; ``None`` if impossible."""
    if _STATE["tried"]:
        return _STATE["lib"]
    with _LOCK:
        if not _STATE["tried"]:
            if os.environ.get("TORCHSLIM_NO_CEXT", "") not in ("", "0"):
                _STATE["error"] = "disabled by TORCHSLIM_NO_CEXT"
            else:
                try:
                    _STATE["lib"] = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _STATE["error"] = str(exc)
            _STATE["tried"] = True
    return _STATE["lib"]


def status() -> dict[str, Any]:
    """Whether the C kernel is available, where it was built, or why it is not."""
    lib = load()
    return {"available": lib is not None, "path": _STATE["path"], "error": _STATE["error"]}


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
