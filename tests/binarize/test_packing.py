"""Bit-packing: exact round trips, the real saved file size, and corrupt packed files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torchslim as ts
from torchslim.binarize import BinarizeConfig, BinaryLinear, binarize_
from torchslim.binarize.packing import (
    as_words64,
    check_packed,
    pack_signs,
    packed_bytes,
    packed_words,
    unpack_signs,
)
from torchslim.errors import CheckpointError, ConfigError


def _pm1(*shape: int) -> torch.Tensor:
    return torch.randint(0, 2, shape).float() * 2 - 1


@pytest.mark.parametrize("word_bits", [32, 64])
@pytest.mark.parametrize("k", [1, 7, 31, 32, 33, 63, 64, 65, 129, 301, 1000])
def test_pack_unpack_is_exact(word_bits, k):
    t = _pm1(3, 5, k)
    words = pack_signs(t, word_bits)
    assert words.shape == (3, 5, packed_words(k, word_bits))
    assert words.dtype == (torch.int32 if word_bits == 32 else torch.int64)
    assert torch.equal(unpack_signs(words, k), t)
    check_packed(words.reshape(15, -1), 15, k, word_bits)  # padding bits are zero


def test_bit_layout_and_sign_of_zero():
    t = torch.tensor([[0.0, -3.0, 2.0] + [-1.0] * 29 + [5.0]])  # 33 entries; zero packs as +1
    words = pack_signs(t, 32)
    assert words.tolist() == [[0b101, 1]]
    assert unpack_signs(words, 33)[0, :3].tolist() == [1.0, -1.0, 1.0]
    # the top bit of a word is the sign bit of the int: all ones is -1
    assert pack_signs(torch.ones(1, 64), 64).item() == -1
    assert pack_signs(torch.ones(1, 32), 32).item() == -1


@pytest.mark.parametrize("k", [5, 64, 100, 129])
def test_32_bit_words_pair_into_the_64_bit_packing(k):
    t = _pm1(4, k)
    assert torch.equal(as_words64(pack_signs(t, 32)), pack_signs(t, 64))


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="word_bits"):
        pack_signs(torch.ones(3), 16)
    with pytest.raises(ConfigError, match="scalar"):
        pack_signs(torch.tensor(1.0))
    with pytest.raises(ConfigError, match="words per row"):
        unpack_signs(pack_signs(torch.ones(2, 40)), 100)
    with pytest.raises(ConfigError, match="int32 or int64"):
        unpack_signs(torch.zeros(2, 2), 3)


def test_check_packed_rejects_wrong_shape_dtype_and_padding():
    words = pack_signs(_pm1(4, 40), 32)
    with pytest.raises(CheckpointError, match="shape"):
        check_packed(words[:, :1], 4, 40, 32)
    with pytest.raises(CheckpointError, match="int32"):
        check_packed(words.to(torch.int64), 4, 40, 32)
    bad = words.clone()
    bad[0, -1] |= 1 << 20  # a bit beyond the 40 signs of the row
    with pytest.raises(CheckpointError, match="padding bits"):
        check_packed(bad, 4, 40, 32)


def test_layer_state_dict_is_packed_and_round_trips():
    layer = BinaryLinear.from_float(torch.nn.Linear(300, 64), "xnor")
    sd = layer.state_dict()
    assert set(sd) == {"weight::signs", "weight::scale", "bias"}
    stored = sd["weight::signs"].numel() * 4 + sd["weight::scale"].numel() * 4
    assert stored == packed_bytes(64, 300) + 64 * 4
    assert layer.weight.numel() * 4 / stored >= 25  # 32x minus the scales
    other = BinaryLinear.from_float(torch.nn.Linear(300, 64), "xnor")
    other.load_state_dict(sd)
    x = torch.randn(8, 300)
    assert torch.equal(other(x), layer(x))


def test_saved_file_of_a_mostly_binary_model_is_about_32x_smaller(tmp_path):
    model = ts.create_model("zoo:conv2")  # 4.3M params, almost all in the first FC layer
    ts.save(model, tmp_path / "float")
    plan = binarize_(model, BinarizeConfig(method="xnor"))
    ts.save(model, tmp_path / "binary")
    before = (tmp_path / "float" / "model.safetensors").stat().st_size
    after = (tmp_path / "binary" / "model.safetensors").stat().st_size
    assert before / after >= 25
    # per binarized layer, the stored tensors really are >= 25x smaller than fp32
    with safe_open(str(tmp_path / "binary" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name in plan.layers:
            layer = model.get_submodule(name)
            if layer.weight.numel() < 8192:
                continue
            stored = sum(f.get_tensor(f"{name}.weight::{p}").numel() * 4 for p in ("signs", "scale"))
            assert layer.weight.numel() * 4 / stored >= 25
            assert f"{name}.weight" not in keys


def test_a_packed_file_of_the_wrong_size_is_a_clear_error(tmp_path):
    model = ts.create_model("zoo:lenet300")
    binarize_(model, BinarizeConfig(method="bnn"))
    ts.save(model, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["fc2.weight::signs"] = tensors["fc2.weight::signs"][:, :-1].contiguous()  # one word short per row
    save_file(tensors, str(path))
    plan = json.loads((tmp_path / "m" / "plan.json").read_text())
    del plan["files"]  # as an older torchslim wrote it: no size/sha256 record, so the layer's own check speaks
    (tmp_path / "m" / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match="fc2.weight::signs"):
        ts.load(tmp_path / "m")
    # loading into a live layer fails before touching it
    layer = model.fc2
    before = layer.weight.detach().clone()
    with pytest.raises(CheckpointError):
        layer.load_state_dict({"weight::signs": tensors["fc2.weight::signs"], "bias": layer.bias.detach()})
    assert torch.equal(layer.weight, before)


def test_missing_scale_is_a_clear_error():
    layer = BinaryLinear.from_float(torch.nn.Linear(40, 3), "xnor")
    sd = layer.state_dict()
    del sd["weight::scale"]
    with pytest.raises(CheckpointError, match="scale"):
        layer.load_state_dict(sd)
