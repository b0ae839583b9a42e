"""Search for the smallest decoder LLM within a perplexity limit: width, depth and bits at once.

``search_llm(model, "shakespeare", max_perplexity_increase=0.15)`` samples, per trial, the share
of non-embedding parameters removed by depth (decoder layers of least block influence) and by width
(``prune_llm_``: activation importance, uniform widths so the config still describes the model,
kept widths multiples of the int4 group size so every layer can be quantized; where the head count
leaves no such width near the target, the trial halves its group size and says so),
the bits of the body (int4 or int8), how many of the most sensitive decoder layers keep int8
(sensitivity measured once, on the float model: :mod:`torchslim.quantize.llm_sensitivity`), and
the bits of the embedding table and ``lm_head`` (float, int8 or int4). Each trial prunes and
quantizes a copy (HQQ by default: no calibration, the best int4 of ``benchmarks/llm.py`` per
second spent) and measures what ships: the bytes of its weights as stored (packed integers and
scales), the held-out perplexity (the text's ``test`` split, never the calibration one), and with
``objective="tokens_per_s"`` the decode speed of its int4 ONNX decoder with a KV cache in ONNX
Runtime (batch 1, ``threads``).

Optuna runs the study (NSGA-II over bytes or speed and perplexity) in an RDB storage: a SQLite file
in ``out`` by default, or a PostgreSQL URL shared by workers, so a stopped search resumes. The
answer is the best trial whose perplexity is within the limit; ``uniform`` baselines (the same
choice everywhere: int4, int8, 30% width + int4, 30% depth + int4) are measured the same way for
the Pareto table.

Healing is not part of a trial (minutes each on a CPU); ``heal_minutes`` heals the chosen
configuration once, at the end, by distillation from the original.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from torchslim._config import ConfigDict
from torchslim._optional import require
from torchslim._utils import is_int, is_number
from torchslim.errors import ConfigError

__all__ = ["LLMSearchConfig", "LLMSearchResult", "LLMTrial", "search_llm", "storage_bytes"]

OBJECTIVES = ("bytes", "tokens_per_s")
UNIFORM = {
    "int8": {"depth": 0.0, "width": 0.0, "bits": 8, "int8_layers": 0, "embedding_bits": 8, "lm_head_bits": 8},
    "int4": {"depth": 0.0, "width": 0.0, "bits": 4, "int8_layers": 0, "embedding_bits": 8, "lm_head_bits": 8},
    "width30+int4": {"depth": 0.0, "width": 0.3, "bits": 4, "int8_layers": 0, "embedding_bits": 8, "lm_head_bits": 8},
    "depth30+int4": {"depth": 0.3, "width": 0.0, "bits": 4, "int8_layers": 0, "embedding_bits": 8, "lm_head_bits": 8},
}
_HEAD_BITS = {"float": None, "8": 8, "4": 4}


@dataclass(frozen=True)
class LLMSearchConfig(ConfigDict):
    """How :func:`search_llm` searches.

    Attributes:
        max_perplexity_increase: the limit, as a fraction over the float model's perplexity.
        objective: ``"bytes"`` (fewest) or ``"tokens_per_s"`` (fastest int4 ONNX decoder).
        trials: Optuna trials (on top of the uniform baselines).
        depth, width: the shares of non-embedding parameters a trial may remove each way.
        bits: body bits a trial may pick; ``int8_layers``: how many of the most sensitive decoder
            layers may keep int8.
        head_bits: bits the embedding table / ``lm_head`` may get (``"float"``, ``"8"``, ``"4"``).
        method: the quantizer of a trial (``hqq`` or ``rtn``: no calibration).
        group_size: int4 group size.
        perplexity_tokens: held-out tokens scored per trial.
        heal_minutes: heal the chosen configuration by distillation for this long (0: no healing).
        uniform: also measure the uniform baselines.
        threads: threads of the speed measurement.
        seed: sampler seed.
    """

    max_perplexity_increase: float = 0.15
    objective: str = "bytes"
    trials: int = 12
    depth: tuple[float, ...] = (0.0, 0.1, 0.2)
    width: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    bits: tuple[int, ...] = (4, 8)
    int8_layers: tuple[int, ...] = (0, 2, 4, 8)
    head_bits: tuple[str, ...] = ("8", "4")
    method: str = "hqq"
    group_size: int = 32
    perplexity_tokens: int = 512
    heal_minutes: float = 0.0
    uniform: bool = True
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_number(self.max_perplexity_increase) or not 0 < self.max_perplexity_increase <= 10:
            raise ConfigError(f"max_perplexity_increase must be a fraction in (0, 10]; got {self.max_perplexity_increase!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if not is_int(self.trials) or self.trials < 0:
            raise ConfigError(f"trials must be an integer >= 0; got {self.trials!r}")
        for name in ("depth", "width"):
            vals = getattr(self, name)
            if not vals or any(not is_number(v) or not 0 <= v < 0.9 for v in vals):
                raise ConfigError(f"{name} must list shares of non-embedding parameters in [0, 0.9); got {vals!r}")
        if not self.bits or any(b not in (4, 8) for b in self.bits):
            raise ConfigError(f"bits must list 4 and/or 8; got {self.bits!r}")
        if not self.int8_layers or any(not is_int(n) or n < 0 for n in self.int8_layers):
            raise ConfigError(f"int8_layers must list integers >= 0; got {self.int8_layers!r}")
        if not self.head_bits or any(b not in _HEAD_BITS for b in self.head_bits):
            raise ConfigError(f"head_bits must list values from float, 8, 4; got {self.head_bits!r}")
        if self.method not in ("hqq", "rtn"):
            raise ConfigError(f"method must be hqq or rtn (a trial does not calibrate); got {self.method!r}")
        for name, lo in (("group_size", 1), ("perplexity_tokens", 16), ("threads", 1)):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}; got {v!r}")
        if not is_number(self.heal_minutes) or self.heal_minutes < 0:
            raise ConfigError(f"heal_minutes must be >= 0; got {self.heal_minutes!r}")


@dataclass
class LLMTrial:
    """One measured configuration."""

    name: str
    choice: dict[str, Any]
    bytes: int
    perplexity: float
    increase: float  # over the float model's perplexity
    feasible: bool
    tokens_per_s: float | None = None
    non_embedding_removed: float = 0.0
    seconds: float = 0.0
    error: str | None = None  # why the configuration could not be built (then it is never chosen)

    def to_dict(self) -> dict[str, Any]:
        return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in asdict(self).items()}


@dataclass
class LLMSearchResult:
    """The answer of :func:`search_llm`: the best feasible trial, every trial, the reference."""

    best: LLMTrial | None
    trials: list[LLMTrial]
    reference: dict[str, Any]
    front: list[str] = field(default_factory=list)  # names of the Pareto-optimal trials (bytes/speed, perplexity)
    model: nn.Module | None = None  # the chosen configuration applied (healed when asked)
    heal: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"best": None if self.best is None else self.best.to_dict(), "trials": [t.to_dict() for t in self.trials],
                "reference": self.reference, "front": self.front, "heal": self.heal, "files": self.files}

    def table(self) -> Any:
        from rich.table import Table

        from torchslim._text import printable

        t = Table("trial", "removed by depth / width", "body bits", "int8 layers", "embeddings / lm_head",
                  "weights", "perplexity", "tokens/s", "", title="LLM search (held-out perplexity)")
        ref = self.reference
        t.add_row("float reference", "-", "32", "-", "32 / 32", _mib(ref["bytes"]), f"{ref['perplexity']:.2f}",
                  "-" if ref.get("tokens_per_s") is None else f"{ref['tokens_per_s']:.1f}", "")
        for tr in sorted(self.trials, key=lambda x: (x.error is not None, x.bytes)):
            c = tr.choice
            if tr.error is not None:
                t.add_row(tr.name, f"{c['depth']:.0%} / {c['width']:.0%}", str(c["bits"]), "-", "-", "-",
                          "not built", "-", tr.error[:60])
                continue
            mark = "best" if self.best is not None and tr.name == self.best.name else "front" if tr.name in self.front else ""
            bits = f"{c['bits']} (g{c['group_size']})" if c["bits"] == 4 and "group_size" in c else str(c["bits"])
            t.add_row(tr.name, f"{c['depth']:.0%} / {c['width']:.0%}", bits, str(c["int8_layers"]),
                      f"{c['embedding_bits'] or 32} / {c['lm_head_bits'] or 32}", _mib(tr.bytes),
                      f"{tr.perplexity:.2f} ({tr.increase:+.1%})" + ("" if tr.feasible else " over"),
                      "-" if tr.tokens_per_s is None else f"{tr.tokens_per_s:.1f}", mark)
        return printable(t)


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters and buffers: packed integers, scales),
    each storage once (tied weights are one tensor): what its weights file holds, without writing it."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def _quantize_choice(m: nn.Module, choice: dict[str, Any], kept: list[int], sensitivity: list[float],
                     cfg: LLMSearchConfig, group: int) -> None:
    """Quantize ``m`` in place to ``choice``'s bits (body, most sensitive layers kept int8, table / head).

    A tied model's table bits rule its head too. The head multiplies by the quantized table (stored
    once), except in timed trials with a 4-bit table: they ship as the ONNX decoder, which shares
    only an 8-bit table with the head, so the head gets its own copy at the same bits."""
    from torchslim.quantize import quantize_llm_
    from torchslim.quantize.llm_sensitivity import mixed_layer_bits

    emb, head = choice["embedding_bits"], choice["lm_head_bits"]
    if _tied(m):
        head = emb
    tie = _tied(m) and emb is not None and (emb == 8 or cfg.objective != "tokens_per_s")
    layer_bits = mixed_layer_bits(m, sensitivity, int(choice["int8_layers"]), layers=kept) if choice["bits"] == 4 else {}
    quantize_llm_(m, bits=int(choice["bits"]), group_size=group, method=cfg.method, embedding_bits=emb,
                  lm_head_bits=head, layer_bits=layer_bits or None, seed=cfg.seed, tie_head=tie)


def _apply(model: nn.Module, data: Any, choice: dict[str, Any], sensitivity: list[float], cfg: LLMSearchConfig,
           tokenizer: Any) -> tuple[nn.Module, float]:
    """A copy of ``model`` with ``choice`` applied; ``(copy, non-embedding share removed)``."""
    from torchslim.prune.llm import prune_llm_

    depth, width = float(choice["depth"]), float(choice["width"])
    kept = list(range(len(sensitivity)))
    removed = 0.0
    group = cfg.group_size
    m = copy.deepcopy(model).eval()
    if depth + width > 0:
        plan = None
        mode = "both" if depth and width else "depth" if depth else "width"
        while plan is None:
            try:  # kept widths must be multiples of the int4 group size (and of the head count's rule)
                plan = prune_llm_(m, data, target=depth + width, mode=mode, depth_share=depth / (depth + width),
                                  tokenizer=tokenizer, max_tokens=1024, round_to=group)
            except ConfigError:
                if not width or group <= 8:
                    raise
                group //= 2  # e.g. SmolLM2's 9 heads and groups of 32 allow only hidden 288 or 576
        kept = [i for i in kept if i not in set(plan.removed_layers)]
        removed = plan.achieved
    choice["group_size"] = group
    _quantize_choice(m, choice, kept, sensitivity, cfg, group)
    return m, removed


def _measure(m: nn.Module, data: Any, cfg: LLMSearchConfig, tokenizer: Any, workdir: Path) -> tuple[int, float, float | None]:
    from torchslim.lm import evaluate_lm

    ppl = evaluate_lm(m, data, max_tokens=cfg.perplexity_tokens, threads=cfg.threads, tokenizer=tokenizer).perplexity
    speed = None
    if cfg.objective == "tokens_per_s":
        from torchslim.export.onnx_decoder import export_onnx_decoder
        from torchslim.lm import lm_speed

        path = workdir / "trial.onnx"
        export_onnx_decoder(m, path)
        speed = lm_speed(str(path), prompt_tokens=64, new_tokens=16, threads=cfg.threads, runs=3, warmup=1).decode_tokens_per_s
    return storage_bytes(m), float(ppl), speed


def _choice(trial: Any, cfg: LLMSearchConfig, n_layers: int) -> dict[str, Any]:
    bits = trial.suggest_categorical("bits", list(cfg.bits))
    emb = trial.suggest_categorical("embedding_bits", list(cfg.head_bits))
    return {
        "depth": trial.suggest_categorical("depth", list(cfg.depth)),
        "width": trial.suggest_categorical("width", list(cfg.width)),
        "bits": bits,
        "int8_layers": min(trial.suggest_categorical("int8_layers", list(cfg.int8_layers)), n_layers) if bits == 4 else 0,
        "embedding_bits": _HEAD_BITS[emb],
        "lm_head_bits": _HEAD_BITS[trial.suggest_categorical("lm_head_bits", list(cfg.head_bits))],
    }


def _front(trials: list[LLMTrial], speed: bool) -> list[str]:
    def cost(t: LLMTrial) -> tuple[float, float]:
        return (-(t.tokens_per_s or 0.0) if speed else float(t.bytes), t.perplexity)

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:  # no worse in both, better in one
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    built = [t for t in trials if t.error is None]
    return [t.name for t in built if not any(dominates(cost(o), cost(t)) for o in built)]


def search_llm(model: nn.Module, data: Any, config: LLMSearchConfig | dict[str, Any] | None = None, *,
               out: str | Path | None = None, storage: str | None = None, tokenizer: Any = None,
               progress: bool = True, **overrides: Any) -> LLMSearchResult:
    """The smallest (or fastest) pruned + quantized version of a decoder LLM whose held-out
    perplexity is within ``max_perplexity_increase`` of the float model's (see the module doc).

    Args:
        model: a float decoder LLM (``pretrained:smollm2-135m``); never changed (trials run on copies).
        data: a text data spec / ``TextBundle``: calibration from its ``train`` split, perplexity on ``test``.
        config: an :class:`LLMSearchConfig` (or a dict); ``overrides`` are its fields.
        out: folder for the study (``study.db``), ``trials.json`` and, with ``heal_minutes``, the
            healing checkpoint; ``None``: an in-memory study.
        storage: an Optuna RDB URL (PostgreSQL to share the study between workers) instead of ``out``'s SQLite file.

    Returns:
        An :class:`LLMSearchResult`; ``model`` holds the chosen configuration applied (healed when asked).

    Raises:
        ConfigError: bad fields, a model that is not a float decoder LLM, data without text.
    """
    optuna = require("optuna", "search")
    cfg = LLMSearchConfig.build(config, **overrides)
    from torchslim.data import load_data
    from torchslim.data.text import TextBundle
    from torchslim.graph.blocks import layer_list
    from torchslim.lm import evaluate_lm
    from torchslim.quantize.llm_sensitivity import decoder_sensitivity

    bundle = load_data(data) if isinstance(data, str) else data
    if not isinstance(bundle, TextBundle):
        raise ConfigError("search_llm measures perplexity on text: pass data='shakespeare' (or text:PATH)")
    _, layers = layer_list(model)
    say = print if progress else (lambda *_: None)
    start = time.perf_counter()
    work = Path(out) if out is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    ref_ppl = evaluate_lm(model, bundle, max_tokens=cfg.perplexity_tokens, threads=cfg.threads, tokenizer=tokenizer).perplexity
    reference: dict[str, Any] = {"perplexity": float(ref_ppl), "bytes": storage_bytes(model), "tokens": cfg.perplexity_tokens}
    limit = ref_ppl * (1 + cfg.max_perplexity_increase)
    sensitivity = decoder_sensitivity(model, bundle, bits=4, group_size=cfg.group_size, seed=cfg.seed, tokenizer=tokenizer)
    reference["sensitivity"] = sensitivity
    say(f"reference perplexity {ref_ppl:.2f} (limit {limit:.2f}); int4 sensitivity measured on {len(layers)} layers")

    import tempfile

    trials: list[LLMTrial] = []

    def run(name: str, choice: dict[str, Any]) -> LLMTrial:
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="torchslim-llm-trial-") as tmp:
                m, removed = _apply(model, bundle, choice, sensitivity, cfg, tokenizer)
                size, ppl, speed = _measure(m, bundle, cfg, tokenizer, Path(tmp))
        except ConfigError as exc:  # e.g. no width on the head count's and the group's grid near the share asked
            tr = LLMTrial(name, choice, 0, math.inf, math.inf, False, seconds=time.perf_counter() - t0, error=str(exc))
            trials.append(tr)
            say(f"{name}: not built: {exc}")
            return tr
        tr = LLMTrial(name, choice, size, ppl, ppl / ref_ppl - 1, ppl <= limit, speed, removed, time.perf_counter() - t0)
        trials.append(tr)
        say(f"{name}: {_mib(size)}, perplexity {ppl:.2f} ({tr.increase:+.1%}){'' if tr.feasible else ' over the limit'}"
            + ("" if speed is None else f", {speed:.1f} tokens/s") + f" [{tr.seconds:.0f} s]")
        return tr

    if cfg.uniform:
        for name, choice in UNIFORM.items():
            run(f"uniform {name}", dict(choice))
    speed = cfg.objective == "tokens_per_s"
    url = storage or (f"sqlite:///{(work / 'study.db').resolve()}" if work is not None else None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="torchslim-llm-search", storage=url, load_if_exists=True,
                                directions=["maximize" if speed else "minimize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(seed=cfg.seed))
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
            and t.user_attrs.get("trial")]
    for t in done:  # a resumed study: its trials are measured already
        c = t.user_attrs.get("trial")
        if c:
            trials.append(LLMTrial(**c))
    for _ in range(max(cfg.trials - len(done), 0)):
        trial = study.ask()
        choice = _choice(trial, cfg, len(layers))
        tr = run(f"trial {trial.number}", choice)
        trial.set_user_attr("trial", tr.to_dict())
        if tr.error is not None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, [tr.tokens_per_s or 0.0 if speed else float(tr.bytes), tr.perplexity])

    feasible = [t for t in trials if t.feasible]
    best = (max(feasible, key=lambda t: t.tokens_per_s or 0.0) if speed else min(feasible, key=lambda t: t.bytes)) if feasible else None
    result = LLMSearchResult(best, trials, reference, _front(trials, speed))
    if best is not None:
        chosen, _ = _apply(model, bundle, best.choice, sensitivity, cfg, tokenizer)
        if cfg.heal_minutes > 0:
            result.heal = _heal(model, chosen, bundle, best.choice, sensitivity, cfg, tokenizer, work)
            chosen = result.heal.pop("model")
        result.model = chosen
    reference["seconds"] = time.perf_counter() - start
    if work is not None:
        from torchslim._fs import atomic_path

        with atomic_path(work / "trials.json") as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=1))
        result.files["trials"] = str(work / "trials.json")
    return result


def _heal(model: nn.Module, chosen: nn.Module, data: Any, choice: dict[str, Any], sensitivity: list[float],
          cfg: LLMSearchConfig, tokenizer: Any, work: Path | None) -> dict[str, Any]:
    """Heal the chosen pruning in float (distillation from the original), then quantize it as chosen."""
    from torchslim.distill.heal import heal_
    from torchslim.lm import evaluate_lm

    if not (choice["depth"] or choice["width"]):
        return {"skipped": "nothing was pruned", "model": chosen}
    pruned = copy.deepcopy(model).eval()
    from torchslim.prune.llm import prune_llm_

    depth, width = float(choice["depth"]), float(choice["width"])
    group = int(choice.get("group_size", cfg.group_size))
    plan = prune_llm_(pruned, data, target=depth + width, mode="both" if depth and width else "depth" if depth else "width",
                      depth_share=depth / (depth + width), tokenizer=tokenizer, max_tokens=1024, round_to=group)
    got = heal_(pruned, model, data, tokenizer=tokenizer, minutes=cfg.heal_minutes, seed=cfg.seed,
                checkpoint_dir=None if work is None else work / "heal.checkpoint")
    kept = [i for i in range(len(sensitivity)) if i not in set(plan.removed_layers)]
    _quantize_choice(pruned, choice, kept, sensitivity, cfg, group)
    ppl = evaluate_lm(pruned, data, max_tokens=cfg.perplexity_tokens, threads=cfg.threads, tokenizer=tokenizer).perplexity
    return {"model": pruned, "result": got.to_dict(), "perplexity": float(ppl), "bytes": storage_bytes(pruned)}
