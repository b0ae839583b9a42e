"""Quantization: primitives, observers, fake-quant (STE, LSQ), PTQ, QAT, weight-only, ONNX Runtime int8.

The public verbs are :func:`quantize_` (with a :class:`QuantConfig`), :func:`qat_prepare_` and
:func:`qat_convert_`; :func:`export_onnx` writes the fp32 and the int8 ONNX files that ONNX
Runtime runs with integer kernels.
"""

from __future__ import annotations

from torchslim.quantize import observers as observers  # registers the observers
from torchslim.quantize._onnx import export_onnx
from torchslim.quantize.api import MODES, QuantConfig, QuantPlan, quantize_
from torchslim.quantize.dynamic_rnn import QuantizedRNN
from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize
from torchslim.quantize.mixed import BitAllocation, allocate_bits, layer_sensitivity
from torchslim.quantize.primitives import QScheme, dequantize, fake_quantize, quantize, quantize_tensor, sqnr
from torchslim.quantize.qat import qat_convert_, qat_prepare_
from torchslim.quantize.weight_only import QuantizedLinear

__all__ = [
    "MODES",
    "QuantConfig",
    "QuantPlan",
    "quantize_",
    "qat_prepare_",
    "qat_convert_",
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
]

from torchslim.quantize.gptq import gptq_  # noqa: E402

__all__ += ["gptq_"]
