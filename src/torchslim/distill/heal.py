"""Healing a pruned decoder LLM by distillation from the unpruned one, on a CPU, under a time budget.

:func:`heal_` trains ``student`` (a width- or depth-pruned copy of ``teacher``) on windows of
``seq_len`` tokens of the *training* split of a text data spec (``shakespeare``: the
calibration plays, never the held-out ones), with the loss

* ``T^2 KL(p_teacher^T || p_student^T)`` per token over the vocabulary (logit distillation,
  :func:`~torchslim.distill.losses.vocab_kl_loss`: the value and gradient of ``kd_loss``, made in
  one cache-sized pass), plus
* ``hidden_weight`` (default 0: off) x the mean over mapped layers of a hidden-state distance between the output
  of student decoder layer ``i`` and teacher layer ``layer_map[i]``: ``1 - cosine`` per token
  (``hidden_loss="cosine"``, default: blind to the few huge activations LLMs carry) or the
  squared error relative to the teacher's norm per token (``"mse"``). When the hidden widths
  differ the student's side goes through a learned linear adapter, trained alongside and thrown
  away after (never saved with the student).

The teacher runs in eval mode under ``no_grad``. With ``precision="auto"`` (default) both
models' forward and backward passes run under bfloat16 autocast where the hardware multiplies
bfloat16 natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX, as oneDNN reports),
the weights, the optimizer state and the loss staying float32; on SmolLM2-135M pruned by 30% on
2 AMD EPYC cores a step takes about 0.6x the time of a float32 one. Training stops at ``max_steps`` or before a step
that would run past ``minutes`` of wall clock (counted from the call, tokenization included),
whichever comes first. The token and word embeddings stay fixed (the text touches a fraction of
the vocabulary); everything else trains, or with ``lora_rank=r`` only low-rank adapters on every
``nn.Linear`` of the decoder layers (:mod:`~torchslim.distill.lora`), merged into the weights at
the end so the model is a stock transformers model again.

With ``checkpoint_dir`` the run is resumable: the student's weights, the adapters, the optimizer,
the step, the minutes spent, the loss curve and the RNG state are written atomically every
``checkpoint_every`` minutes and at the end (``heal.pt``), and a later call with ``resume=True``
continues from there; ``minutes`` and ``max_steps`` then count the earlier runs too. The batch of
step ``s`` is a function of ``(seed, s)`` only, so a resumed run sees the batches a run that never
stopped would have seen.

Example:
    >>> import copy, torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> _ = torch.manual_seed(0)
    >>> teacher = transformers.LlamaForCausalLM(cfg).eval()
    >>> student = copy.deepcopy(teacher)
    >>> result = heal_(student, teacher, torch.randint(0, 64, (2000,)), max_steps=3, seq_len=32,
    ...                lora_rank=4, progress=False)
    >>> result.steps, result.tokens, result.lora_merged, result.stopped
    (3, 384, True, 'max_steps')
"""

from __future__ import annotations

import logging
import math
import sys
import time
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._fs import atomic_path
from torchslim._utils import evaluating, is_int, is_number, logits_of, model_device
from torchslim.distill.lora import add_lora_, lora_layers, lora_parameters, merge_lora_, remove_lora_
from torchslim.distill.losses import make_adapter, vocab_kl_loss
from torchslim.distill.tinybert import _Recorder, default_layer_map
from torchslim.errors import CheckpointError, ConfigError
from torchslim.graph.blocks import layer_list

__all__ = ["HealResult", "heal_"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "heal.pt"
_FORMAT = "torchslim.distill.heal/1"
_MAX_TOKENS = 1 << 20  # training tokens read from a text spec, plays in file order (shakespeare's: ~2.5M in all)
_HIDDEN_LOSSES = ("cosine", "mse")
PRECISIONS = ("auto", "bfloat16", "float32")
_WARMUP_STEPS = 5
# settings a checkpoint must share with the run that resumes it
_RESUME_KEYS = ("seq_len", "batch_size", "lr", "temperature", "hidden_weight", "hidden_loss", "layer_map",
                "lora_rank", "lora_alpha", "seed", "windows", "schedule")
_RESUME_DEFAULTS = {"schedule": "constant"}  # checkpoints written before the setting existed
SCHEDULES = ("constant", "cosine")
_FINAL_LR = 0.1  # cosine: the learning rate at the end of the budget, as a fraction of lr


@dataclass
class HealResult:
    """What :func:`heal_` did.

    Attributes:
        steps: optimizer steps taken in all, earlier (resumed) runs included.
        tokens: training tokens the student saw in all (``steps x batch_size x seq_len``).
        minutes: wall-clock minutes spent in all, earlier runs included.
        stopped: why training ended: ``"max_steps"`` or ``"minutes"``.
        resumed_from: the step the run continued from (``None``: a fresh start).
        tokens_per_second: training throughput of this call (teacher and student passes included).
        loss_start: mean loss of the first (up to 10) steps.
        loss_end: mean loss of the last (up to 10) steps.
        loss_curve: the loss averaged over up to 20 equal spans of the steps, in order.
        layer_map: student decoder layer -> teacher decoder layer of the hidden-state term.
        lora_rank: rank of the LoRA adapters (``None``: all non-embedding weights trained).
        lora_merged: whether LoRA adapters were merged into the weights (and removed).
        trained_parameters: number of parameters trained (LoRA adapters, or the student's own;
            hidden-width adapters not counted).
        checkpoint: path of the checkpoint file, or ``None``.
        precision: what the passes of this call computed in: ``"bfloat16"`` (autocast) or ``"float32"``.
    """

    steps: int
    tokens: int
    minutes: float
    stopped: str
    resumed_from: int | None = None
    tokens_per_second: float = 0.0
    loss_start: float | None = None
    loss_end: float | None = None
    loss_curve: list[float] = field(default_factory=list)
    layer_map: dict[int, int] = field(default_factory=dict)
    lora_rank: int | None = None
    lora_merged: bool = False
    trained_parameters: int = 0
    checkpoint: str | None = None
    precision: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        out["layer_map"] = {str(k): v for k, v in self.layer_map.items()}
        return out


# --------------------------------------------------------------------------- checks


def _number(name: str, value: Any, low: float, *, integer: bool = False, strict: bool = True) -> None:
    ok = is_int(value) if integer else is_number(value) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind} {'>' if strict else '>='} {low}; got {value!r}")


def _vocab(model: nn.Module) -> int | None:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if isinstance(out, nn.Linear):
        return int(out.out_features)
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    v = getattr(cfg, "vocab_size", None)
    return int(v) if is_int(v) else None


def _width(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        return int(emb.embedding_dim)
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "hidden_size", None)
    return int(v) if is_int(v) else None


def _blocks(model: nn.Module, who: str) -> tuple[str, nn.ModuleList]:
    try:
        return layer_list(model)
    except ConfigError as exc:
        raise ConfigError(f"the {who}: {exc}") from None


def _kept_layers(student: nn.Module, teacher: nn.Module, n_student: int, n_teacher: int) -> list[int] | None:
    """Teacher indices of the student's layers, from the layer removals (``prune_depth`` plans,
    :func:`torchslim.prune.remove_layers_`) the student records beyond the teacher's own plans."""
    from torchslim._modelinfo import model_info

    s_info, t_info = model_info(student), model_info(teacher)
    plans = list(s_info.plans) if s_info is not None else []
    t_plans = list(t_info.plans) if t_info is not None else []
    if plans[: len(t_plans)] == t_plans:
        plans = plans[len(t_plans):]
    kept, found = list(range(n_teacher)), False
    for plan in plans:
        removed = plan.get("layers")
        if plan.get("kind") != "prune_depth" or not isinstance(removed, list) or not all(is_int(i) for i in removed):
            continue
        if plan.get("num_layers", len(kept)) != len(kept):
            return None  # removals from another model than this teacher
        gone = {int(i) for i in removed}
        kept = [t for i, t in enumerate(kept) if i not in gone]
        found = True
    return kept if found and len(kept) == n_student else None


def _resolve_layer_map(layer_map: Mapping[int, int] | None, student: nn.Module, teacher: nn.Module,
                       n_s: int, n_t: int) -> dict[int, int]:
    if layer_map is None:
        if n_s == n_t:
            return {i: i for i in range(n_s)}
        kept = _kept_layers(student, teacher, n_s, n_t)
        return {i: t for i, t in enumerate(kept)} if kept else default_layer_map(n_s, n_t)
    if not isinstance(layer_map, Mapping) or not layer_map or any(
        not (is_int(k) and is_int(v) and 0 <= k < n_s and 0 <= v < n_t) for k, v in layer_map.items()
    ):
        raise ConfigError(f"layer_map must map student decoder layers [0, {n_s}) to teacher layers [0, {n_t}) "
                          f"(a non-empty dict of ints); got {layer_map!r}")
    return {int(k): int(v) for k, v in sorted(layer_map.items())}


def _windows(data: Any, tokenizer: Any, teacher: nn.Module, seq_len: int, vocab: int | None) -> torch.Tensor:
    """``(n, seq_len)`` token windows of the training split (or of the given ids)."""
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        if data.dtype not in (torch.int64, torch.int32) or data.shape[1] < seq_len or not len(data):
            raise ConfigError(f"token windows must be a 2-D integer tensor with at least seq_len={seq_len} columns; "
                              f"got {tuple(data.shape)} {data.dtype}")
        rows = data[:, :seq_len].long()
    else:
        from torchslim.lm.evaluate import resolve_tokenizer, text_tokens

        if not isinstance(data, torch.Tensor):
            tokenizer = resolve_tokenizer(teacher, tokenizer)
        ids, what = text_tokens(data, tokenizer, split="train", max_tokens=_MAX_TOKENS)
        n = ids.numel() // seq_len
        if n < 1:
            raise ConfigError(f"{what} has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
                              "use a shorter seq_len or more text")
        rows = ids[: n * seq_len].view(n, seq_len)
    if vocab is not None and (int(rows.max()) >= vocab or int(rows.min()) < 0):
        raise ConfigError(f"token ids must lie in [0, {vocab}) (the models' vocabulary); got ids "
                          f"{int(rows.min())}..{int(rows.max())}: is the tokenizer the models' own?")
    return rows


# --------------------------------------------------------------------------- checkpoint


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's payload, after checking every record's CRC-32 (``torch.load`` does not);
    read with ``weights_only=True``: no code in the file ever runs."""
    fix = f"delete {path} or pass resume=False to start fresh"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad checkpoint
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"healing checkpoint {path} is damaged or not a torch checkpoint ({reason}); {fix}") from None
    if bad is not None:
        raise CheckpointError(f"healing checkpoint {path} is damaged: the CRC-32 of its record {bad!r} does not match; {fix}")
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a torchslim healing checkpoint (format {_FORMAT}); {fix}")
    return payload


def _check_checkpoint(path: Path, payload: dict[str, Any], settings: dict[str, Any], student: nn.Module) -> None:
    fix = f"delete {path} or pass resume=False to start fresh"
    saved = payload.get("settings") or {}
    for key in _RESUME_KEYS:
        if saved.get(key, _RESUME_DEFAULTS.get(key)) != settings[key]:
            raise CheckpointError(f"healing checkpoint {path} was written with {key}={saved.get(key)!r}, but this run "
                                  f"uses {key}={settings[key]!r}; use the same value to resume, or {fix}")
    mine = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in payload["student"].items()}
    if mine != theirs:
        diff = sorted(set(mine) ^ set(theirs)) or sorted(k for k in mine if mine[k] != theirs[k])
        raise CheckpointError(f"healing checkpoint {path} holds another student (first difference: {diff[0]}); {fix}")


def _plain_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """The student's state_dict under its own keys, LoRA wrappers left out (``x.base.weight`` -> ``x.weight``)."""
    out = {}
    for k, v in student.state_dict().items():
        if ".lora_A" in k or ".lora_B" in k or k.endswith(("lora_A", "lora_B")):
            continue
        out[k.replace(".base.", ".")] = v
    return out


def _save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}  # the window order has its own seeded generators


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])


# --------------------------------------------------------------------------- training


def _epoch_seed(seed: int, epoch: int) -> int:
    return ((seed + 1) * 1_000_003 + epoch) % 2**63


class _Batches:
    """Batch of step ``s``: windows in a seeded shuffled order, reshuffled every pass over them."""

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int) -> None:
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self._orders: dict[int, torch.Tensor] = {}

    def __call__(self, step: int) -> torch.Tensor:
        n = len(self.windows)
        idx = []
        for g in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch = g // n
            if epoch not in self._orders:
                self._orders = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(self.seed, epoch)))}
            idx.append(int(self._orders[epoch][g % n]))
        return self.windows[idx]


def _call(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False) if hasattr(model, "config") else model(ids)
    logits = logits_of(out)
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(f"cannot find logits in the output of {type(model).__name__} ({type(out).__name__})")
    return logits


def _hidden_term(s: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    s, t = s.float(), t.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    return ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)).mean()


def _summary(losses: list[float]) -> tuple[float | None, float | None, list[float]]:
    if not losses:
        return None, None, []
    k = min(20, len(losses))
    curve = [sum(part) / len(part) for part in (losses[i * len(losses) // k:(i + 1) * len(losses) // k] for i in range(k))]
    return sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:]), [round(c, 5) for c in curve]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (CUDA: ``is_bf16_supported``; CPU: oneDNN's
    AVX512-BF16 / AMX check), i.e. whether bfloat16 autocast makes training faster there."""
    try:
        if device.type == "cuda":
            return bool(torch.cuda.is_bf16_supported())
        if device.type == "cpu":
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return False


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "float32" or (precision == "auto" and not native_bf16(device)):
        return None
    return torch.bfloat16


def _say(line: str, progress: bool) -> None:
    if not progress:
        log.debug(line)
    elif log.isEnabledFor(logging.INFO) and logging.getLogger().handlers:
        log.info(line)
    else:
        print(line, file=sys.stderr, flush=True)


def heal_(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    minutes: float = 30.0,
    max_steps: int | None = None,
    seq_len: int = 256,
    batch_size: int = 4,
    lr: float | None = None,
    temperature: float = 1.0,
    hidden_weight: float = 0.0,
    hidden_loss: str = "cosine",
    layer_map: Mapping[int, int] | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: float = 5.0,
    resume: bool = True,
    progress: bool = True,
    log_every: int = 10,
    seed: int = 0,
    precision: str = "auto",
    schedule: str = "constant",
) -> HealResult:
    """Distil ``teacher`` into the pruned ``student`` on training text, in place, within ``minutes``.

    Args:
        student: the pruned decoder LLM (fewer layers and/or narrower widths); trained in place.
        teacher: the unpruned model, same vocabulary; run in eval mode under ``no_grad``, never changed.
        data: a text data spec (``"shakespeare"``, ``"text:PATH"``) or a
            :class:`~torchslim.data.text.TextBundle`: its ``train`` split only (its first 1,048,576 tokens,
            documents in file order);
            or token ids already: a 1-D tensor (cut into windows) or a 2-D tensor of windows.
        tokenizer: turns the text into ids (default: the tokenizer of the teacher's ``pretrained:`` spec).
        minutes: wall-clock budget (> 0), earlier resumed runs included; no step starts that
            would end past it (judged by the mean step time so far).
        max_steps: stop after this many optimizer steps in all (``None``: the budget decides).
        seq_len: tokens per window (>= 2).
        batch_size: windows per step.
        lr: AdamW learning rate, after a 5-step linear warm-up; default 3e-4, or 5e-4 with LoRA
            (SmolLM2-135M pruned by 30%: after 100 steps 3e-4 healed to perplexity 80.6, 1e-4 to
            85.9, 6e-4 to 82.7; after 30 CPU-minutes 3e-4 reached +11.5% where 1e-4 reached +19.6%).
        temperature: softmax temperature of the KL term (> 0); the term is scaled by ``T^2``.
        hidden_weight: weight of the hidden-state term (>= 0; 0, the default, turns it off: on
            SmolLM2-135M pruned by 30% and healed for 30 CPU-minutes at lr 1e-4, logit KD alone reached
            +19.6% perplexity against +24.5% with weight 1, and ran 25% more steps).
        hidden_loss: ``"cosine"`` (``1 - cosine`` per token) or ``"mse"`` (squared error
            relative to the teacher's squared norm, per token).
        layer_map: student decoder layer -> teacher decoder layer for the hidden-state term.
            Default: the identity when the depths agree; else the teacher indices of the layers
            kept by the removals the student records (``prune_depth`` plans of
            ``torchslim.prune.remove_layers_``); else layers spread evenly over the teacher's depth
            (:func:`~torchslim.distill.tinybert.default_layer_map`).
        lora_rank: train rank-``r`` LoRA adapters on every ``nn.Linear`` of the decoder layers
            instead of the weights, merged into them at the end (``None``: full training).
        lora_alpha: LoRA scale numerator (update x ``alpha / r``); default ``2 r``.
        checkpoint_dir: folder of the resumable checkpoint (``heal.pt``); ``None``: none.
        checkpoint_every: minutes between checkpoints (> 0); one is always written at the end.
        resume: continue from the checkpoint in ``checkpoint_dir`` when there is one.
        progress: a line on the ``torchslim.distill.heal`` logger (or stderr when logging is not
            configured) every ``log_every`` steps: step, loss, tokens/s, minutes left.
        log_every: steps between progress lines.
        seed: seed of the window order and of the adapters' initial values.
        precision: ``"auto"`` (bfloat16 autocast where the device multiplies bfloat16 natively,
            else float32), ``"bfloat16"`` (autocast on any device) or ``"float32"``. The weights,
            the optimizer state and the loss are float32 in every case.
        schedule: the learning rate after the warm-up: ``"constant"``, or ``"cosine"``: down to
            a tenth of ``lr`` by the end of the budget (``max_steps`` when given, else
            ``minutes``, measured as wall clock spent).

    Returns:
        A :class:`HealResult`.

    Raises:
        ConfigError: a bad number or option, the student *is* the teacher, vocabularies that
            differ, models without a decoder-layer list, a bad ``layer_map``, data without text
            or too short for one window, token ids outside the vocabulary.
        CheckpointError: the checkpoint to resume is damaged or was written by another run
            (other settings or another student).
        In every refused case the student is unchanged.
    """
    t_call = time.monotonic()
    _number("minutes", minutes, 0)
    if max_steps is not None:
        _number("max_steps", max_steps, 1, integer=True, strict=False)
    _number("seq_len", seq_len, 2, integer=True, strict=False)
    _number("batch_size", batch_size, 1, integer=True, strict=False)
    _number("temperature", temperature, 0)
    _number("hidden_weight", hidden_weight, 0, strict=False)
    _number("checkpoint_every", checkpoint_every, 0)
    _number("log_every", log_every, 1, integer=True, strict=False)
    if not is_int(seed):
        raise ConfigError(f"seed must be an integer; got {seed!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}; got {schedule!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    if hidden_loss not in _HIDDEN_LOSSES:
        raise ConfigError(f"hidden_loss must be one of {', '.join(map(repr, _HIDDEN_LOSSES))}; got {hidden_loss!r}")
    if lora_rank is not None:
        _number("lora_rank", lora_rank, 1, integer=True, strict=False)
        if lora_alpha is not None:
            _number("lora_alpha", lora_alpha, 0)
        lora_alpha = float(2 * lora_rank if lora_alpha is None else lora_alpha)
    elif lora_alpha is not None:
        raise ConfigError("lora_alpha needs lora_rank (LoRA healing); give lora_rank=r or leave lora_alpha out")
    lr = (5e-4 if lora_rank else 3e-4) if lr is None else lr
    _number("lr", lr, 0)
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise ConfigError(f"student and teacher must be torch modules; got {type(student).__name__} and {type(teacher).__name__}")
    if student is teacher:
        raise ConfigError("the student is the teacher (one object): heal a pruned copy, e.g. copy.deepcopy(model) then prune it")
    if lora_layers(student):
        raise ConfigError("the student already holds LoRA adapters; merge_lora_ or remove_lora_ them first")
    v_s, v_t = _vocab(student), _vocab(teacher)
    if v_s is not None and v_t is not None and v_s != v_t:
        raise ConfigError(f"the student's vocabulary has {v_s} tokens and the teacher's {v_t}: logit distillation "
                          "needs the same vocabulary (prune widths and layers, not the vocabulary)")
    (_, s_blocks), (_, t_blocks) = _blocks(student, "student"), _blocks(teacher, "teacher")
    layer_map = _resolve_layer_map(layer_map, student, teacher, len(s_blocks), len(t_blocks))
    w_s, w_t = _width(student), _width(teacher)
    windows = _windows(data, tokenizer, teacher, int(seq_len), v_t or v_s)
    device = model_device(student)
    if model_device(teacher) != device:
        raise ConfigError(f"the student is on {device} and the teacher on {model_device(teacher)}: put both on one device")
    settings = {"seq_len": int(seq_len), "batch_size": int(batch_size), "lr": float(lr), "temperature": float(temperature),
                "hidden_weight": float(hidden_weight), "hidden_loss": hidden_loss,
                "layer_map": {str(k): v for k, v in layer_map.items()}, "lora_rank": lora_rank,
                "lora_alpha": lora_alpha, "seed": int(seed), "windows": len(windows), "schedule": schedule}
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    payload = None
    if path is not None and resume and path.exists():
        payload = _read_checkpoint(path)
        _check_checkpoint(path, payload, settings, student)

    # ---- every check passed: from here on the student changes
    hidden_on = bool(hidden_weight)
    adapters = nn.ModuleList()
    if hidden_on:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(int(seed))
        adapters = nn.ModuleList(
            make_adapter(torch.Size([w_s or 0]), torch.Size([w_t or 0])) for _ in layer_map
        ).to(device)
        torch.random.set_rng_state(gen_state)
    requires = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    if payload is not None:
        student.load_state_dict(payload["student"])
    if lora_rank:
        add_lora_(s_blocks, int(lora_rank), lora_alpha, seed=int(seed))
        trained = lora_parameters(s_blocks)
    else:
        skip = {id(m.weight) for m in (student.get_input_embeddings(), student.get_output_embeddings())
                if isinstance(m, (nn.Embedding, nn.Linear))} if hasattr(student, "get_input_embeddings") else set()
        trained = [p for p in requires if id(p) not in skip]
    for p in trained:
        p.requires_grad_(True)
    params = trained + list(adapters.parameters())
    opt = torch.optim.AdamW(params, lr=float(lr), weight_decay=0.0)
    step, spent, losses, resumed_from = 0, 0.0, [], None
    if payload is not None:
        if lora_rank:
            lora = payload.get("lora") or {}
            for name, layer in lora_layers(s_blocks).items():
                layer.lora_A.data.copy_(lora[f"{name}.lora_A"])
                layer.lora_B.data.copy_(lora[f"{name}.lora_B"])
        adapters.load_state_dict(payload["adapters"])
        opt.load_state_dict(payload["optimizer"])
        step, spent, losses = int(payload["step"]), float(payload["minutes"]), list(payload["losses"])
        resumed_from = step
        _set_rng_state(payload["rng"])

    batches = _Batches(windows, int(batch_size), int(seed))
    amp = _autocast_dtype(precision, device)
    s_rec = _Recorder(s_blocks, list(layer_map), []) if hidden_on else None
    t_rec = _Recorder(t_blocks, sorted(set(layer_map.values())), []) if hidden_on else None
    tokens_per_step = int(batch_size) * int(seq_len)
    start_step, t_loop = step, time.monotonic()

    def elapsed() -> float:
        return spent + (time.monotonic() - t_call) / 60.0

    def rate_at(k: int) -> float:
        """The learning rate of step ``k``: linear warm-up, then constant or cosine over the budget."""
        warm = min(1.0, (k + 1) / _WARMUP_STEPS)
        if schedule == "constant":
            return float(lr) * warm
        done = min(1.0, k / max_steps if max_steps is not None else elapsed() / float(minutes))
        return float(lr) * warm * (_FINAL_LR + (1.0 - _FINAL_LR) * 0.5 * (1.0 + math.cos(math.pi * done)))

    def checkpoint() -> None:
        if path is None:
            return
        state: dict[str, Any] = {
            "format": _FORMAT, "settings": settings, "step": step, "minutes": elapsed(), "losses": losses,
            "student": _plain_state(student), "adapters": adapters.state_dict(), "optimizer": opt.state_dict(),
            "rng": _rng_state(),
        }
        if lora_rank:
            state["lora"] = {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in lora_layers(s_blocks).items()
                             for k in ("lora_A", "lora_B")}
        _save(path, state)

    stopped, last_save = "max_steps", elapsed()
    try:
        with evaluating(student), evaluating(teacher):
            while True:
                if max_steps is not None and step >= max_steps:
                    stopped = "max_steps"
                    break
                per_step = (time.monotonic() - t_loop) / 60.0 / (step - start_step) if step > start_step else 0.0
                if elapsed() + per_step > minutes:
                    stopped = "minutes"
                    break
                ids = batches(step).to(device)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    with torch.no_grad():
                        t_logits = _call(teacher, ids)
                    s_logits = _call(student, ids)
                    if s_logits.shape != t_logits.shape:
                        raise ConfigError(f"the student's logits have shape {tuple(s_logits.shape)} and the teacher's "
                                          f"{tuple(t_logits.shape)}: the models must share the vocabulary")
                    loss = vocab_kl_loss(s_logits.flatten(0, -2), t_logits.flatten(0, -2), temperature=float(temperature))
                    if hidden_on:
                        terms = [_hidden_term(a(s_rec.hidden[si]), t_rec.hidden[ti], hidden_loss)
                                 for a, (si, ti) in zip(adapters, layer_map.items())]
                        loss = loss + float(hidden_weight) * torch.stack(terms).mean()
                        s_rec.clear()
                        t_rec.clear()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                for group in opt.param_groups:
                    group["lr"] = rate_at(step)
                opt.step()
                step += 1
                losses.append(float(loss.detach()))
                if (step - start_step) % int(log_every) == 0:
                    rate = (step - start_step) * tokens_per_step / max(time.monotonic() - t_loop, 1e-9)
                    recent = losses[-int(log_every):]
                    _say(f"heal: step {step}{f'/{max_steps}' if max_steps else ''}  loss {sum(recent) / len(recent):.4f}  "
                         f"{rate:.0f} tokens/s  {max(0.0, minutes - elapsed()):.1f} min left", progress)
                if path is not None and elapsed() - last_save >= checkpoint_every:
                    checkpoint()
                    last_save = elapsed()
        if path is not None and (step > start_step or payload is None):
            checkpoint()
    except BaseException:
        if lora_rank:
            (merge_lora_ if step > start_step else remove_lora_)(s_blocks)
        raise
    finally:
        for rec in (s_rec, t_rec):
            if rec is not None:
                rec.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
    seconds = time.monotonic() - t_loop
    merged = bool(lora_rank) and bool(merge_lora_(s_blocks))
    for p, flag in requires.items():
        p.requires_grad_(flag)
    start, end, curve = _summary(losses)
    return HealResult(
        steps=step, tokens=step * tokens_per_step, minutes=round(elapsed(), 4), stopped=stopped,
        resumed_from=resumed_from,
        tokens_per_second=round((step - start_step) * tokens_per_step / seconds, 2) if seconds > 0 else 0.0,
        loss_start=start, loss_end=end, loss_curve=curve, layer_map=dict(layer_map), lora_rank=lora_rank,
        lora_merged=merged, trained_parameters=sum(p.numel() for p in trained),
        checkpoint=str(path) if path is not None else None, precision="float32" if amp is None else "bfloat16",
    )
