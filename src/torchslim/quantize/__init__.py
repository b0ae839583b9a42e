"""Quantization: primitives, observers, fake-quant (STE, LSQ), PTQ, QAT, weight-only, ONNX Runtime int8.

The public verbs are :func:`quantize_` (with a :class:`QuantConfig`) and :func:`qat_prepare_`;
static and finalized QAT int8 layers are integer modules (:class:`Int8Conv`, :class:`Int8Linear`)
that :func:`compile` runs on oneDNN int8 kernels (``torch.compile`` with inductor's freezing);
``ts.finalize_`` (here :func:`freeze_qat_`) makes QAT permanent (``qat_convert_`` is its deprecated name). Integer ONNX files (int8 QDQ, dynamic int8, int4) are written by
``ts.export`` / :func:`torchslim.export.export_integer_onnx`, through the lowerings
:mod:`torchslim.quantize.onnx_lowering` registers (``export_onnx`` here is its deprecated name).
"""

from __future__ import annotations

from torchslim.quantize import observers as observers  # registers the observers
from torchslim.quantize.api import MODES, QuantConfig, QuantPlan, quantize_
from torchslim.quantize.dynamic_rnn import QuantizedRNN
from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize
from torchslim.quantize.int8 import Int8Conv, Int8Linear
from torchslim.quantize.int8_compile import compile
from torchslim.quantize.llm import LLM_METHODS, llm_calibration, quantize_llm_
from torchslim.quantize.mixed import BitAllocation, allocate_bits, layer_sensitivity
from torchslim.quantize.onnx_lowering import (
    export_onnx,  # registers the ONNX lowerings; the name is deprecated
)
from torchslim.quantize.primitives import QScheme, dequantize, fake_quantize, quantize, quantize_tensor, sqnr
from torchslim.quantize.qat import freeze_qat_, qat_convert_, qat_prepare_
from torchslim.quantize.weight_only import QuantizedLinear

__all__ = [
    "MODES",
    "QuantConfig",
    "QuantPlan",
    "quantize_",
    "quantize_llm_",
    "llm_calibration",
    "LLM_METHODS",
    "qat_prepare_",
    "qat_convert_",
    "freeze_qat_",
    "export_onnx",
    "layer_sensitivity",
    "allocate_bits",
    "BitAllocation",
    "QScheme",
    "quantize",
    "dequantize",
    "quantize_tensor",
    "fake_quantize",
    "sqnr",
    "FakeQuantize",
    "LSQFakeQuantize",
    "QuantizedLinear",
    "QuantizedRNN",
    "Int8Linear",
    "Int8Conv",
    "compile",
]

from torchslim.quantize import _cli  # noqa: E402,F401  (registers the quantize CLI verbs)
from torchslim.quantize.awq import awq_  # noqa: E402
from torchslim.quantize.gptq import gptq_  # noqa: E402
from torchslim.quantize.hqq import hqq_  # noqa: E402
from torchslim.quantize.rotate import rotate_  # noqa: E402

__all__ += ["gptq_", "awq_", "hqq_", "rotate_"]

from torchslim._registry import import_modules as _import_modules  # noqa: E402

_import_modules(__name__, __path__)  # every public module registers what it defines: a new method is one new file
