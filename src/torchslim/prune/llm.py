"""Width and depth pruning of decoder LLMs to a share of their non-embedding parameters: ``prune_llm_``.

``target`` is the fraction of the *non-embedding* parameters to remove (the token embedding and
``lm_head`` are counted apart, a tied pair once: in a small LLM they are a large, fixed part that
width pruning shrinks only along the hidden width and depth pruning not at all).

* ``mode="depth"``: the layers of lowest block influence (ShortGPT, :mod:`~torchslim.prune.depth`)
  go, as many as bring the removed share closest to ``target``.
* ``mode="width"``: one ratio for the hidden width, every MLP width and the attention heads
  (key/value groups under grouped-query attention), the same count in every layer so the config
  still describes the model, searched so that the removed share of non-embedding parameters is
  closest to ``target``; the channels that go are the least important by ``importance``
  (default ``"activation"``: Minitron's activation magnitudes on the calibration tokens,
  :mod:`~torchslim.prune.activation`). The removal is :func:`~torchslim.prune.prune_channels_`.
* ``mode="both"``: depth first for ``depth_share`` of the target, then width for the rest.

Every decision (influences, the layers, the ratio) is made before the model changes, and a
failure after the first change puts the model back as it was. Both edits are recorded
(``prune_depth``, ``prune_channels``), so ``ts.save`` / ``ts.load`` rebuild the result, and the
model stays a stock transformers model: ``save_pretrained`` reloads with ``from_pretrained``.

Example:
    >>> import torch, transformers, torchslim as ts
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> plan = ts.prune_llm_(model, torch.randint(0, 64, (4, 32)), target=0.25, mode="depth")
    >>> plan.removed_layers.__len__(), round(plan.achieved, 2), model.config.num_hidden_layers
    (1, 0.25, 3)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim._utils import is_number
from torchslim.errors import ConfigError
from torchslim.graph.state import ModelState, preserved
from torchslim.prune._calib import calibration_batches, example_of
from torchslim.prune.channels import prune_channels_
from torchslim.prune.depth import _check, block_influence, decoder_layers, remove_layers_
from torchslim.prune.importance import get_importance

__all__ = ["LLMPrunePlan", "parameter_counts", "prune_llm_"]

MODES = ("width", "depth", "both")
_WIDTHS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


@dataclass
class LLMPrunePlan:
    """What :func:`prune_llm_` did; ``to_dict()`` is JSON."""

    mode: str
    target: float
    importance: str
    removed_layers: list[int] = field(default_factory=list)  # original indices
    block_influence: list[float] = field(default_factory=list)  # per original layer (depth, both)
    width_ratio: float = 0.0  # the ratio prune_channels_ ran with (0: no width pruning)
    widths_before: dict[str, int] = field(default_factory=dict)
    widths_after: dict[str, int] = field(default_factory=dict)
    non_embedding_before: int = 0
    non_embedding_after: int = 0
    embedding_before: int = 0
    embedding_after: int = 0
    achieved: float = 0.0  # fraction of the non-embedding parameters removed
    seconds: float = 0.0
    config_note: str | None = None  # why save_pretrained would not reload it (None: it would)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _embedding_ids(model: nn.Module) -> set[int]:
    ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module):
        ids |= {id(p) for p in head.parameters(recurse=False)}
    return ids


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"embedding", "non_embedding", "total"}`` parameter counts of ``model``: embedding = every
    ``nn.Embedding`` and the output embedding (``lm_head``), a tied pair counted once."""
    emb = _embedding_ids(model)
    e = n = 0
    for p in model.parameters():  # each tensor once (tied weights too)
        if id(p) in emb:
            e += p.numel()
        else:
            n += p.numel()
    return {"embedding": e, "non_embedding": n, "total": e + n}


def _widths(model: nn.Module) -> dict[str, int]:
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    cfg = get() if callable(get) else cfg
    out = {k: getattr(cfg, k) for k in _WIDTHS if is_number(getattr(cfg, k, None))} if cfg is not None else {}
    if "num_hidden_layers" not in out:
        out["num_hidden_layers"] = len(decoder_layers(model)[1])
    return out


def _layers_for(model: nn.Module, influence: list[float], remove: float) -> list[int]:
    """The least influential layers whose parameters come closest to ``remove`` (never all)."""
    _, blocks = decoder_layers(model)
    emb = _embedding_ids(model)
    sizes = [sum(p.numel() for p in b.parameters() if id(p) not in emb) for b in blocks]
    order = sorted(range(len(blocks)), key=lambda i: (influence[i], i))
    best, chosen, gone = [], [], 0
    best_err = abs(remove)
    for i in order[: len(blocks) - 1]:
        chosen.append(i)
        gone += sizes[i]
        if abs(gone - remove) < best_err - 1e-9:
            best, best_err = list(chosen), abs(gone - remove)
    return sorted(best)


def _hidden_rule(model: nn.Module, cg: Any) -> tuple[Any, str, int] | None:
    """(the residual-stream group, the input embedding's module name, query heads per prunable
    head unit) when the config ties the hidden width to the head count: transformers 5 refuses a
    Llama / Gemma-3 config whose ``hidden_size`` is not a multiple of ``num_attention_heads``."""
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(heads, int) or emb is None:
        return None
    name = next((n for n, m in model.named_modules() if m is emb), None)
    hidden = next((g for g in cg.groups if (f"{name}.weight", 1) in g.members), None)
    units = {g.size for g in cg.groups if g.head_dim is not None}
    if hidden is None or len(units) != 1 or heads % (u := units.pop()):
        return None
    return hidden, name, heads // u


def _width_ratio(model: nn.Module, example: Any, remove_fraction: float,
                 round_to: int) -> tuple[float, dict[str, float] | None, float]:
    """The uniform ratio (and the residual width's own ratio, when the head count must divide it)
    whose removal takes the share of the non-embedding parameters closest to ``remove_fraction``,
    and that share; found on the channel analysis alone (nothing is cut)."""
    from torchslim.graph.spaces import analyse
    from torchslim.prune.hf import choose_uniform

    emb = _embedding_ids(model)
    named = list(model.named_parameters())  # each tensor once
    base = sum(p.numel() for _, p in named if id(p) not in emb)
    with preserved(model, example, guard_writes=False):
        cg = analyse(model, example)
    scores = [torch.zeros(g.size) for g in cg.groups]
    rule = _hidden_rule(model, cg)
    opts = dict(global_ranking=False, round_to=round_to, min_channels=1)

    def measure(ratio: float, hidden_keep: int | None = None) -> tuple[float, dict[str, float] | None, int | None]:
        """(share removed, the residual width's ratio or None, its kept width) at ``ratio``; the
        residual keeps ``hidden_keep`` when given, else as the uniform ratio leaves it. A width the
        head count does not divide gives a share of -1 (not a candidate)."""
        ratios = None
        if rule is not None and hidden_keep is not None:
            ratios = {rule[1]: (rule[0].size - hidden_keep + 0.5) / rule[0].size}
        cut, report = choose_uniform(model, cg, scores, ratio, ratios=ratios, **opts)
        h = None
        if rule is not None:
            kept = {r["id"]: r["kept"] for r in report}
            heads = {kept[g.id] * rule[2] for g in cg.groups if g.head_dim is not None}
            h = kept[rule[0].id]
            if hidden_keep is not None and (len(heads) != 1 or h % heads.pop()):
                return -1.0, ratios, h
        keep = cg.keep_indices(cut)
        left = 0
        for n, p in named:
            if id(p) in emb:
                continue
            dims = keep.get(n)
            left += math.prod(len(k) if k is not None else s for k, s in zip(dims, p.shape)) if dims else p.numel()
        return 1.0 - left / base, ratios, h

    def search(hidden_keep: int | None) -> tuple[float, dict[str, float] | None, float] | None:
        lo, hi = 0.0, 0.95
        if measure(hi, hidden_keep)[0] < remove_fraction:
            return None
        for _ in range(24):  # the smallest ratio that removes at least the target
            mid = (lo + hi) / 2
            if measure(mid, hidden_keep)[0] >= remove_fraction:
                hi = mid
            else:
                lo = mid
        found = [(r, *measure(r, hidden_keep)[:2]) for r in (hi, lo)]
        found = [(r, ratios, f) for r, f, ratios in found if f >= 0]
        return min(found, key=lambda c: abs(c[2] - remove_fraction)) if found else None

    plain = search(None)
    if plain is None:
        raise ConfigError(f"width pruning cannot remove {remove_fraction:.3f} of the non-embedding parameters "
                          f"(at most {measure(0.95)[0]:.3f}); lower target= or use mode='both'")
    if rule is None:
        return plain
    # the residual width must be a multiple of the query heads kept (and of round_to): try the
    # multiples around the width the uniform ratio gives, each with the ratio of the other groups
    # searched again; when neither works, the whole width (only the MLP and the heads narrow)
    cut, report = choose_uniform(model, cg, scores, plain[0], ratios=None, **opts)
    kept = {r["id"]: r["kept"] for r in report}
    q = max(1, min(kept[g.id] for g in cg.groups if g.head_dim is not None) * rule[2])
    step = math.lcm(q, max(int(round_to), 1))
    h = kept[rule[0].id]
    widths = {h // step * step, -(-h // step) * step}
    found = [c for w in sorted(widths) if 0 < w <= rule[0].size if (c := search(w)) is not None]
    if not found and (whole := search(rule[0].size)) is not None:  # no such width near: keep the hidden width
        found = [whole]
    if not found:
        raise ConfigError(f"width pruning cannot remove {remove_fraction:.3f} of the non-embedding parameters with a "
                          f"hidden width that {q} attention heads divide; lower target= or use mode='both'")
    return min(found, key=lambda c: abs(c[2] - remove_fraction))


def prune_llm_(
    model: nn.Module,
    data: Any,
    *,
    target: float = 0.3,
    mode: str = "width",
    tokenizer: Any = None,
    max_tokens: int = 2048,
    importance: Any = "activation",
    depth_share: float = 0.5,
    round_to: int = 1,
) -> LLMPrunePlan:
    """Remove ``target`` of a decoder LLM's non-embedding parameters, by width, depth or both, in place.

    Args:
        model: a decoder LLM (a transformers ``*ForCausalLM``, or any model with a layer list and
            ``model(input_ids)``); changed in place.
        data: calibration data: a text data spec (``"shakespeare"``: token windows of its
            calibration split only), a ``TextBundle``, token ids ``(batch, tokens)``, or batches of
            model inputs.
        target: the fraction of the non-embedding parameters to remove, in (0, 1).
        mode: ``"width"``, ``"depth"`` or ``"both"`` (see the module doc).
        tokenizer: for a text spec (default: the model's own, for a ``pretrained:`` LLM).
        max_tokens: calibration tokens drawn from a text spec.
        importance: the width criterion: a registered name (``ts.list_methods("prune.importance")``)
            or a :class:`~torchslim.prune.GroupImportance`.
        depth_share: ``mode="both"``: the part of ``target`` taken by removing layers.
        round_to: kept widths are multiples of this (1: any width).

    Returns:
        An :class:`LLMPrunePlan`: layers removed, widths and parameter counts before and after,
        the share achieved.

    Raises:
        ConfigError: a bad argument, no calibration data, a target width pruning cannot reach. The
            model is unchanged then.
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not is_number(target) or not 0 < target < 1:
        raise ConfigError(f"target must be a fraction of the non-embedding parameters in (0, 1); got {target!r}")
    if not is_number(depth_share) or not 0 <= depth_share <= 1:
        raise ConfigError(f"depth_share must be a number in [0, 1]; got {depth_share!r}")
    crit = get_importance(importance)
    decoder_layers(model)  # refuses a model with no layer list
    batches = calibration_batches(model, data, tokenizer=tokenizer, max_tokens=max_tokens, what="prune_llm_")
    counts0 = parameter_counts(model)
    plan = LLMPrunePlan(mode=mode, target=float(target), importance=importance if isinstance(importance, str) else type(importance).__name__,
                        widths_before=_widths(model), non_embedding_before=counts0["non_embedding"],
                        embedding_before=counts0["embedding"])
    base = counts0["non_embedding"]
    layers: list[int] = []
    if mode != "width":
        plan.block_influence = block_influence(model, batches)
        share = target if mode == "depth" else target * depth_share
        layers = _check(_layers_for(model, plan.block_influence, share * base), len(plan.block_influence))
    state = ModelState((model,))  # put back if the width part fails after layers went
    try:
        if layers:
            remove_layers_(model, layers)
        plan.removed_layers = layers
        if mode != "depth":
            rest = target * base - (base - parameter_counts(model)["non_embedding"])  # still to remove
            current = parameter_counts(model)["non_embedding"]
            if rest / current > 1e-4:
                example = example_of(batches)
                ratio, ratios, _ = _width_ratio(model, example, rest / current, round_to)
                done = prune_channels_(model, example, ratio=ratio, ratios=ratios, importance=crit, data=batches,
                                       round_to=round_to, uniform_layers=True)
                plan.width_ratio = float(ratio)
                plan.config_note = done.config_note
    except BaseException:
        with torch.no_grad():
            state.restore()
        raise
    counts = parameter_counts(model)
    plan.widths_after = _widths(model)
    plan.non_embedding_after = counts["non_embedding"]
    plan.embedding_after = counts["embedding"]
    plan.achieved = 1.0 - counts["non_embedding"] / base
    plan.seconds = time.perf_counter() - start
    return plan
