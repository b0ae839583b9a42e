"""Every verb selects modules through the one selector: names, globs, ``re:``, containers, and a
pattern that selects nothing refused with a close match before the model is touched."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim._layerwise import linear_layers
from torchslim.distill import distill_hidden_
from torchslim.errors import ConfigError
from torchslim.prune import AGP, LotteryConfig, find_ticket
from torchslim.prune.masks import get_mask
from torchslim.prune.sparsegpt import sparsegpt_
from torchslim.prune.wanda import OneShotConfig, wanda_
from torchslim.quantize import QuantConfig
from torchslim.quantize.gptq import gptq_


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8)))


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=g) for _ in range(2)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_linear_layers_take_names_globs_regexes_and_containers():
    m = _mlp()
    assert list(linear_layers(m)) == ["0", "2.0", "2.1"]
    assert list(linear_layers(m, "2")) == ["2.0", "2.1"]  # a container selects what is inside it
    assert list(linear_layers(m, ["re:2\\.\\d"], skip="2.1")) == ["2.0"]
    assert list(linear_layers(m, "*.1")) == ["2.1"]
    with pytest.raises(ConfigError, match="modules: '2.5' selects no module.*did you mean"):
        linear_layers(m, ["2.5"])
    with pytest.raises(ConfigError, match="selects no nn.Linear"):
        linear_layers(m, ["1"])  # a GELU: a module, but no Linear


VERBS = {
    "wanda_": lambda m, **kw: wanda_(m, 0.5, calibration=_calib(), **kw),
    "sparsegpt_": lambda m, **kw: sparsegpt_(m, 0.5, calibration=_calib(), **kw),
    "gptq_": lambda m, **kw: gptq_(
        m, QuantConfig(mode="weight-only", bits=4, granularity="channel", **kw), calibration=_calib()
    ),
}


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize(("field", "pattern"), [("modules", "2.3"), ("skip", "re:fc\\d"), ("modules", "2.*.w")])
def test_layerwise_verbs_refuse_an_unknown_name_before_work(verb, field, pattern):
    m = _mlp()
    before = _state(m)
    with pytest.raises(ConfigError, match=re.escape(f"{field}: {pattern!r} selects no module")):
        VERBS[verb](m, **{field: (pattern,)})
    assert _unchanged(m, before)


@pytest.mark.parametrize("verb", ["wanda_", "sparsegpt_"])
def test_layerwise_pruning_selects_with_regex_and_container(verb):
    m = _mlp()
    VERBS[verb](m, modules="2", skip=["re:.*\\.1"])
    assert get_mask(m[0], "weight") is None and get_mask(m[2][1], "weight") is None
    assert get_mask(m[2][0], "weight") is not None


def test_gptq_selects_with_a_container():
    m = _mlp()
    plan = gptq_(m, QuantConfig(mode="weight-only", bits=4, granularity="channel", modules=("2",)), calibration=_calib())
    assert list(plan.layers) == ["2.0", "2.1"]
    assert isinstance(m[0], nn.Linear)


def test_one_shot_config_checks_patterns():
    assert OneShotConfig(modules="fc").modules == ("fc",)
    assert OneShotConfig(skip=None).skip == ()
    with pytest.raises(ConfigError, match="'re:\\(' is not a valid regular expression"):
        OneShotConfig(skip=["re:("])
    with pytest.raises(ConfigError, match="OneShotConfig.modules: module patterns must be strings"):
        OneShotConfig(modules=[3])


def test_lottery_refuses_an_unknown_override_before_training():
    data = ts.load_data("synthetic:1x8:n=40")
    model = ts.create_model("zoo:lenet300", data=data)
    before = _state(model)
    names = [n for n, _ in model.named_modules() if n]
    cfg = LotteryConfig(rounds=1, epochs=1, overrides={names[-1] + "x": 0.1})
    with pytest.raises(ConfigError, match="LotteryConfig.overrides: .* selects no module.*did you mean"):
        find_ticket(model, data, cfg, 0)
    assert _unchanged(model, before)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        LotteryConfig(overrides={"re:[": 0.1})


def test_schedule_refuses_an_unknown_pattern_before_the_first_step():
    data = ts.load_data("synthetic:1x8:n=40")
    model = ts.create_model("zoo:lenet300", data=data)
    before = _state(model)
    for kw in ({"modules": ["nope"]}, {"skip": "re:nope"}, {"overrides": {"nope*": 0.2}}):
        agp = AGP(final_sparsity=0.5, begin_step=0, end_step=2, frequency=1, **kw)
        with pytest.raises(ConfigError, match="selects no module"):
            ts.fit(model, data, ts.TrainConfig(epochs=1, batch_size=8), callbacks=[agp], progress=False)
        assert _unchanged(model, before)


def test_schedule_skip_leaves_a_layer_dense():
    data = ts.load_data("synthetic:1x8:n=40")
    model = ts.create_model("zoo:lenet300", data=data)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    agp = AGP(final_sparsity=0.5, begin_step=0, end_step=2, frequency=1, skip=names[0])
    ts.fit(model, data, ts.TrainConfig(epochs=1, batch_size=8), callbacks=[agp], progress=False)
    layers = dict(model.named_modules())
    assert get_mask(layers[names[0]], "weight") is None
    assert get_mask(layers[names[1]], "weight") is not None


def test_tinybert_freeze_goes_through_the_selector():
    student, teacher = _mlp(), _mlp()
    before = _state(student)
    with pytest.raises(ConfigError, match="freeze: '2.3' selects no module.*did you mean"):
        distill_hidden_(student, teacher, [{"input": torch.zeros(1, 16)}], freeze=["2.3"])
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        distill_hidden_(student, teacher, [{"input": torch.zeros(1, 16)}], freeze="re:(")
    assert _unchanged(student, before)


def test_no_deprecation_warning_on_the_new_names():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        wanda_(_mlp(), 0.5, calibration=_calib(), modules=["0"], skip=[])


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))


def test_build_space_refuses_an_unknown_name_and_takes_the_old_name_with_a_warning():
    from torchslim.search import SearchConfig
    from torchslim.search.space import build_space

    m, x = _convnet(), torch.randn(1, 3, 8, 8)
    m(x)
    before = _state(m)
    for kw in ({"skip": ["2.0"]}, {"quant_layers": ["re:conv"], "bits": (4, 8)}, {"rank_layers": "9", "ranks": (0.5, 1.0)}):
        with pytest.raises(ConfigError, match="selects no module"):
            build_space(m, x, **kw)
    assert _unchanged(m, before)
    with pytest.warns(DeprecationWarning, match="ignore= is deprecated, use skip="):
        old = build_space(m, x, ignore=["5"])
    assert [c.key for c in old.groups] == [c.key for c in build_space(m, x, skip="re:5").groups]
    with pytest.warns(DeprecationWarning, match="SearchConfig.ignore is deprecated"):
        assert SearchConfig(ignore=("2",)).skip == ("2",)
