"""Data from user code: a ``path/to/file.py:factory`` spec."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from torchslim.data._bundle import SPLITS, DataBundle
from torchslim.data._split import split_indices
from torchslim.errors import SpecError

__all__ = ["is_file_spec", "load_file_bundle"]

_counter = itertools.count()
_FORM = "'path/to/file.py:factory' (a .py file and the name of a function in it)"


def is_file_spec(spec: str) -> bool:
    """Whether ``spec`` names a Python file (``something.py`` or ``something.py:factory``)."""
    head = spec.rsplit(":", 1)[0] if ":" in spec else spec
    return head.endswith(".py") or spec.endswith(".py")


def _import_file(path: Path, spec: str) -> ModuleType:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"_torchslim_user_data_{path.stem}_{digest}_{next(_counter)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"data spec {spec!r}: cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling inside the file look themselves up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise SpecError(f"data spec {spec!r}: importing {path} raised {type(exc).__name__}: {exc}") from exc
    return module


def _call_factory(spec: str) -> tuple[Any, str]:
    if ":" not in spec or spec.endswith(".py"):
        raise SpecError(f"data spec {spec!r} names a file but no factory; use the form {_FORM}")
    file_part, factory_name = spec.rsplit(":", 1)
    path = Path(file_part).expanduser().resolve()
    if not path.is_file():
        raise SpecError(f"data spec {spec!r}: file not found: {path} (relative paths start at {Path.cwd()})")
    module = _import_file(path, spec)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise SpecError(
            f"data spec {spec!r}: {path} has no function named {factory_name!r}; "
            f"callables found there: {', '.join(found) or 'none'}"
        )
    try:
        result = factory()
    except Exception as exc:
        raise SpecError(
            f"data spec {spec!r}: calling {factory_name}() from {path} raised {type(exc).__name__}: {exc}"
        ) from exc
    return result, factory_name


class _Unlabeled(Dataset):
    """Wrap a data set of bare inputs so every sample becomes ``(x, -1)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        return self.dataset[index], torch.tensor(-1, dtype=torch.int64)


def _is_pair(sample: Any) -> bool:
    return isinstance(sample, (tuple, list)) and len(sample) == 2


def _first_sample(dataset: Any, spec: str, where: str) -> Any:
    if not isinstance(dataset, Dataset) and not (
        hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    ):
        raise SpecError(
            f"data spec {spec!r}: {where} must be a torch Dataset (or any object with __len__ and "
            f"__getitem__); got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise SpecError(f"data spec {spec!r}: {where} is empty")
    return dataset[0]


def _label_value(y: Any) -> int | None:
    """The label as an int when ``y`` is a scalar integer class label, else ``None``."""
    if isinstance(y, bool):
        return None
    if isinstance(y, int):
        return y
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not y.is_floating_point() and y.dtype != torch.bool:
        return int(y.item())
    if (
        hasattr(y, "dtype")
        and getattr(y, "shape", None) == ()
        and getattr(y.dtype, "kind", None) in ("i", "u")
    ):
        return int(y)  # a numpy integer scalar
    return None


def _labels(dataset: Dataset) -> torch.Tensor:
    """All labels of a labeled data set (fast for TensorDatasets and their Subsets)."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].reshape(-1).long()
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        return _labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    values = (_label_value(dataset[i][1]) for i in range(len(dataset)))  # type: ignore[arg-type]
    return torch.tensor([-1 if v is None else v for v in values], dtype=torch.long)


def _prepare(dataset: Any, spec: str, where: str) -> tuple[Dataset, tuple[int, ...], bool]:
    """Check one data set; wrap bare inputs; return it, the input shape and whether it is labeled."""
    sample = _first_sample(dataset, spec, where)
    if not _is_pair(sample):
        dataset, sample = _Unlabeled(dataset), (sample, -1)
    x, y = sample
    try:
        shape = tuple(torch.as_tensor(x).shape)
    except Exception as exc:
        raise SpecError(
            f"data spec {spec!r}: the inputs of {where} must be tensors or arrays; got {type(x).__name__}"
        ) from exc
    label = _label_value(y)
    return dataset, shape, label is not None and label >= 0


def _num_classes(datasets: Sequence[Dataset], given: Any, spec: str) -> int:
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise SpecError(f"data spec {spec!r}: 'num_classes' must be a positive integer; got {given!r}")
        return given
    return int(max(int(_labels(d).max()) for d in datasets)) + 1


def load_file_bundle(spec: str, split: tuple[float, float, float], seed: int) -> DataBundle:
    """Import the file of a ``file.py:factory`` spec, call the factory and wrap what it returns.

    The factory may return a :class:`DataBundle`, a dict with ``'train'``, ``'val'`` and
    ``'test'`` data sets (and optionally ``'num_classes'``), or one data set, which is split by
    ``split`` and ``seed`` (stratified when it is labeled).

    Raises:
        SpecError: The file or the factory is missing, the factory raises, or it returns
            something else.
    """
    result, factory_name = _call_factory(spec)
    if isinstance(result, DataBundle):
        return dataclasses.replace(result, spec=spec)
    if isinstance(result, dict):
        missing = [k for k in SPLITS if k not in result]
        if missing:
            raise SpecError(
                f"data spec {spec!r}: {factory_name}() returned a dict without {', '.join(map(repr, missing))}; "
                "it needs 'train', 'val' and 'test' data sets (and optionally 'num_classes')"
            )
        prepared = [_prepare(result[k], spec, f"{factory_name}()[{k!r}]") for k in SPLITS]
        (train, shape, labeled), (val, _, _), (test, _, _) = prepared
        num_classes = _num_classes([train, val, test], result.get("num_classes"), spec) if labeled else None
        return DataBundle(spec, factory_name, train, val, test, shape, num_classes, labeled)
    if isinstance(result, Dataset) or (hasattr(result, "__getitem__") and hasattr(result, "__len__")):
        dataset, shape, labeled = _prepare(result, spec, f"the data set from {factory_name}()")
        labels = _labels(dataset) if labeled else None
        idx = split_indices(len(dataset), split, seed, labels)
        train, val, test = (Subset(dataset, i.tolist()) for i in idx)
        num_classes = int(labels.max()) + 1 if labels is not None else None
        return DataBundle(spec, factory_name, train, val, test, shape, num_classes, labeled)
    raise SpecError(
        f"data spec {spec!r}: {factory_name}() returned {type(result).__name__}; it must return a "
        "DataBundle, a dict with 'train', 'val' and 'test' data sets, or one torch Dataset"
    )
