"""The data a model ships with, for CLI verbs whose best setting needs data the user did not give.

Some models are made for one of torchslim's bundled data sets: the packaged image classifiers
declare theirs (``pretrained:mnist_cnn`` reads ``mnist``, ``pretrained:efficientnet_lite0`` reads
``images``: ``zoo.pretrained_vision.VisionEntry.data``), and the pretrained sentence encoders
(``pretrained:minilm``) read the bundled ``sentences`` (calibration comes from their ``train``
split, scores from the disjoint ``eval`` pairs). A folder written by ``ts.save`` keeps the spec it
was built from, so it has the same default. A verb that needs calibration or training data for its
best setting (``quantize --mode static``, SmoothQuant for text encoders, a recipe whose stages
need data) calls :func:`default_data` when ``--data`` is missing, uses the answer, and says so in
its output (:func:`describe_default`). The Python API keeps its own defaults: there no data means
none.

Example:
    >>> default_data("pretrained:mnist_cnn"), default_data("zoo:lenet300")
    ('mnist', None)
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["default_data", "describe_default", "model_spec_of"]

#: The data spec of the pretrained sentence encoders (``torchslim.data.sentences``; not a
#: ``load_data`` spec: verbs tokenize it themselves).
SENTENCES = "sentences"

#: The text data spec of the decoder LLMs (``torchslim.data.text``: calibration plays, held-out plays).
SHAKESPEARE = "shakespeare"


def model_spec_of(spec: str) -> str:
    """The spec a model was built from: ``spec`` itself, or the one a ``ts.save`` folder records."""
    path = Path(spec)
    if path.is_dir() and (path / "plan.json").is_file():
        try:
            recorded = json.loads((path / "plan.json").read_text()).get("model", {}).get("spec")
        except (OSError, ValueError, AttributeError):
            return spec  # a damaged folder: the verb's own load reports it
        return recorded if isinstance(recorded, str) and recorded else spec
    return spec


def default_data(spec: str) -> str | None:
    """The bundled data spec the model of ``spec`` is made for, or None when it has none.

    ``pretrained:`` image classifiers give the data they declare, ``pretrained:`` sentence
    encoders give ``"sentences"``, ``pretrained:`` decoder LLMs ``"shakespeare"``; ``zoo:``, ``torchvision:``, ``timm:`` and file models (random
    or unknown weights) give None. A ``ts.save`` folder answers for the spec it records.
    """
    name = model_spec_of(spec)
    if not name.startswith("pretrained:"):
        return None
    key = name.split(":", 1)[1]
    from torchslim.errors import SpecError
    from torchslim.zoo import pretrained, pretrained_llm, pretrained_vision

    if pretrained_llm.is_llm(key):
        return SHAKESPEARE  # decoder LLMs calibrate on the bundled plays (held-out plays score them)
    if pretrained_vision.is_vision(key):
        return pretrained_vision.vision_entry(key).data
    try:
        pretrained.pretrained_entry(key)
    except SpecError:
        return None  # unknown names are reported by the verb's own model build
    return SENTENCES


def describe_default(spec: str, data: str, what: str) -> str:
    """One line for the verb's output: which data it picked for ``spec`` and how to choose another.

    Example:
        >>> describe_default("pretrained:mnist_cnn", "mnist", "calibration")
        'calibration data: mnist (the bundled data pretrained:mnist_cnn is made for; --data SPEC picks other data)'
    """
    return f"{what} data: {data} (the bundled data {model_spec_of(spec)} is made for; --data SPEC picks other data)"
