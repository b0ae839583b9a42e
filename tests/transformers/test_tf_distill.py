"""TinyBERT-style hidden-state / attention distillation of pruned transformers (small configs)."""

from __future__ import annotations

import copy

import pytest
import torch

from torchslim.distill.tinybert import default_layer_map, distill_hidden_
from torchslim.errors import ConfigError
from torchslim.prune.heads import drop_layers_, prune_ffn_, prune_heads_

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _encoder(layers: int = 4) -> torch.nn.Module:
    from torchslim.zoo.pretrained import SentenceEncoder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return SentenceEncoder(transformers.BertModel(cfg, add_pooling_layer=False).eval())


def _batches(n: int = 6) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (8, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[:3, 9:] = 0  # some padding
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _error(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Relative error of the student's last hidden state (random-init embeddings are all alike)."""
    with torch.no_grad():
        hs = torch.cat([student.hidden_states(**b) for b in batches])
        ht = torch.cat([teacher.hidden_states(**b) for b in batches])
    return float((hs - ht).norm() / ht.norm())


def _pruned_student(teacher: torch.nn.Module) -> torch.nn.Module:
    student = copy.deepcopy(teacher)
    prune_heads_(student, {f"encoder.encoder.layer.{i}.attention": [0, 1] for i in range(4)})
    prune_ffn_(student, {f"encoder.encoder.layer.{i}": list(range(32)) for i in range(4)})
    drop_layers_(student, [1])
    return student


def test_distillation_recovers_a_pruned_student_and_leaves_teacher_alone() -> None:
    teacher = _encoder()
    student = _pruned_student(teacher)
    teacher_before, emb_before = _state(teacher), student.encoder.embeddings.word_embeddings.weight.clone()
    modes = [m.training for m in student.modules()]
    data = _batches()
    before = _error(student, teacher, data)
    result = distill_hidden_(student, teacher, data, epochs=8, lr=1e-3, warmup=0.0, attention_weight=1.0)
    after = _error(student, teacher, data)
    assert result.epochs == 8 and result.steps == 8 * len(data) and len(result.losses) == 8
    assert result.layer_map == {0: 0, 1: 2, 2: 3}
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert after < 0.7 * before
    assert _same(teacher_before, _state(teacher))
    assert torch.equal(student.encoder.embeddings.word_embeddings.weight, emb_before)  # frozen by default
    assert all(p.requires_grad for p in student.parameters())  # freezing is undone
    assert [m.training for m in student.modules()] == modes  # train/eval modes restored


def test_explicit_layer_map_and_dropped_layers() -> None:
    teacher = _encoder()
    student = copy.deepcopy(teacher)
    keep = drop_layers_(student, [0, 2])
    result = distill_hidden_(student, teacher, _batches(2), layer_map=dict(enumerate(keep)), epochs=1, freeze=())
    assert result.layer_map == {0: 1, 1: 3}
    assert default_layer_map(2, 4) == {0: 1, 1: 3}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": []}, "empty"),
        ({"data": "one sentence"}, "list of sentences"),
        ({"layer_map": {0: 9}}, "layer_map"),
        ({"layer_map": {5: 0}}, "layer_map"),
        ({"hidden_weight": 0.0, "output_weight": 0.0}, "nothing to distill"),
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"freeze": ["*"]}, "no trainable"),
    ],
)
def test_bad_input_raises_and_leaves_the_student_unchanged(kwargs: dict, match: str) -> None:
    teacher = _encoder()
    student = _pruned_student(teacher)
    before = _state(student)
    args = {"data": _batches(2), **kwargs}
    with pytest.raises(ConfigError, match=match):
        distill_hidden_(student, teacher, args.pop("data"), **args)
    assert _same(before, _state(student))


def test_hidden_width_mismatch_raises_before_training() -> None:
    teacher = _encoder()
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32)
    from torchslim.zoo.pretrained import SentenceEncoder

    student = SentenceEncoder(transformers.BertModel(cfg, add_pooling_layer=False))
    before = _state(student)
    with pytest.raises(ConfigError, match="same hidden size"):
        distill_hidden_(student, teacher, _batches(2), output_weight=0.0)
    assert _same(before, _state(student))


def test_attention_term_needs_bert_style_attention() -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    llama = transformers.LlamaForCausalLM(cfg).eval()
    student = copy.deepcopy(llama)
    batches = [{"input_ids": b["input_ids"]} for b in _batches(2)]
    with pytest.raises(ConfigError, match="BERT-style"):
        distill_hidden_(student, llama, batches, attention_weight=1.0)
    result = distill_hidden_(student, llama, batches, epochs=1, output_weight=0.0)  # hidden states alone work
    assert result.steps == 2
