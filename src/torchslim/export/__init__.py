"""Export: ONNX, TorchScript (loadable from C++), ``torch.export`` programs and ExecuTorch, with parity checks.

``export(model, example_inputs, path)`` writes the artifact (format from the suffix or
``format=``: ``.onnx``, ``.pt``, ``.pt2``, ``.pte``), runs it back in its own runtime on the
example and random inputs, and returns an :class:`ExportResult` holding the files, their sizes
and the :class:`ParityReport`. Other formats plug in with :func:`register_format`.

Int8: models quantized by ``ts.quantize_`` (static / QAT) go to int8 QDQ ONNX
(:mod:`torchslim.export.quantized`), written by the one integer writer
:func:`export_integer_onnx` (int8 QDQ, dynamic int8, int4), which families feed through
:func:`register_onnx_lowering` and :func:`register_integer_scheme`. ExecuTorch programs
(:mod:`torchslim.export.pte`) are lowered to the XNNPACK delegate: ``pte`` in fp32, ``pte-int8``
quantized through PT2E with ExecuTorch's XNNPACK quantizer (a float model, or the float twin of a
quantized one, calibrated on ``calibration=``); a quantized model exported as ``.pte`` goes to
``pte-int8`` by itself.

:func:`bench` times a model in eager PyTorch, ``torch.compile``, TorchScript, ONNX Runtime and
ExecuTorch (XNNPACK), fp32 and int8, in one interleaved table.

Decoder LLMs go to GGUF (llama.cpp, ollama) with :func:`export_gguf` (``.gguf`` with ``export``):
torchslim's int4 / int8 weights are written as Q4_0 / Q8_0 blocks bit for bit
(:mod:`torchslim.export.gguf`).

Example:
    >>> import tempfile, os, torchslim as ts
    >>> from torchslim.export import export
    >>> with tempfile.TemporaryDirectory() as d:
    ...     r = export(ts.create_model("zoo:lenet300"), path=os.path.join(d, "m.pt"))
    >>> r.format, r.info["method"], r.parity.ok
    ('torchscript', 'trace', True)
"""

from torchslim.export import _cli  # noqa: E402,F401  (registers the export CLI verbs)
from torchslim.export import onnx as _onnx  # noqa: F401  (each format module registers its format)
from torchslim.export import pt2 as _pt2  # noqa: F401
from torchslim.export import quantized as _quantized  # noqa: F401
from torchslim.export import torchscript as _torchscript  # noqa: F401
from torchslim.export._base import ExportError, Format, get_format, list_formats, register_format
from torchslim.export.api import ExportResult, export
from torchslim.export.bench import BenchResult, BenchRow, bench  # the function shadows the module name
from torchslim.export.gguf import export_gguf, gguf_scheme, read_gguf_weights
from torchslim.export.onnx import export_onnx
from torchslim.export.onnx_int import (
    IntegerScheme,
    OnnxLowering,
    export_integer_onnx,
    register_integer_scheme,
    register_onnx_lowering,
)
from torchslim.export.parity import (
    ParityCase,
    ParityError,
    ParityReport,
    Tolerance,
    check_parity,
    random_inputs,
)

__all__ = [
    "BenchResult",
    "BenchRow",
    "ExportError",
    "ExportResult",
    "Format",
    "IntegerScheme",
    "OnnxLowering",
    "ParityCase",
    "ParityError",
    "ParityReport",
    "Tolerance",
    "bench",
    "check_parity",
    "export",
    "export_gguf",
    "export_integer_onnx",
    "export_onnx",
    "get_format",
    "gguf_scheme",
    "list_formats",
    "random_inputs",
    "read_gguf_weights",
    "register_format",
    "register_integer_scheme",
    "register_onnx_lowering",
]

from torchslim._registry import import_modules as _import_modules  # noqa: E402

_import_modules(__name__, __path__)  # every public module registers what it defines: a new method is one new file
