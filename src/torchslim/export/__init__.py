"""Export: ONNX, TorchScript (loadable from C++) and ``torch.export`` programs, with parity checks.

``export(model, example_inputs, path)`` writes the artifact (format from the suffix or
``format=``), runs it back in its own runtime on the example and random inputs, and returns an
:class:`ExportResult` holding the files, their sizes and the :class:`ParityReport`. Other formats
(e.g. quantized QDQ ONNX) plug in with :func:`register_format`; models quantized by
``ts.quantize_`` (static / QAT) go to int8 QDQ ONNX (:mod:`torchslim.export.quantized`).
:func:`bench` times a model in eager PyTorch, ``torch.compile``, TorchScript and ONNX Runtime.

Example:
    >>> import tempfile, os, torchslim as ts
    >>> from torchslim.export import export
    >>> with tempfile.TemporaryDirectory() as d:
    ...     r = export(ts.create_model("zoo:lenet300"), path=os.path.join(d, "m.pt"))
    >>> r.format, r.info["method"], r.parity.ok
    ('torchscript', 'trace', True)
"""

from torchslim.export._base import ExportError, Format, get_format, list_formats, register_format
from torchslim.export.api import ExportResult, export
from torchslim.export.bench import BenchResult, BenchRow, bench  # the function shadows the module name
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
    "ParityCase",
    "ParityError",
    "ParityReport",
    "Tolerance",
    "bench",
    "check_parity",
    "export",
    "get_format",
    "list_formats",
    "random_inputs",
    "register_format",
]
