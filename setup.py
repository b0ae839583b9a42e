"""Builds torchslim's optional C XNOR-popcount kernel during ``pip install`` (also ``-e``).

All metadata lives in pyproject.toml; this file only adds the extension module
``torchslim.binarize._xnor`` (src/torchslim/binarize/_xnor.c), which the package loads with
ctypes (torchslim/binarize/_ckernel.py). The flags are tried in the order _ckernel.FLAG_SETS lists
(-march=native with OpenMP, then OpenMP, then plain -O3). If none compiles (no compiler, MSVC,
...), the install still succeeds: the package then builds the kernel on first use if it can, or
runs the pure-torch backend. TORCHSLIM_NO_CEXT=1 skips the build.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SOURCE = "src/torchslim/binarize/_xnor.c"


def _load_ckernel():
    # _ckernel imports only the standard library at the top: load the file alone (no torch here)
    spec = importlib.util.spec_from_file_location("_torchslim_ckernel", ROOT / "src/torchslim/binarize/_ckernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildXnorKernel(build_ext):
    """``build_ext`` that tries each flag set in turn and never fails the install."""

    def run(self) -> None:
        self._skipped: list[Extension] = []
        self.force = True  # a second's work: never reuse an object built for other keys from build/
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - e.g. no compiler at all: the package works without it
            self._warn(f"{type(exc).__name__}: {exc}")
            self._skipped = list(self.extensions)

    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("TORCHSLIM_NO_CEXT", "") not in ("", "0"):
            self._warn("skipped (TORCHSLIM_NO_CEXT is set)")
            self._skipped.append(ext)
            return
        ck = _load_ckernel()
        errors = []
        for flags in ck.FLAG_SETS:
            ext.extra_compile_args = list(flags)
            ext.extra_link_args = [f for f in flags if f == "-fopenmp"]
            ext.define_macros = [("TORCHSLIM_XNOR_EXTENSION", "1"), *ck.build_defines(flags)]
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - CompileError, LinkError, a missing compiler ...
                errors.append(f"{' '.join(flags)}: {type(exc).__name__}: {str(exc)[-160:]}")
                continue
            print(f"torchslim: built the C XNOR kernel with {' '.join(flags)}", file=sys.stderr)
            return
        self._warn(" | ".join(errors))
        self._skipped.append(ext)

    def copy_extensions_to_source(self) -> None:
        # editable installs copy the built object into src/; skip what was not built
        skipped = self._skipped
        self.extensions = [e for e in self.extensions if e not in skipped]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = self.extensions + skipped

    @staticmethod
    def _warn(why: str) -> None:
        print(
            f"torchslim: WARNING: the C XNOR kernel was not built ({why}). torchslim works without it: it "
            "builds the kernel on first use if a C compiler is there, else uses the slower torch backend.",
            file=sys.stderr,
        )


setup(
    ext_modules=[Extension("torchslim.binarize._xnor", sources=[SOURCE], optional=True)],
    cmdclass={"build_ext": BuildXnorKernel},
)
