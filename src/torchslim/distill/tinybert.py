"""TinyBERT-style distillation of a compressed transformer from its original, on unlabeled text.

:func:`distill_hidden_` trains a (pruned, layer-dropped, factorized ...) student to reproduce its
teacher layer by layer (Jiao et al. 2020, TinyBERT; Sun et al. 2020, MobileBERT):

* hidden states: masked MSE between the output of student block ``i`` and teacher block
  ``layer_map[i]`` (padding tokens are left out);
* attention maps (optional): MSE between the student's and teacher's attention probabilities,
  recomputed from each BERT-style block's query / key projections (so it works whatever attention
  kernel the model uses); head by head when the counts agree, averaged over heads otherwise;
* output: ``1 - cosine`` between the student's and teacher's model outputs (for a sentence
  encoder, its embeddings).

No labels are needed: ``data`` is a list of sentences (tokenized with a ``pretrained:`` model's
tokenizer) or a list of ready batches (dicts of ``input_ids`` / ``attention_mask`` /
``token_type_ids``). The teacher is never changed. Unlike :func:`torchslim.distill.distill`
(a train loop over a labeled :class:`~torchslim.data.DataBundle`), this is a small self-contained
loop for post-compression recovery of text encoders.

Example:
    >>> import copy, torch, transformers
    >>> from torchslim.distill.tinybert import distill_hidden_
    >>> from torchslim.prune.heads import drop_layers_
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4,
    ...                               num_attention_heads=2, intermediate_size=32)
    >>> _ = torch.manual_seed(0)
    >>> teacher = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    >>> student = copy.deepcopy(teacher)
    >>> drop_layers_(student, [1, 2])
    [0, 3]
    >>> batches = [{"input_ids": torch.randint(1, 50, (4, 8))} for _ in range(3)]
    >>> result = distill_hidden_(student, teacher, batches, epochs=2, lr=1e-3, output_weight=0.0)
    >>> result.layer_map, len(result.losses)
    ({0: 1, 1: 3}, 2)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._select import as_patterns, check_patterns, matches
from torchslim._utils import evaluating, is_int, is_number, logits_of, model_device, saved_modes
from torchslim.errors import ConfigError
from torchslim.graph.blocks import attention_sites, layer_list

__all__ = ["HiddenDistillResult", "distill_hidden_", "default_layer_map"]

_CACHE_LIMIT_BYTES = 1 << 30
_DEFAULT_FREEZE: tuple[str, ...] = ("*word_embeddings*",)


def _param_and_module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules() if n]


@dataclass
class HiddenDistillResult:
    """What :func:`distill_hidden_` did.

    Attributes:
        epochs: epochs run.
        steps: optimizer steps taken.
        losses: mean training loss of every epoch.
        layer_map: student block index -> teacher block index used for the hidden-state term.
        seconds: wall time of the whole distillation.
        trained_parameters: number of student parameters that were trained (not frozen).
    """

    epochs: int
    steps: int
    losses: list[float] = field(default_factory=list)
    layer_map: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    trained_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        out["layer_map"] = {str(k): v for k, v in self.layer_map.items()}
        return out


def default_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Spread ``student_layers`` blocks evenly over the teacher's depth; the last meets the last.

    Example:
        >>> default_layer_map(4, 6)
        {0: 1, 1: 2, 2: 3, 3: 5}
    """
    return {i: max(0, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)}


def _blocks(model: nn.Module, who: str) -> nn.ModuleList:
    try:
        return layer_list(model)[1]
    except ConfigError as exc:
        raise ConfigError(f"the {who}: {exc}") from None


def _attention(model: nn.Module, who: str) -> list[tuple[nn.Linear, nn.Linear, int]]:
    """(query, key, head_dim) of every BERT-style attention block, in layer order."""
    sites = list(attention_sites(model).values())
    if not sites or any(not hasattr(s.module, "query") for s in sites):
        raise ConfigError(
            f"attention_weight > 0 needs BERT-style attention blocks (query/key/value) in the {who}; "
            "rotary-embedding (Llama-style) attention maps cannot be recomputed from the projections"
        )
    return [(s.q, s.k, s.head_dim) for s in sites]


def _as_batches(data: Any, batch_size: int, max_length: int, tokenizer_name: str) -> list[dict[str, torch.Tensor]]:
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise ConfigError(
            f"data must be a list of sentences or a list of tokenized batches (dicts); got {type(data).__name__}"
        )
    if not data:
        raise ConfigError("distillation data is empty; pass a non-empty list of sentences or tokenized batches")
    if all(isinstance(d, str) for d in data):
        from torchslim.data.sentences import calibration_batches

        return calibration_batches(list(data), model=tokenizer_name, batch_size=batch_size, max_length=max_length)
    if all(isinstance(d, Mapping) and isinstance(d.get("input_ids"), torch.Tensor) for d in data):
        return [dict(d) for d in data]
    raise ConfigError("data must be all sentences (str) or all tokenized batches (dicts holding an input_ids tensor)")


class _Recorder:
    """Forward hooks keeping the output hidden state of chosen blocks and the q / k projections."""

    def __init__(self, blocks: nn.ModuleList, keep: Sequence[int], attn: Sequence[tuple[nn.Linear, nn.Linear, int]]) -> None:
        self.hidden: dict[int, torch.Tensor] = {}
        self.qk: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for i in keep:
            self.handles.append(blocks[i].register_forward_hook(self._block_hook(i)))
        for i, (q, k, _hd) in enumerate(attn):
            self.handles.append(q.register_forward_hook(self._qk_hook(i, 0)))
            self.handles.append(k.register_forward_hook(self._qk_hook(i, 1)))

    def _block_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self.hidden[i] = out[0] if isinstance(out, (tuple, list)) else out

        return hook

    def _qk_hook(self, i: int, j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            self.qk.setdefault(i, [None, None])[j] = out  # type: ignore[list-item]

        return hook

    def clear(self) -> None:
        self.hidden, self.qk = {}, {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _attention_probs(q: torch.Tensor, k: torch.Tensor, head_dim: int, mask: torch.Tensor | None) -> torch.Tensor:
    n, t, _ = q.shape
    q = q.reshape(n, t, -1, head_dim).transpose(1, 2)
    k = k.reshape(n, t, -1, head_dim).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].bool(), torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1)


def _tensor_of(out: Any) -> torch.Tensor:
    t = logits_of(out, keys=("last_hidden_state", "logits"))
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"cannot find a tensor in the model output ({type(out).__name__})")
    return t


def _check(name: str, value: Any, low: float, *, integer: bool = False, strict: bool = True) -> None:
    ok = is_int(value) if integer else is_number(value)
    if not ok or (value <= low if strict else value < low):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind} {'>' if strict else '>='} {low}; got {value!r}")


def distill_hidden_(
    student: nn.Module,
    teacher: nn.Module,
    data: Sequence[str] | Sequence[Mapping[str, torch.Tensor]],
    *,
    layer_map: Mapping[int, int] | None = None,
    epochs: int = 4,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    warmup: float = 0.06,
    batch_size: int = 32,
    max_length: int = 128,
    hidden_weight: float = 1.0,
    attention_weight: float = 0.0,
    output_weight: float = 10.0,
    freeze: Sequence[str] = _DEFAULT_FREEZE,
    dropout: bool = False,
    cache_teacher: bool = True,
    tokenizer_name: str = "minilm",
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> HiddenDistillResult:
    """Train ``student`` to reproduce ``teacher``'s hidden states (and outputs), in place.

    Args:
        student: the compressed model (same call signature as the teacher); trained in place.
        teacher: the original model; run under ``no_grad``, never changed.
        data: sentences (tokenized with ``pretrained:<tokenizer_name>``'s tokenizer, in
            length-sorted batches of ``batch_size``) or ready batches (dicts of keyword inputs).
        layer_map: student block -> teacher block for the hidden-state term; default
            :func:`default_layer_map` (identity when the depths agree).
        epochs: passes over the data; batches are shuffled each epoch (seeded).
        lr: peak AdamW learning rate (linear warm-up over ``warmup`` of the steps, then linear
            decay to zero).
        weight_decay: AdamW weight decay.
        hidden_weight: weight of the hidden-state MSE (summed over mapped blocks).
        attention_weight: weight of the attention-map MSE (BERT-style blocks only; 0 = off).
        output_weight: weight of ``1 - cosine`` between the student's and teacher's outputs.
        freeze: student parameters kept fixed, by parameter or module name, glob or ``re:``
            pattern (a module's name freezes all its parameters). Not a selection of layers to
            compress, hence its own name. Default: the word-embedding table (the text only touches
            a fraction of the vocabulary, and moving those rows alone would tear them from the
            rest); a pattern given that names nothing in the student is refused before training.
        dropout: keep the student's dropout on while training (off by default: the target is
            the teacher's deterministic output, not a regularised fit).
        cache_teacher: compute the teacher's targets once (when they fit in 1 GiB).
        seed: seed of the batch order.
        callback: ``callback(epoch, mean_loss)`` after every epoch.

    Returns:
        A :class:`HiddenDistillResult`.

    Raises:
        ConfigError: empty or malformed data, a bad number, a layer map naming blocks the models
            lack, every loss weight zero, every parameter frozen, or student hidden states of
            another shape than the teacher's. The student is unchanged then.
    """
    _check("epochs", epochs, 1, integer=True, strict=False)
    _check("lr", lr, 0)
    _check("batch_size", batch_size, 1, integer=True, strict=False)
    _check("max_length", max_length, 2, integer=True, strict=False)
    for name, value in (("weight_decay", weight_decay), ("hidden_weight", hidden_weight),
                        ("attention_weight", attention_weight), ("output_weight", output_weight)):
        _check(name, value, 0, strict=False)
    if not is_number(warmup) or not 0 <= warmup < 1:
        raise ConfigError(f"warmup must be a fraction in [0, 1); got {warmup!r}")
    if not (hidden_weight or attention_weight or output_weight):
        raise ConfigError("hidden_weight, attention_weight and output_weight are all 0: nothing to distill")
    default_freeze = freeze == _DEFAULT_FREEZE
    freeze = as_patterns(freeze, "freeze", none_ok=False)
    if not default_freeze:  # the default fits BERT-like students; one the user names must exist
        check_patterns(freeze, _param_and_module_names(student), "freeze")
    s_blocks, t_blocks = _blocks(student, "student"), _blocks(teacher, "teacher")
    if layer_map is None:
        layer_map = default_layer_map(len(s_blocks), len(t_blocks))
    bad = {
        k: v for k, v in dict(layer_map).items()
        if not (is_int(k) and is_int(v) and 0 <= k < len(s_blocks) and 0 <= v < len(t_blocks))
    }
    if bad or not layer_map:
        raise ConfigError(
            f"layer_map must map student blocks [0, {len(s_blocks)}) to teacher blocks [0, {len(t_blocks)}); "
            f"got {dict(layer_map)!r}"
        )
    layer_map = {int(k): int(v) for k, v in sorted(layer_map.items())}
    s_attn = _attention(student, "student") if attention_weight else []
    t_attn = _attention(teacher, "teacher") if attention_weight else []
    if attention_weight and (max(layer_map) >= len(s_attn) or max(layer_map.values()) >= len(t_attn)):
        raise ConfigError("attention_weight > 0 needs one attention block per transformer block in both models")
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    trained = [p for n, p in params if not any(matches(n, f) for f in freeze)]
    if not trained:
        raise ConfigError(f"freeze={list(freeze)!r} leaves no trainable student parameter")
    batches = _as_batches(data, batch_size, max_length, tokenizer_name)

    t0 = time.time()
    device = model_device(student)
    frozen = [p for n, p in params if any(matches(n, f) for f in freeze)]
    s_rec = _Recorder(s_blocks, list(layer_map), [s_attn[i] for i in layer_map] if s_attn else [])
    t_rec = _Recorder(t_blocks, sorted(set(layer_map.values())), t_attn)

    def teacher_targets(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        t_rec.clear()
        with torch.no_grad(), evaluating(teacher):
            out = teacher(**b)
        mask = b.get("attention_mask")
        attn = {}
        for si, ti in layer_map.items():
            if attention_weight:
                q, k = t_rec.qk[ti]
                attn[si] = _attention_probs(q, k, t_attn[ti][2], mask).detach()
        hidden = {ti: h.detach() for ti, h in t_rec.hidden.items()}
        return _tensor_of(out).detach(), hidden, attn

    cached = None
    steps_total = epochs * len(batches)
    warm = max(1, int(warmup * steps_total))
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps_total - s) / max(1, steps_total - warm))
    )
    for p in frozen:
        p.requires_grad_(False)
    result = HiddenDistillResult(epochs=0, steps=0, layer_map=dict(layer_map), trained_parameters=sum(p.numel() for p in trained))
    restore_modes = saved_modes(student)
    gen = torch.Generator().manual_seed(seed)
    try:
        moved = [{k: v.to(device) for k, v in b.items()} for b in batches]
        if cache_teacher:
            first = teacher_targets(moved[0])
            size = sum(t.numel() * t.element_size() for t in [first[0], *first[1].values(), *first[2].values()])
            tokens = sum(b["input_ids"].numel() for b in moved) / moved[0]["input_ids"].numel()
            if size * tokens <= _CACHE_LIMIT_BYTES:
                cached = [first] + [teacher_targets(b) for b in moved[1:]]
        student.train(dropout)
        for epoch in range(epochs):
            total = 0.0
            for i in torch.randperm(len(moved), generator=gen).tolist():
                b = moved[i]
                t_out, t_hidden, t_attn_p = cached[i] if cached is not None else teacher_targets(b)
                s_rec.clear()
                out = _tensor_of(student(**b))
                mask = b.get("attention_mask")
                m = (mask if mask is not None else torch.ones_like(b["input_ids"])).unsqueeze(-1).to(out.dtype)
                loss = out.new_zeros(())
                if hidden_weight:
                    for si, ti in layer_map.items():
                        h, ht = s_rec.hidden[si], t_hidden[ti]
                        if h.shape != ht.shape:  # found on the first step, before any weight moved
                            raise ConfigError(
                                f"student block {si} gives hidden states {tuple(h.shape)} but teacher block {ti} gives "
                                f"{tuple(ht.shape)}; distill_hidden_ needs the same hidden size (prune heads / neurons, "
                                "not the hidden width)"
                            )
                        loss = loss + hidden_weight * (((h - ht) ** 2) * m).sum() / (m.sum() * h.shape[-1])
                if attention_weight:
                    for j, si in enumerate(layer_map):
                        q, k = s_rec.qk[j]
                        a_s, a_t = _attention_probs(q, k, s_attn[si][2], mask), t_attn_p[si]
                        if a_s.shape[1] != a_t.shape[1]:
                            a_s, a_t = a_s.mean(dim=1), a_t.mean(dim=1)
                        loss = loss + attention_weight * F.mse_loss(a_s, a_t, reduction="sum") / (m.sum() * a_s.shape[-1])
                if output_weight:
                    loss = loss + output_weight * (1 - F.cosine_similarity(out.flatten(1), t_out.flatten(1), dim=-1)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
                result.steps += 1
            result.epochs = epoch + 1
            result.losses.append(total / len(moved))
            if callback is not None:
                callback(epoch, result.losses[-1])
    finally:
        s_rec.remove()
        t_rec.remove()
        for p in frozen:
            p.requires_grad_(True)
        restore_modes()
    result.seconds = time.time() - t0
    return result
