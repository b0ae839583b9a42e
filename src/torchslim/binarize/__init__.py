"""Binarization: BNN / XNOR-Net / Bi-Real / BWN layers, bit-packed storage, an XNOR-popcount kernel.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.binarize import BinarizeConfig, binarize_
    >>> model = ts.create_model("zoo:lenet5")
    >>> binarize_(model, BinarizeConfig(method="bireal")).layers
    ['features.3', 'classifier.0', 'classifier.2']
"""

from torchslim.binarize import _cli  # noqa: E402,F401  (registers the binarize CLI verbs)
from torchslim.binarize._summary import BinaryLayerSummary, BinarySummary, summary
from torchslim.binarize.api import BinarizeConfig, BinarizePlan, binarize_, binary_layers, set_backend_
from torchslim.binarize.kernel import binary_conv2d, binary_linear, c_kernel_status, xnor_matmul
from torchslim.binarize.layers import METHODS, BinaryConv2d, BinaryLinear, approx_sign, ste_sign
from torchslim.binarize.packing import pack_signs, unpack_signs

__all__ = [
    "METHODS",
    "BinarizeConfig",
    "BinarizePlan",
    "BinaryConv2d",
    "BinaryLayerSummary",
    "BinaryLinear",
    "BinarySummary",
    "approx_sign",
    "binarize_",
    "binary_conv2d",
    "binary_layers",
    "binary_linear",
    "c_kernel_status",
    "pack_signs",
    "set_backend_",
    "ste_sign",
    "summary",
    "unpack_signs",
    "xnor_matmul",
]

from torchslim._registry import import_modules as _import_modules  # noqa: E402

_import_modules(__name__, __path__)  # every public module registers what it defines: a new method is one new file
