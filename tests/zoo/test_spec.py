"""Model specs: every form resolves, remembers its inputs, and bad specs say what is allowed."""

from __future__ import annotations

import textwrap

import pytest
import torch

import torchslim as ts
from torchslim.errors import InputShapeError, SpecError
from torchslim.zoo.spec import model_info, parse_input_shape


def test_torchvision_spec_uses_crop_size() -> None:
    m = ts.create_model("torchvision:inception_v3")
    assert ts.example_inputs(m)[0].shape == (1, 3, 299, 299)
    assert model_info(m).spec == "torchvision:inception_v3"
    m = ts.create_model("torchvision:resnet18", num_classes=7)
    assert m(*ts.example_inputs(m)).shape == (1, 7)


def test_timm_spec() -> None:
    pytest.importorskip("timm")
    m = ts.create_model("timm:resnet18", num_classes=3)
    (x,) = ts.example_inputs(m)
    assert x.shape == (1, 3, 224, 224)
    assert m(x).shape == (1, 3)


def test_zoo_spec_adapts_to_data() -> None:
    m = ts.create_model("zoo:conv4", data="mnist")
    (x,) = ts.example_inputs(m)
    assert x.shape == (1, 1, 28, 28)
    assert m(x).shape == (1, 10)
    assert ts.example_inputs(m, batch_size=4)[0].shape == (4, 1, 28, 28)


def test_file_spec_with_example_inputs(tmp_path) -> None:
    f = tmp_path / "my_model.py"
    f.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Tiny(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.emb = nn.Embedding(100, 8)
                    self.head = nn.Linear(8, 2)

                def forward(self, ids):
                    return self.head(self.emb(ids).mean(1))

            def build():
                return Tiny()

            def example_inputs():
                return (torch.randint(0, 100, (1, 12)),)
            """
        )
    )
    m = ts.create_model(f"{f}:build")
    (ids,) = ts.example_inputs(m)
    assert ids.dtype == torch.int64 and ids.shape == (1, 12)
    assert ts.profile(m, latency=False).macs == 16


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("torchvision:resnet5O", r"did you mean torchvision:resnet50"),
        ("zoo:lenet301", r"lenet300"),
        ("resnet50", r"torchvision:resnet50"),
        ("lenet300", r"zoo:lenet300"),
        ("hub:foo", r"unknown prefix 'hub'.*allowed"),
        ("nope/missing.py:build", r"does not exist"),
    ],
)
def test_bad_specs_name_what_is_allowed(spec: str, pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern) as info:
        ts.create_model(spec)
    assert isinstance(info.value, ValueError)


def test_file_without_factory(tmp_path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import torch\ndef other():\n    return torch.nn.Linear(2, 2)\n")
    with pytest.raises(SpecError, match=r"no function 'build'.*other"):
        ts.create_model(f"{f}:build")
    with pytest.raises(SpecError, match=r"no factory"):
        ts.create_model(str(f))


def test_factory_that_raises_or_returns_non_module(tmp_path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def bad():\n    raise ValueError('broken')\ndef notmodel():\n    return 3\n")
    with pytest.raises(SpecError, match=r"bad\(\) raised ValueError: broken"):
        ts.create_model(f"{f}:bad")
    with pytest.raises(SpecError, match=r"must return an nn.Module"):
        ts.create_model(f"{f}:notmodel")


def test_parse_input_shape() -> None:
    inputs = parse_input_shape("1,3,32,32")
    assert [tuple(t.shape) for t in inputs.tensors()] == [(1, 3, 32, 32)]
    assert len(parse_input_shape("1,4;1,5").tensors()) == 2
    for bad in ("", "1,a", "1,-3", "0,3"):
        with pytest.raises(InputShapeError):
            parse_input_shape(bad)


def test_model_without_spec_has_no_example_inputs() -> None:
    with pytest.raises(SpecError, match="pass example_inputs explicitly"):
        ts.example_inputs(torch.nn.Linear(2, 2))
    m = ts.set_example_inputs(torch.nn.Linear(2, 2), torch.randn(1, 2))
    assert ts.example_inputs(m)[0].shape == (1, 2)
