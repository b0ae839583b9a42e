"""Contracts of torchslim.data: shapes, counts, deterministic stratified splits, spec errors."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch

from torchslim.data import DataBundle, list_datasets, load_data
from torchslim.data._split import split_indices
from torchslim.errors import ConfigError, SpecError


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private, initially empty cache directory for the MNIST-1D tests of this module."""
    cache = tmp_path_factory.mktemp("tscache")
    old = os.environ.get("TORCHSLIM_CACHE")
    os.environ["TORCHSLIM_CACHE"] = str(cache)
    yield cache
    if old is None:
        del os.environ["TORCHSLIM_CACHE"]
    else:
        os.environ["TORCHSLIM_CACHE"] = old


def _all_labels(bundle: DataBundle) -> torch.Tensor:
    return torch.cat([bundle.train.tensors[1], bundle.val.tensors[1], bundle.test.tensors[1]])


def test_list_datasets_names_the_builtin_specs():
    assert list_datasets() == ["digits", "images", "mnist", "mnist1d", "shakespeare", "synthetic", "text"]


@pytest.mark.parametrize(
    ("spec", "shape", "total", "n_test"),
    [("mnist", (1, 28, 28), 5000, 1000), ("digits", (1, 8, 8), 1797, 359), ("mnist1d", (1, 40), 5000, 1000)],
)
def test_labeled_datasets_have_stated_shapes_and_counts(spec, shape, total, n_test, mnist1d_cache):
    bundle = load_data(spec)
    assert bundle.input_shape == shape
    assert bundle.num_classes == 10 and bundle.labeled and bundle.name == spec
    sizes = bundle.sizes()
    assert sum(sizes.values()) == total
    assert sizes["test"] == n_test
    for split in ("train", "val", "test"):
        x, y = bundle.split(split).tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == shape
    labels = _all_labels(bundle)
    assert labels.min() == 0 and labels.max() == 9
    assert torch.isfinite(bundle.train.tensors[0]).all()


def test_mnist_is_normalised_with_mnist_statistics():
    bundle = load_data("mnist")
    x = torch.cat([bundle.train.tensors[0], bundle.val.tensors[0], bundle.test.tensors[0]])
    assert x.min().item() == pytest.approx((0 - 0.1307) / 0.3081, abs=1e-5)
    assert x.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    assert bundle.mean == (0.1307,) and bundle.std == (0.3081,)


def test_mnist_split_is_exactly_stratified():
    bundle = load_data("mnist")
    for split, per_class in (("train", 350), ("val", 50), ("test", 100)):
        counts = torch.bincount(bundle.split(split).tensors[1], minlength=10)
        assert counts.tolist() == [per_class] * 10


def test_digits_split_is_stratified_within_one_sample():
    bundle = load_data("digits")
    totals = torch.bincount(_all_labels(bundle), minlength=10).double()
    for split, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        counts = torch.bincount(bundle.split(split).tensors[1], minlength=10).double()
        assert (counts - totals * frac).abs().max() <= 1.5


def test_mnist1d_keeps_its_own_test_set_and_splits_train_in_proportion(mnist1d_cache):
    bundle = load_data("mnist1d", split=(0.6, 0.2, 0.2))
    # val : train = 0.2 : 0.6 of the 4,000 native training samples
    assert bundle.sizes() == {"train": 3000, "val": 1000, "test": 1000}
    other = load_data("mnist1d", seed=5)
    assert torch.equal(bundle.test.tensors[0], other.test.tensors[0])


def test_mnist1d_cache_is_written_atomically_and_gives_identical_data(mnist1d_cache):
    for f in mnist1d_cache.glob("*"):
        f.unlink()
    first = load_data("mnist1d")
    files = list(mnist1d_cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp file left behind
    cached = load_data("mnist1d")
    for split in ("train", "val", "test"):
        for a, b in zip(first.split(split).tensors, cached.split(split).tensors):
            assert torch.equal(a, b)
    files[0].write_bytes(b"not an npz file")  # a damaged cache is regenerated, same data
    regenerated = load_data("mnist1d")
    assert torch.equal(regenerated.train.tensors[0], first.train.tensors[0])
    assert files[0].stat().st_size > 1000


def test_synthetic_splits_are_disjoint_and_cover_all_samples():
    bundle = load_data("synthetic:3x4x4:n=100", seed=3)
    rows = {
        split: [tuple(r.tolist()) for r in bundle.split(split).tensors[0].flatten(1)]
        for split in ("train", "val", "test")
    }
    assert sum(len(v) for v in rows.values()) == 100
    assert len(set().union(*map(set, rows.values()))) == 100  # all distinct, so disjoint and covering
    assert bundle.sizes() == {"train": 70, "val": 10, "test": 20}


def test_split_indices_are_a_stratified_partition():
    labels = torch.arange(1000) % 4
    parts = split_indices(1000, (0.7, 0.1, 0.2), seed=1, labels=labels)
    joined = torch.cat(parts)
    assert torch.equal(torch.sort(joined).values, torch.arange(1000))
    assert [len(p) for p in parts] == [700, 100, 200]
    assert torch.bincount(labels[parts[1]]).tolist() == [25] * 4


def test_splits_are_identical_for_a_seed_and_differ_for_another():
    a, b, c = load_data("digits", seed=0), load_data("digits", seed=0), load_data("digits", seed=1)
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split).tensors[0], b.split(split).tensors[0])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_loader_shuffling_is_deterministic_per_seed():
    bundle = load_data("digits")

    def order(seed: int) -> torch.Tensor:
        return torch.cat([x.flatten(1)[:, :8] for x, _ in bundle.loader("train", batch_size=256, seed=seed)])

    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))
    unshuffled = torch.cat([y for _, y in bundle.loader("test", batch_size=100)])
    assert torch.equal(unshuffled, bundle.test.tensors[1])  # eval splits keep their order
    x, y = next(iter(bundle.loader("train", batch_size=128)))
    assert x.shape == (128, 1, 8, 8) and y.shape == (128,)


def test_loader_and_example_batch_reject_bad_arguments():
    bundle = load_data("synthetic:3x8x8:n=30")
    with pytest.raises(ConfigError, match="split"):
        bundle.loader("training")
    with pytest.raises(ConfigError, match="batch_size"):
        bundle.loader("train", batch_size=0)
    with pytest.raises(ConfigError, match="batch_size"):
        bundle.example_batch(len(bundle.test) + 1)


def test_example_batch_is_the_first_test_samples():
    bundle = load_data("synthetic:1x3x16x16:n=40")
    batch = bundle.example_batch(3)
    assert batch.shape == (3, 3, 16, 16)
    assert torch.equal(batch, bundle.test.tensors[0][:3])


@pytest.mark.parametrize(
    ("spec", "shape", "classes", "n"),
    [
        ("synthetic:1x3x224x224", (3, 224, 224), 10, 64),
        ("synthetic:3x32x32:classes=100:n=256", (3, 32, 32), 100, 256),
        ("synthetic:1x40", (40,), 10, 64),
        ("synthetic:4x3x8x8:n=20", (4, 3, 8, 8), 10, 20),
        ("SYNTHETIC:16:n=12:classes=3", (16,), 3, 12),
    ],
)
def test_synthetic_specs(spec, shape, classes, n):
    bundle = load_data(spec)
    assert bundle.input_shape == shape and bundle.num_classes == classes
    assert sum(bundle.sizes().values()) == n
    labels = _all_labels(bundle)
    assert labels.min() >= 0 and labels.max() < classes
    assert torch.equal(load_data(spec).train.tensors[0], bundle.train.tensors[0])


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("synthetic", "shape is missing"),
        ("synthetic:", "shape is missing"),
        ("synthetic:3xax3", "'a'"),
        ("synthetic:3x0", "'0'"),
        ("synthetic:3x-2", "'-2'"),
        ("synthetic:3x8:foo=1", "classes=N and n=M"),
        ("synthetic:3x8:classes=0", "classes"),
        ("synthetic:3x8:n=abc", "'abc'"),
        ("synthetic:3x8:n=5:n=6", "twice"),
        ("mnist:extra", "takes no options"),
        ("images:abc", "image size"),
        ("images:4", "at least 8"),
        ("imagenet", "Allowed"),
        ("mnsit", "Did you mean 'mnist'"),
        ("", "Allowed"),
    ],
)
def test_bad_specs_raise_spec_error(spec, fragment):
    with pytest.raises(SpecError, match=fragment) as info:
        load_data(spec)
    assert isinstance(info.value, ValueError)


def test_too_few_samples_for_three_splits():
    with pytest.raises(ConfigError, match="at least one sample"):
        load_data("synthetic:4:n=2")


@pytest.mark.parametrize(
    "split", [(0.5, 0.5), (0.8, 0.3, -0.1), (0.5, 0.3, 0.3), (0.7, 0.3, 0.0), "abc", None]
)
def test_bad_split_fractions_raise_config_error(split):
    with pytest.raises(ConfigError, match="split"):
        load_data("synthetic:4:n=20", split=split)


def test_images_are_imagenet_normalised_unlabeled_photos():
    pytest.importorskip("skimage")
    bundle = load_data("images")
    assert bundle.input_shape == (3, 224, 224)
    assert not bundle.labeled and bundle.num_classes is None
    n = len(bundle.test)
    assert n >= 5 and bundle.sizes() == {"train": n, "val": n, "test": n}
    x, y = bundle.test.tensors
    assert (y == -1).all()
    assert x.min() >= (0 - 0.485) / 0.229 - 1e-4 and x.max() <= (1 - 0.406) / 0.225 + 1e-4
    assert x.std() > 0.5  # real photos, not a constant
    bundle.train.tensors[0].zero_()  # splits do not share memory
    assert x.abs().sum() > 0
    assert load_data("images:160").input_shape == (3, 160, 160)


# --------------------------------------------------------------------------- file factories


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "mydata.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_file_factory_returning_one_dataset_is_split_stratified(tmp_path):
    path = _write(
        tmp_path,
        """
        import torch
        from torch.utils.data import TensorDataset
        def make():
            g = torch.Generator().manual_seed(0)
            return TensorDataset(torch.randn(50, 2, 5, generator=g), torch.arange(50) % 5)
    """,
    )
    bundle = load_data(f"{path}:make", seed=2)
    assert bundle.input_shape == (2, 5) and bundle.num_classes == 5 and bundle.labeled
    assert bundle.sizes() == {"train": 35, "val": 5, "test": 10}
    test_labels = torch.tensor([int(bundle.test[i][1]) for i in range(len(bundle.test))])
    assert torch.bincount(test_labels).tolist() == [2] * 5
    x, y = next(iter(bundle.loader("train", batch_size=8)))
    assert x.shape == (8, 2, 5) and y.dtype == torch.int64


def test_file_factory_returning_a_dict_or_a_bundle(tmp_path):
    path = _write(
        tmp_path,
        """
        import torch
        from torch.utils.data import TensorDataset
        from torchslim.data import load_data
        def splits():
            ds = lambda n: TensorDataset(torch.zeros(n, 3), torch.zeros(n, dtype=torch.long))
            return {"train": ds(6), "val": ds(2), "test": ds(3), "num_classes": 4}
        def bundle():
            return load_data("synthetic:3:n=20")
        def unlabeled():
            return [torch.zeros(3) for _ in range(10)]
    """,
    )
    from_dict = load_data(f"{path}:splits")
    assert from_dict.sizes() == {"train": 6, "val": 2, "test": 3} and from_dict.num_classes == 4
    from_bundle = load_data(f"{path}:bundle")
    assert from_bundle.spec == f"{path}:bundle" and from_bundle.input_shape == (3,)
    bare = load_data(f"{path}:unlabeled")
    assert not bare.labeled and bare.num_classes is None and int(bare.test[0][1]) == -1


@pytest.mark.parametrize(
    ("spec_of", "fragment"),
    [
        (lambda p: f"{p.parent / 'nope.py'}:make", "file not found"),
        (lambda p: f"{p}:missing", "no function named 'missing'"),
        (lambda p: f"{p}:broken", "raised ZeroDivisionError"),
        (lambda p: f"{p}:wrong", "returned int"),
        (lambda p: str(p), "no factory"),
    ],
)
def test_file_factory_errors_name_what_was_tried(tmp_path, spec_of, fragment):
    path = _write(
        tmp_path,
        """
        def broken():
            return 1 / 0
        def wrong():
            return 3
    """,
    )
    with pytest.raises(SpecError, match=fragment):
        load_data(spec_of(path))
