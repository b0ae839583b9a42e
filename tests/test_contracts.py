"""The contract battery, generated from the registry (DESIGN section 7, issue 19).

Every registered plan kind, method, export format and recipe stage is exercised here: it applies,
the model saves and loads back to identical outputs (the plan replays), and bad input is refused
with a ``TorchslimError`` while the model stays exactly as it was. A name registered without a
case below fails :func:`test_every_registered_name_has_a_case`, so a new method cannot land
untested: add its case in the table of its kind.
"""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim._modelinfo import model_info
from torchslim._registry import entries
from torchslim.errors import TorchslimError

# ---------------------------------------------------------------------------- helpers


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a user can observe of a model: every tensor it holds (parameters, buffers,
    plain tensor attributes) by value, the identity of each Parameter, the module tree and the
    plain attributes of every module."""
    snap: dict[str, Any] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        snap[f"{mname}:type"] = type(mod)
        snap[f"{mname}:training"] = mod.training
        for key, value in mod.__dict__.items():
            if key in ("_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
                       "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_state_dict_pre_hooks",
                       "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                       "_backward_pre_hooks", "_non_persistent_buffers_set", "_torchslim"):
                continue
            if key in ("_parameters", "_buffers"):
                for n, t in value.items():
                    snap[f"{mname}.{n}"] = None if t is None else (id(t), t.detach().clone(), t.requires_grad)
            elif isinstance(value, torch.Tensor):
                snap[f"{mname}.{key}"] = value.detach().clone()
            elif isinstance(value, (int, float, str, bool, tuple, type(None))):
                snap[f"{mname}.{key}"] = value
    return snap


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, tuple) and len(x) == 3 and isinstance(x[1], torch.Tensor):
            assert x[0] == y[0], f"{key}: a different Parameter object"
            assert torch.equal(x[1], y[1]) and x[2] == y[2], f"{key}: values changed"
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{key}: values changed"
        else:
            assert x == y, f"{key}: {x!r} -> {y!r}"


def _outputs(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    if hasattr(out, "logits"):
        out = out.logits
    return out


def _inputs(model: nn.Module) -> Any:
    x = ts.example_inputs(model, batch_size=4)
    args = getattr(x, "args", x)
    return tuple(args) if isinstance(args, (list, tuple)) else args


@pytest.fixture(scope="module")
def digits() -> Any:
    return ts.load_data("mnist", seed=0)


def _cnn(digits: Any) -> nn.Module:
    torch.manual_seed(0)
    return ts.create_model("zoo:lenet5", data=digits).eval()


def _mlp(digits: Any) -> nn.Module:
    torch.manual_seed(0)
    return ts.create_model("zoo:lenet300", data=digits).eval()


_BERT_FILE = textwrap.dedent(
    '''
    import torch
    import transformers


    def model():
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=48)
        return transformers.BertModel(cfg, add_pooling_layer=False).eval()


    def example_inputs():
        return torch.randint(1, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    '''
)


def _file_model(tmp_path: Path, name: str, text: str) -> nn.Module:
    """A transformers model built from a model file (``path.py:model``), as ``ts.create_model`` builds specs."""
    pytest.importorskip("transformers")
    f = tmp_path / f"{name}.py"
    f.write_text(text)
    return ts.create_model(f"{f}:model").eval()


def _bert(tmp_path: Path) -> nn.Module:
    return _file_model(tmp_path, "tiny_bert", _BERT_FILE)


_LLAMA_FILE = textwrap.dedent(
    '''
    import torch, transformers


    def model():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
        return transformers.LlamaForCausalLM(cfg).eval()


    def example_inputs():
        return torch.randint(1, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    '''
)


def _llama(tmp_path: Path) -> nn.Module:
    return _file_model(tmp_path, "tiny_llama", _LLAMA_FILE)


def _calibration(digits: Any) -> Any:
    return digits.loader("train", 32, shuffle=False)


# ---------------------------------------------------------------------------- plan kinds
# kind -> (build(digits, tmp_path), apply(model, digits), bad(model, digits): must raise)


def _prune_heads(model: nn.Module, digits: Any) -> Any:
    from torchslim.prune.heads import prune_heads_

    return prune_heads_(model, {"encoder.layer.0.attention": [0, 2], "encoder.layer.1.attention": [1]})


def _prune_heads_bad(model: nn.Module, digits: Any) -> Any:
    from torchslim.prune.heads import prune_heads_

    return prune_heads_(model, {"encoder.layer.0.attention": [0, 9]})


PLAN_CASES: dict[str, tuple[Callable[..., nn.Module], Callable[..., Any], Callable[..., Any]]] = {
    "prune_channels": (
        lambda d, p: _cnn(d),
        lambda m, d: ts.prune_channels_(m, ratio=0.5),
        lambda m, d: ts.prune_channels_(m, ratio=1.5),
    ),
    "sparsify": (
        lambda d, p: _mlp(d),
        lambda m, d: ts.sparsify_(m, sparsity=0.8),
        lambda m, d: ts.sparsify_(m, sparsity=1.2),
    ),
    "factorize": (
        lambda d, p: _cnn(d),
        lambda m, d: ts.factorize_(m, ts.FactorizeConfig(method="svd", rank=0.5)),
        lambda m, d: ts.factorize_(m, ts.FactorizeConfig(method="svd", rank=0.5, modules=("nosuchlayer",))),
    ),
    "binarize": (
        lambda d, p: _cnn(d),
        lambda m, d: ts.binarize_(m, ts.BinarizeConfig(method="xnor")),
        lambda m, d: ts.binarize_(m, ts.BinarizeConfig(method="xnor", modules=("nosuchlayer",))),
    ),
    "quantize": (
        lambda d, p: _cnn(d),
        lambda m, d: ts.quantize_(m, ts.QuantConfig(mode="static"), calibration=_calibration(d)),
        lambda m, d: ts.quantize_(m, ts.QuantConfig(mode="static", modules=("nosuchlayer",)), calibration=_calibration(d)),
    ),
    "cluster": (
        lambda d, p: _mlp(d),
        lambda m, d: ts.cluster_(m, ts.ClusterConfig(bits=4)),
        lambda m, d: ts.cluster_(m, ts.ClusterConfig(bits=4, modules=("nosuchlayer",))),
    ),
    "prune_transformer": (lambda d, p: _bert(p), _prune_heads, _prune_heads_bad),
    "prune_depth": (  # whole decoder layers removed (prune_llm_ mode depth / both records it)
        lambda d, p: _llama(p),
        lambda m, d: ts.remove_layers_(m, [1]),
        lambda m, d: ts.remove_layers_(m, [0, 1]),
    ),
    "rotate": (  # the residual-stream rotation of decoder LLMs (quantize_llm_(rotate=True) records it)
        lambda d, p: _llama(p),
        lambda m, d: __import__("torchslim.quantize.rotate", fromlist=["rotate_"]).rotate_(m, seed=1),
        lambda m, d: __import__("torchslim.quantize.rotate", fromlist=["rotate_"]).rotate_(m, seed="one"),
    ),
}


@pytest.mark.parametrize("kind", [e.name for e in entries("plan")])
def test_plan_applies_saves_loads_and_replays(kind: str, digits: Any, tmp_path: Path) -> None:
    build, apply, _ = PLAN_CASES[kind]
    model = build(digits, tmp_path)
    x = _inputs(model)
    before = _outputs(model, x)
    apply(model, digits)
    model.eval()
    after = _outputs(model, x)
    assert after.shape == before.shape
    ts.save(model, tmp_path / "saved")
    loaded = ts.load(tmp_path / "saved").eval()
    assert torch.equal(_outputs(loaded, x), after), f"{kind}: the reloaded model computes something else"
    kinds = [p["kind"] for p in model_info(loaded).plans]
    assert kind in kinds, f"{kind} not recorded in the reloaded model's plans: {kinds}"


@pytest.mark.parametrize("kind", [e.name for e in entries("plan")])
def test_plan_refuses_bad_input_and_leaves_model_untouched(kind: str, digits: Any, tmp_path: Path) -> None:
    build, _, bad = PLAN_CASES[kind]
    model = build(digits, tmp_path)
    x = _inputs(model)
    out = _outputs(model, x)
    snap = _snapshot(model)
    with pytest.raises(TorchslimError):
        bad(model, digits)
    _assert_same(snap, _snapshot(model))
    assert torch.equal(_outputs(model, x), out)


# ---------------------------------------------------------------------------- methods
# family -> apply(model, name, digits) on a fresh model; each returns nothing and must change it


def _importance(model: nn.Module, name: str, digits: Any) -> None:
    needs_data = name in ("taylor", "activation")
    ts.prune_channels_(model, ratio=0.25, importance=name, data=_calibration(digits) if needs_data else None)


def _unstructured(model: nn.Module, name: str, digits: Any) -> None:
    needs_data = name in ("wanda", "snip", "movement")
    ts.sparsify_(model, sparsity=0.5, method=name, calibration=_calibration(digits) if needs_data else None)


def _observer(model: nn.Module, name: str, digits: Any) -> None:
    ts.quantize_(model, ts.QuantConfig(mode="static", observer=name), calibration=_calibration(digits))


def _lowrank_method(model: nn.Module, name: str, digits: Any) -> None:
    ts.factorize_(model, ts.FactorizeConfig(method=name, rank=0.5))


def _lowrank_rank(model: nn.Module, name: str, digits: Any) -> None:
    cfg = {"vbmf": {"rank": "vbmf"}, "target": {"target_macs": 0.5}, "energy": {"energy": 0.9}}.get(name, {"rank": name})
    ts.factorize_(model, ts.FactorizeConfig(method="svd", **cfg))


def _binarize(model: nn.Module, name: str, digits: Any) -> None:
    ts.binarize_(model, ts.BinarizeConfig(method=name))


METHOD_CASES: dict[str, tuple[Callable[[Any], nn.Module], Callable[[nn.Module, str, Any], None]]] = {
    "prune.importance": (_cnn, _importance),
    "prune.unstructured": (_mlp, _unstructured),
    "quantize.observer": (_cnn, _observer),
    "lowrank.method": (_cnn, _lowrank_method),
    "lowrank.rank": (_mlp, _lowrank_rank),
    "binarize.method": (_cnn, _binarize),
}


_METHODS = [(e.family, e.short_name) for e in entries("method") if e.family in METHOD_CASES]


@pytest.mark.parametrize("family, name", _METHODS)
def test_method_applies_and_replays(family: str, name: str, digits: Any, tmp_path: Path) -> None:
    build, apply = METHOD_CASES[family]
    model = build(digits)
    x = _inputs(model)
    snap = _snapshot(model)
    apply(model, name, digits)
    model.eval()
    with pytest.raises(AssertionError):
        _assert_same(snap, _snapshot(model))  # the method did something
    out = _outputs(model, x)
    assert torch.isfinite(out).all()
    ts.save(model, tmp_path / "m")
    assert torch.equal(_outputs(ts.load(tmp_path / "m").eval(), x), out)


@pytest.mark.parametrize("family", sorted(METHOD_CASES))
def test_unknown_method_is_refused_and_model_untouched(family: str, digits: Any) -> None:
    build, apply = METHOD_CASES[family]
    model = build(digits)
    snap = _snapshot(model)
    with pytest.raises(TorchslimError, match="nosuchmethod"):
        apply(model, "nosuchmethod", digits)
    _assert_same(snap, _snapshot(model))


@pytest.mark.parametrize("name", [e.short_name for e in entries("method", "distill.loss")])
def test_distill_loss_trains_student(name: str, digits: Any, tmp_path: Path) -> None:
    if name == "tinybert":
        pytest.skip("tinybert distils transformers layer by layer: tests/transformers/test_tf_distill.py")
    teacher = _cnn(digits)
    student = copy.deepcopy(teacher)
    ts.prune_channels_(student, ratio=0.5)
    w0 = {k: v.clone() for k, v in student.state_dict().items()}
    result = ts.distill(student, teacher, digits, ts.DistillConfig(loss=name, train=ts.TrainConfig(epochs=1, max_steps_per_epoch=3)),
                        progress=False)
    assert result is not None
    moved = any(not torch.equal(w0[k], v) for k, v in student.state_dict().items() if v.is_floating_point())
    assert moved, f"distill loss {name!r} left the student unchanged"


# ---------------------------------------------------------------------------- export formats


def _quantized_cnn(digits: Any) -> nn.Module:
    model = _cnn(digits)
    ts.quantize_(model, ts.QuantConfig(mode="static"), calibration=_calibration(digits))
    return model


# formats that take something other than a float model; every other format exports _cnn
EXPORT_MODELS: dict[str, Callable[[Any], nn.Module]] = {"onnx-int8": _quantized_cnn}


@pytest.mark.parametrize("fmt", [e.name for e in entries("export_format")])
def test_export_format_writes_a_file_that_matches_eager(fmt: str, digits: Any, tmp_path: Path) -> None:
    model = EXPORT_MODELS.get(fmt, _cnn)(digits)
    result = ts.export(model, ts.example_inputs(model), tmp_path / "model", format=fmt)
    files = result.files if hasattr(result, "files") else [result.path]
    assert files and all(Path(f).stat().st_size > 0 for f in (files.values() if isinstance(files, dict) else files))
    if getattr(result, "parity", None) is not None:
        assert result.parity.ok, result.parity.summary()


# ---------------------------------------------------------------------------- recipe stages
# stage -> its config in a one-stage recipe on LeNet-5 / MNIST (training stages: 3 steps)

STAGE_CASES: dict[str, dict[str, Any]] = {
    "prune_channels": {"ratio": 0.5},
    "sparsify": {"sparsity": 0.5},
    "lottery": {"rounds": 1, "rate": 0.2, "controls": []},
    "wanda": {"sparsity": 0.5, "calibration_batches": 1},
    "sparsegpt": {"sparsity": 0.5, "calibration_batches": 1},
    "gptq": {"bits": 4, "granularity": "channel", "calibration_batches": 1},
    "quantize": {"mode": "static"},
    "binarize": {"method": "xnor"},
    "cluster": {"bits": 4},
    "factorize": {"method": "svd", "rank": 0.5},
    "finetune": {},
    "distill": {"loss": "kd"},
    "pack": {"bits": 5},
    "export": {"formats": ["onnx"], "batch_sizes": [1]},
}
# stages of transformers text models, exercised on the pretrained MiniLM by that test file
STAGES_TESTED_ELSEWHERE = {"prune_heads": "tests/recipe/test_recipe_text.py",
                           "distill_hidden": "tests/recipe/test_recipe_text.py",
                           "quantize_llm": "tests/recipe/test_recipe_llm.py",  # decoder LLMs only
                           "prune_llm": "tests/recipe/test_recipe_llm_prune.py",
                           "heal": "tests/recipe/test_recipe_llm_prune.py"}
_FINETUNE = {"epochs": 1, "max_steps_per_epoch": 3, "batch_size": 32}


def _stage_names() -> list[str]:
    return [e.name for e in entries("recipe_stage") if e.name not in STAGES_TESTED_ELSEWHERE]


@pytest.mark.parametrize("stage", _stage_names())
def test_recipe_stage_runs_saves_and_replays(stage: str, digits: Any, tmp_path: Path) -> None:
    model = _cnn(digits)
    snap = _snapshot(model)
    recipe = {"finetune": _FINETUNE, "stages": [{stage: STAGE_CASES[stage]}]}
    result = ts.compress(model, recipe, digits, out=tmp_path / "run", progress=False, latency=False)
    _assert_same(snap, _snapshot(model))  # compress works on checkpoints, never on the given model
    assert [s["kind"] for s in result.report["stages"]] == ["original", stage]
    x = _inputs(result.model)
    again = ts.load(tmp_path / "run" / "model").eval()
    assert torch.equal(_outputs(again, x), _outputs(result.model.eval(), x)), f"{stage}: the saved model differs"


@pytest.mark.parametrize("stage", [e.name for e in entries("recipe_stage")])
def test_recipe_stage_refuses_an_unknown_field_before_any_work(stage: str, digits: Any, tmp_path: Path) -> None:
    model = _cnn(digits)
    snap = _snapshot(model)
    with pytest.raises(TorchslimError, match="nosuchfield"):
        ts.compress(model, {"stages": [{stage: {"nosuchfield": 1}}]}, digits, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    _assert_same(snap, _snapshot(model))


# ---------------------------------------------------------------------------- coverage of the registry


COVERED = {
    "plan": set(PLAN_CASES),
    "method": set(METHOD_CASES) | {"distill.loss"},
    "recipe_stage": set(STAGE_CASES) | set(STAGES_TESTED_ELSEWHERE),
}


def test_cases_tested_elsewhere_exist() -> None:
    root = Path(__file__).resolve().parents[1]
    for stage, where in STAGES_TESTED_ELSEWHERE.items():
        assert stage in (root / where).read_text(), f"{where} does not exercise the stage {stage!r}"


@pytest.mark.parametrize("kind", sorted(COVERED))
def test_every_registered_name_has_a_case(kind: str) -> None:
    if kind in ("plan", "recipe_stage"):
        missing = [e.name for e in entries(kind) if e.name not in COVERED[kind]]
    else:
        missing = [f"{e.family}.{e.short_name}" for e in entries("method") if e.family not in COVERED["method"]]
    assert not missing, f"registered {kind} names with no case in tests/test_contracts.py: {missing}"
