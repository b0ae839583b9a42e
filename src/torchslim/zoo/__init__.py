"""Reference models and the model-spec parser."""

from torchslim.zoo.models import ZooEntry, create_zoo_model, list_models, register_model, zoo_entry
from torchslim.zoo.spec import (
    ModelInfo,
    create_model,
    example_inputs,
    model_info,
    parse_input_shape,
    set_example_inputs,
)

__all__ = [
    "ModelInfo",
    "ZooEntry",
    "create_model",
    "create_zoo_model",
    "example_inputs",
    "list_models",
    "model_info",
    "parse_input_shape",
    "register_model",
    "set_example_inputs",
    "zoo_entry",
]
