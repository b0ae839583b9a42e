"""heal_ and LoRA: a pruned tiny Llama gets closer to its teacher on held-out tokens; LoRA merges back
to the stock module tree with the wrapped outputs; resume continues exactly; the time budget stops
training; bad input is refused with the student unchanged; only the training split is read."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from torchslim.distill import LoRALinear, add_lora_, default_layer_map, heal_, merge_lora_, remove_lora_
from torchslim.distill.heal import CHECKPOINT_NAME, native_bf16
from torchslim.errors import CheckpointError, ConfigError
from torchslim.graph.state import state_digest

transformers = pytest.importorskip("transformers")

VOCAB = 64
FAST = {"seq_len": 32, "batch_size": 4, "progress": False}


def _llama(layers: int = 4, hidden: int = 32, vocab: int = VOCAB, seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, initializer_range=0.1)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _drop_layer(model, i: int):
    """Remove decoder layer ``i`` by hand (what a depth pruner does)."""
    del model.model.layers[i]
    model.config.num_hidden_layers = len(model.model.layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for j, t in enumerate(model.config.layer_types) if j != i]
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = j
    return model


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _kl(student, teacher, ids: torch.Tensor) -> float:
    x = ids[: (ids.numel() // 32) * 32].view(-1, 32)
    with torch.no_grad():
        s = student(input_ids=x).logits.log_softmax(-1)
        t = teacher(input_ids=x).logits.log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


TRAIN, HELD_OUT = _ids(4096, 1), _ids(1024, 2)


def test_heal_brings_a_depth_pruned_student_closer_to_its_teacher_on_held_out_tokens():
    teacher = _llama()
    student = _drop_layer(copy.deepcopy(teacher), 2)
    keys = list(student.state_dict())
    teacher_before = state_digest(teacher)
    before = _kl(student, teacher, HELD_OUT)
    result = heal_(student, teacher, TRAIN, max_steps=30, lr=1e-3, **FAST)
    after = _kl(student, teacher, HELD_OUT)
    assert after < 0.7 * before, (before, after)
    assert (result.steps, result.tokens, result.stopped) == (30, 30 * 4 * 32, "max_steps")
    assert result.layer_map == default_layer_map(3, 4) == {0: 0, 1: 2, 2: 3}  # spread over the teacher's 4 layers
    assert result.loss_end < result.loss_start and 1 <= len(result.loss_curve) <= 20
    assert result.tokens_per_second > 0 and result.resumed_from is None and not result.lora_merged
    assert state_digest(teacher) == teacher_before
    assert list(student.state_dict()) == keys and all(p.requires_grad for p in student.parameters())
    assert not student.training
    assert set(result.to_dict()) >= {"steps", "tokens", "minutes", "loss_curve", "resumed_from", "lora_merged"}


def test_the_default_layer_map_follows_the_layers_a_depth_pruner_kept():
    from torchslim._modelinfo import record_plan

    teacher = _llama()
    record_plan(teacher, {"kind": "prune_channels", "note": "an earlier plan the student shares"})
    student = _drop_layer(copy.deepcopy(teacher), 0)
    record_plan(student, {"kind": "prune_depth", "layers": [0], "num_layers": 4, "list": "model.layers"})
    _drop_layer(student, 1)
    record_plan(student, {"kind": "prune_depth", "layers": [1], "num_layers": 3, "list": "model.layers"})
    result = heal_(student, teacher, TRAIN, max_steps=1, **FAST)
    assert result.layer_map == {0: 1, 1: 3}
    assert heal_(student, teacher, TRAIN, max_steps=1, layer_map={1: 2}, **FAST).layer_map == {1: 2}


def test_heal_with_lora_merges_back_into_a_stock_model():
    teacher = _llama(layers=2)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    embed = student.model.embed_tokens.weight.clone()
    keys = list(student.state_dict())
    before = _kl(student, teacher, HELD_OUT)
    result = heal_(student, teacher, TRAIN, max_steps=30, lr=1e-2, lora_rank=4, **FAST)
    assert _kl(student, teacher, HELD_OUT) < 0.8 * before
    assert result.lora_merged and result.lora_rank == 4
    assert not any(isinstance(m, LoRALinear) for m in student.modules())
    assert type(student.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert list(student.state_dict()) == keys
    assert torch.equal(student.model.embed_tokens.weight, embed)  # only the decoder layers were adapted
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in student.model.layers.modules())
    assert result.trained_parameters < sum(p.numel() for p in student.model.layers.parameters())
    assert n_linear == 14


def test_lora_merge_gives_the_wrapped_outputs_and_the_original_keys():
    model = _llama(layers=2)
    keys = list(model.state_dict())
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    names = add_lora_(model.model.layers, rank=3, alpha=6.0, seed=1)
    assert len(names) == 14 and all(isinstance(model.model.layers.get_submodule(n), LoRALinear) for n in names)
    assert not q_weight.requires_grad
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        for layer in model.model.layers.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(0.0, 0.05)
        wrapped = model(input_ids=ids).logits
    assert not torch.allclose(wrapped, base, atol=1e-4)  # the adapters do change the outputs
    assert merge_lora_(model.model.layers) == names
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, wrapped, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.model.layers[0].self_attn.q_proj.weight is q_weight and q_weight.requires_grad


def test_lora_remove_undoes_and_bad_rank_is_refused():
    tiny_llama = _llama(layers=2)
    digest = state_digest(tiny_llama)
    with pytest.raises(ConfigError, match="rank"):
        add_lora_(tiny_llama.model.layers, rank=0)
    assert state_digest(tiny_llama) == digest
    add_lora_(tiny_llama.model.layers, rank=2)
    remove_lora_(tiny_llama.model.layers)
    assert state_digest(tiny_llama) == digest


def test_resume_continues_from_the_checkpoint_as_an_unbroken_run(tmp_path):
    teacher = _llama(layers=3)
    pruned = _drop_layer(copy.deepcopy(teacher), 1)
    kw = dict(lr=1e-3, checkpoint_dir=tmp_path, hidden_weight=1.0, **FAST)  # the hidden term's adapters resume too

    first = copy.deepcopy(pruned)
    r1 = heal_(first, teacher, TRAIN, max_steps=10, **kw)
    assert r1.steps == 10 and (tmp_path / CHECKPOINT_NAME).exists()
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 10 and len(saved["optimizer"]["state"]) > 0

    resumed = copy.deepcopy(pruned)  # a new process would start from the pruned weights again
    r2 = heal_(resumed, teacher, TRAIN, max_steps=20, **kw)
    assert (r2.resumed_from, r2.steps, r2.tokens) == (10, 20, 20 * 4 * 32)
    assert r2.minutes >= r1.minutes
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 20 and len(saved["losses"]) == 20
    assert all(int(s["step"]) == 20 for s in saved["optimizer"]["state"].values())  # Adam's step counters went on

    straight = copy.deepcopy(pruned)
    heal_(straight, teacher, TRAIN, max_steps=20, lr=1e-3, hidden_weight=1.0, **FAST)
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)

    again = copy.deepcopy(pruned)  # the budget reached: nothing more to do, the checkpoint's weights loaded
    r3 = heal_(again, teacher, TRAIN, max_steps=20, **kw)
    assert r3.steps == 20 and r3.resumed_from == 20 and r3.tokens_per_second == 0.0
    torch.testing.assert_close(again.state_dict(), resumed.state_dict())


def test_an_interrupted_cosine_run_resumes_into_the_run_that_never_stopped(tmp_path, monkeypatch):
    from torchslim.distill import heal as heal_module

    teacher = _llama(layers=3)
    pruned = _drop_layer(copy.deepcopy(teacher), 1)
    kw = dict(max_steps=20, lr=1e-3, schedule="cosine", seq_len=32, batch_size=4)

    def stop_at_step_12(line, progress):
        if "step 12/" in line:
            raise KeyboardInterrupt  # the user's Ctrl-C after step 12, before its checkpoint
    monkeypatch.setattr(heal_module, "_say", stop_at_step_12)
    with pytest.raises(KeyboardInterrupt):
        heal_(copy.deepcopy(pruned), teacher, TRAIN, checkpoint_dir=tmp_path, checkpoint_every=1e-9, log_every=1, **kw)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 11
    monkeypatch.undo()

    resumed = copy.deepcopy(pruned)
    r = heal_(resumed, teacher, TRAIN, checkpoint_dir=tmp_path, progress=False, **kw)
    assert (r.resumed_from, r.steps) == (11, 20)
    with pytest.raises(CheckpointError, match="schedule='cosine', but this run uses schedule='constant'"):
        heal_(copy.deepcopy(pruned), teacher, TRAIN, checkpoint_dir=tmp_path, progress=False, **{**kw, "schedule": "constant"})
    straight = copy.deepcopy(pruned)
    heal_(straight, teacher, TRAIN, progress=False, **kw)
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)


def test_resume_with_other_settings_is_refused_and_the_student_unchanged(tmp_path):
    teacher = _llama(layers=2)
    heal_(copy.deepcopy(teacher), teacher, TRAIN, max_steps=2, checkpoint_dir=tmp_path, **FAST)
    student = copy.deepcopy(teacher)
    digest = state_digest(student)
    with pytest.raises(CheckpointError, match="seq_len"):
        heal_(student, teacher, TRAIN, max_steps=4, checkpoint_dir=tmp_path, seq_len=16, progress=False)
    with pytest.raises(CheckpointError, match="another student"):
        heal_(_llama(layers=2, hidden=16), teacher, TRAIN, max_steps=4, checkpoint_dir=tmp_path, **FAST)
    student = copy.deepcopy(teacher)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged"):
        heal_(student, teacher, TRAIN, max_steps=4, checkpoint_dir=tmp_path, **FAST)
    assert state_digest(student) == digest
    r = heal_(student, teacher, TRAIN, max_steps=1, checkpoint_dir=tmp_path, resume=False, **FAST)
    assert r.resumed_from is None and r.steps == 1


def test_bfloat16_autocast_heals_and_leaves_float32_weights():
    teacher = _llama(layers=3)
    pruned = _drop_layer(copy.deepcopy(teacher), 1)
    before = _kl(pruned, teacher, HELD_OUT)
    got = {}
    for precision in ("bfloat16", "float32"):
        student = copy.deepcopy(pruned)
        result = heal_(student, teacher, TRAIN, max_steps=20, lr=1e-3, precision=precision, **FAST)
        assert result.precision == precision
        assert all(p.dtype == torch.float32 for p in student.parameters())  # master weights stay float32
        got[precision] = _kl(student, teacher, HELD_OUT)
        assert got[precision] < 0.8 * before, (precision, before, got[precision])
    assert got["bfloat16"] != got["float32"]  # autocast really ran: the same training, rounded differently
    assert abs(got["bfloat16"] - got["float32"]) < 0.25 * before
    auto = heal_(copy.deepcopy(pruned), teacher, TRAIN, max_steps=1, **FAST)
    assert auto.precision == ("bfloat16" if native_bf16(torch.device("cpu")) else "float32")


def test_the_learning_rate_warms_up_then_stays_or_follows_a_cosine_to_a_tenth(tmp_path):
    teacher = _llama(layers=2)
    for schedule, steps, want in [("constant", 3, 1e-3 * 3 / 5), ("constant", 10, 1e-3),
                                  ("cosine", 10, 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 10))))]:
        folder = tmp_path / f"{schedule}{steps}"
        heal_(copy.deepcopy(teacher), teacher, TRAIN, max_steps=steps, lr=1e-3, schedule=schedule,
              checkpoint_dir=folder, **FAST)
        saved = torch.load(folder / CHECKPOINT_NAME, weights_only=True)
        assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(want, rel=1e-9), schedule  # the last step's


def test_the_minutes_budget_stops_training():
    teacher = _llama(layers=2)
    student = copy.deepcopy(teacher)
    result = heal_(student, teacher, TRAIN, minutes=0.005, max_steps=100_000, **FAST)
    assert result.stopped == "minutes" and result.steps < 100_000
    assert result.minutes < 0.005 + 0.05  # at most one step past the budget, and no step is that slow


def test_narrower_student_trains_through_an_adapter_that_is_not_kept():
    teacher = _llama(layers=2, hidden=32)
    student = _llama(layers=2, hidden=16, seed=1)
    keys = list(student.state_dict())
    before = _kl(student, teacher, HELD_OUT)
    result = heal_(student, teacher, TRAIN, max_steps=20, lr=1e-3, hidden_weight=1.0, hidden_loss="mse", **FAST)
    assert result.steps == 20 and _kl(student, teacher, HELD_OUT) < before
    assert list(student.state_dict()) == keys


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"minutes": 0}, "minutes must be a number > 0"),
        ({"minutes": -1.0}, "minutes"),
        ({"max_steps": 0}, "max_steps"),
        ({"seq_len": 1}, "seq_len"),
        ({"lr": 0}, "lr"),
        ({"hidden_loss": "l1"}, "hidden_loss must be one of"),
        ({"layer_map": {0: 9}}, r"layer_map must map student decoder layers \[0, 2\) to teacher layers \[0, 2\)"),
        ({"lora_alpha": 8.0}, "lora_alpha needs lora_rank"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"seq_len": 8192}, "fewer than one window"),
        ({"precision": "float16"}, "precision must be one of 'auto', 'bfloat16', 'float32'"),
        ({"schedule": "linear"}, "schedule must be one of 'constant', 'cosine'"),
    ],
)
def test_bad_input_is_refused_and_the_student_unchanged(kwargs, match):
    teacher = _llama(layers=2)
    student = copy.deepcopy(teacher)
    digest = state_digest(student)
    with pytest.raises(ConfigError, match=match):
        heal_(student, teacher, TRAIN, **{**FAST, "max_steps": 2, **kwargs})
    assert state_digest(student) == digest


def test_models_with_other_vocabularies_or_ids_outside_it_are_refused():
    teacher = _llama(layers=2)
    student = _llama(layers=2, vocab=80)
    digest = state_digest(student)
    with pytest.raises(ConfigError, match="vocabulary has 80 tokens and the teacher's 64"):
        heal_(student, teacher, TRAIN, max_steps=2, **FAST)
    assert state_digest(student) == digest
    student = copy.deepcopy(teacher)
    with pytest.raises(ConfigError, match=r"token ids must lie in \[0, 64\)"):
        heal_(student, teacher, TRAIN + 100, max_steps=2, **FAST)
    with pytest.raises(ConfigError, match="the student is the teacher"):
        heal_(teacher, teacher, TRAIN, max_steps=2, **FAST)


def test_text_data_reads_the_training_split_only_and_logs_progress(tmp_path, caplog):
    from torchslim.data import load_data

    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i} of the text\n" for i in range(800)))
    bundle = load_data(f"text:{path}")
    seen: list[str] = []

    def tokenizer(text: str) -> list[int]:
        seen.append(text)
        return [ord(c) % VOCAB for c in text]

    teacher = _llama(layers=2)
    with caplog.at_level(logging.INFO, logger="torchslim.distill.heal"):
        result = heal_(copy.deepcopy(teacher), teacher, bundle, tokenizer=tokenizer, max_steps=4, seq_len=32,
                       batch_size=2, log_every=2)
    assert result.steps == 4
    assert seen and all(text in bundle.text("train") for text in seen)
    assert not any(bundle.text("test")[:200] in text or bundle.text("val")[:200] in text for text in seen)
    lines = [r.getMessage() for r in caplog.records if r.name == "torchslim.distill.heal"]
    assert len(lines) == 2 and "step 2/4" in lines[0] and "tokens/s" in lines[0] and "min left" in lines[0]
