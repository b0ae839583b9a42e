"""The shared helpers of torchslim._utils: modes restored module by module, threads, logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from torchslim._utils import evaluating, logits_of, mode, model_device, num_threads, saved_modes, training
from torchslim.errors import ConfigError


def _mixed() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    return model


@pytest.mark.parametrize("ctx", [evaluating, training, lambda m: mode(m, False), lambda m: mode(m, True)])
def test_modes_restored_per_module_even_on_error(ctx) -> None:
    model = _mixed()
    with pytest.raises(RuntimeError), ctx(model):
        raise RuntimeError("inside")
    assert [m.training for m in model] == [True, False, True] and model.training


def test_mode_sets_every_module_inside() -> None:
    model = _mixed()
    with training(model):
        assert all(m.training for m in model.modules())
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    restore = saved_modes(model)
    model.eval()
    restore()
    assert [m.training for m in model] == [True, False, True]


def test_num_threads_restores_and_validates() -> None:
    before = torch.get_num_threads()
    with pytest.raises(ValueError), num_threads(1):
        assert torch.get_num_threads() == 1
        raise ValueError
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="^threads must be"):
        with num_threads(0):
            pass


def test_model_device_of_stateless_and_buffer_only_models() -> None:
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.BatchNorm1d(2, affine=False)) == torch.device("cpu")


def test_logits_of_every_output_kind() -> None:
    t = torch.zeros(2, 3)
    h = torch.ones(2, 3)
    assert logits_of(t) is t
    assert logits_of((t, h)) is t and logits_of([t]) is t
    assert logits_of({"logits": t, "hidden": h}) is t
    assert logits_of(SimpleNamespace(logits=t)) is t
    assert logits_of(SimpleNamespace(last_hidden_state=h, logits=t), keys=("last_hidden_state", "logits")) is h
    assert logits_of({"other": 1}) == {"other": 1}  # nothing found: returned unchanged
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=t)
    assert logits_of(out) is t
