"""Resuming ``ts.fit`` on a binarized model is bit-identical to an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.binarize import BinarizeConfig, binarize_, binary_layers


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def datasets():
    return {"digits": ts.load_data("digits"), "mnist": ts.load_data("mnist")}


class _Interrupt(Exception):
    pass


class _CrashAt(ts.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, state):
        if state.epoch == self.epoch:
            raise _Interrupt


def _model(data, spec: str, method: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ts.create_model(spec, data=data)
    binarize_(model, BinarizeConfig(method=method, scale_activations=method == "xnor"))
    return model


@pytest.mark.parametrize(
    "spec,data,method",
    [("zoo:lenet300", "digits", "bnn"), ("zoo:lenet5", "mnist", "xnor"), ("zoo:lenet5", "mnist", "bireal"), ("zoo:lenet300", "digits", "bwn")],
)
def test_resume_after_epoch_one_is_bit_identical(datasets, tmp_path, spec, data, method):
    bundle = datasets[data]
    config = ts.TrainConfig(
        epochs=3, lr=2e-3, optimizer="adam", batch_size=32, max_steps_per_epoch=3, lr_schedule="cosine", device="cpu"
    )
    straight = _model(bundle, spec, method, seed=0)
    straight_result = ts.fit(straight, bundle, config, progress=False)

    crashed = _model(bundle, spec, method, seed=0)
    with pytest.raises(_Interrupt):
        ts.fit(crashed, bundle, config, callbacks=[_CrashAt(1)], checkpoint_dir=tmp_path, progress=False)
    # the checkpoint holds the latent float weights, not the packed signs that ts.save stores
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    names = list(binary_layers(crashed))
    assert names and all(f"{n}.weight" in saved and f"{n}.weight::signs" not in saved for n in names)
    assert any(f"{n}.weight::signs" in k for k in crashed.state_dict() for n in names)  # storage still packs

    resumed = _model(bundle, spec, method, seed=123)  # another init: everything must come from the checkpoint
    result = ts.fit(resumed, bundle, config, checkpoint_dir=tmp_path, resume=True, progress=False)

    a, b = dict(straight.named_parameters()), dict(resumed.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in straight_result.history]
    assert result.test_accuracy == straight_result.test_accuracy
