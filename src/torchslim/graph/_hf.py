"""transformers models: ``model.config`` follows a pruning, so stock ``from_pretrained`` reloads it.

A model written with ``save_pretrained`` is rebuilt by stock transformers code from its config
alone, so after surgery the config must describe the new widths. :func:`sync_config` finds them
without knowing the architecture:

1. **learn** (once per model class and config): build the model from its config on the ``meta``
   device (no memory, milliseconds), then once more per size field of the config
   (``hidden_size``, ``intermediate_size``, head counts, ``head_dim``..., sub-configs such as
   CLIP's ``text_config`` included) with that field doubled. What changed (a parameter's dim, an
   integer module attribute such as ``num_heads``) by a factor 2 or 1/2 is *controlled* by the
   field, as ``size = c * prod(field ** e)`` with e = +1 or -1. Fields a config leaves at ``None``
   (GPT-2's ``n_inner``, a missing ``head_dim``) are made explicit first when an explicit value
   rebuilds the same model.
2. **solve**: the pruned model's shapes (then, for fields no shape shows, its attributes such as
   a head count) give each field's new value, field by field (a value every observable agrees
   on; widths that differ across layers give several values, and the field keeps its old one).
3. **write and verify**: the solved fields go into ``model.config``; the model is built from the
   new config (meta) and every parameter/buffer shape and scalar module attribute is compared
   with the pruned model. Equal shapes: the config reloads it (``reloadable``); an attribute that
   surgery never touched (``LlamaMLP.intermediate_size``) takes the rebuilt value. Gemma's
   embedding scale ``sqrt(hidden_size)`` is recomputed by the rebuilt model: the embedding rows
   are scaled by old/new scale and, when the output embedding is tied to them, the final norm by
   the inverse, so the pruned model computes the same function and reloads to it exactly.

Everything it changes is put back by the undo it returns (surgery calls it inside its
transaction, before the check run: Phi-3 reads ``config.num_attention_heads`` in its forward).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn

__all__ = ["ConfigSync", "config_fields", "head_dim_free", "is_hf_model", "sync_config"]

# size fields a pruning can change (canonical names; aliases in a config's attribute_map are skipped)
FIELDS = (
    "hidden_size", "n_embd", "d_model", "dim", "embed_dim", "embedding_size", "word_embed_proj_dim",
    "intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_hidden_size",
    "num_attention_heads", "n_head", "num_heads", "n_heads", "num_key_value_heads", "num_kv_heads",
    "encoder_attention_heads", "decoder_attention_heads", "head_dim", "d_kv", "kv_channels", "projection_dim",
)
# fields a config may leave at None (derived in the model's code): made explicit when that rebuilds the same
_DERIVED = ("n_inner", "ffn_hidden_size", "head_dim", "intermediate_size")
_SKIP_ATTRS = frozenset({"training", "layer_idx"})

Obs = tuple  # ("s", tensor name, dim) or ("a", module name, attribute)


def is_hf_model(model: nn.Module) -> bool:
    """A transformers model: a ``config`` with ``to_dict`` and a class that builds from a config."""
    cfg = getattr(model, "config", None)
    return callable(getattr(type(model), "_from_config", None)) and callable(getattr(cfg, "to_dict", None))


def config_fields(model: nn.Module) -> dict[str, Any]:
    """The size fields of ``model.config`` by path (``text_config.hidden_size`` for sub-configs)."""
    if not is_hf_model(model):
        return {}
    return {prefix + name: getattr(sub, name) for prefix, sub in _sub_configs(model.config) for name in FIELDS
            if _settable(sub, name) and hasattr(sub, name)}


@dataclass
class ConfigSync:
    """What :func:`sync_config` did: the fields set, and whether the config now rebuilds the model."""

    fields: dict[str, int] = field(default_factory=dict)  # config path -> new value (set now)
    reloadable: bool = True  # stock from_pretrained rebuilds exactly these shapes
    reason: str | None = None  # why not, one line
    attributes: dict[str, Any] = field(default_factory=dict)  # "module.attr" -> value taken from the rebuild

    def note(self) -> str | None:
        """One line for a plan or a warning when the config cannot describe the model."""
        if self.reloadable:
            return None
        return (f"model.config cannot describe the pruned widths ({self.reason}): save_pretrained would not "
                "reload it with stock from_pretrained; ts.save / ts.load keep it (per-layer widths, plan replayed)")


# ---- configs ------------------------------------------------------------------------------
def _sub_configs(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    yield prefix, cfg
    for k, v in vars(cfg).items():
        if not k.startswith("_") and callable(getattr(v, "to_dict", None)) and hasattr(v, "attribute_map"):
            yield from _sub_configs(v, f"{prefix}{k}.")


def _owner(cfg: Any, path: str) -> tuple[Any, str]:
    *parts, name = path.split(".")
    for p in parts:
        cfg = getattr(cfg, p)
    return cfg, name


def _get(cfg: Any, path: str) -> Any:
    obj, name = _owner(cfg, path)
    return getattr(obj, name, None)


def _set(cfg: Any, path: str, value: Any) -> None:
    obj, name = _owner(cfg, path)
    setattr(obj, name, value)


def _settable(cfg: Any, name: str) -> bool:
    return name not in getattr(cfg, "attribute_map", {}) and not isinstance(getattr(type(cfg), name, None), property)


def _key(model: nn.Module, cfg: Any) -> str | None:
    try:
        return type(model).__qualname__ + json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    except Exception:  # noqa: BLE001 - a config that does not serialise: no cache, no sync
        return None


@contextmanager
def _quiet() -> Iterator[None]:
    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ---- observables: shapes and scalar attributes ----------------------------------------------
def _observe(model: nn.Module) -> tuple[dict[Obs, int], dict[Obs, float]]:
    shapes: dict[Obs, int] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None:
            continue
        for d, n in enumerate(t.shape):
            shapes[("s", name, d)] = int(n)
        shapes[("s", name, -1)] = t.dim()
    attrs: dict[Obs, float] = {}
    for mname, m in model.named_modules():
        for a, v in vars(m).items():
            if a.startswith("_") or a in _SKIP_ATTRS or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                continue
            attrs[("a", mname, a)] = v
    return shapes, attrs


_REBUILDS: dict[str, tuple[dict[Obs, int], dict[Obs, float]] | None] = {}


def _rebuild(model: nn.Module, cfg: Any) -> tuple[dict[Obs, int], dict[Obs, float]] | None:
    """Observables of ``type(model)`` built from ``cfg`` on the meta device (None: it does not build)."""
    key = _key(model, cfg)
    if key is not None and key in _REBUILDS:
        return _REBUILDS[key]
    try:
        with torch.device("meta"), _quiet():
            fresh = type(model)._from_config(copy.deepcopy(cfg))
        out = _observe(fresh)
    except Exception:  # noqa: BLE001 - a config the class refuses: that value is not possible
        out = None
    if key is not None:
        if len(_REBUILDS) > 512:
            _REBUILDS.clear()
        _REBUILDS[key] = out
    return out


# ---- learn: which observables each field controls -------------------------------------------
@dataclass
class _Model:
    cfg: Any  # the config with derived fields made explicit
    base: tuple[dict[Obs, int], dict[Obs, float]]
    fields: dict[str, int]  # path -> value in cfg
    effects: dict[Obs, dict[str, int | None]]  # observable -> {field: exponent (None: not multiplicative)}
    explicit: dict[str, int]  # derived fields that were None and were made explicit


_LEARNED: dict[str, _Model | None] = {}


def _exponent(a: float, b: float) -> int | None:
    if a and b == 2 * a:
        return 1
    if b and a == 2 * b:
        return -1
    return None


def _derived_candidates(model: nn.Module, cfg: Any, prefix: str, name: str) -> list[int]:
    sub = _get(cfg, prefix[:-1]) if prefix else cfg
    hidden = next((v for v in (getattr(sub, f, None) for f in ("hidden_size", "n_embd", "d_model")) if type(v) is int), None)
    if name == "head_dim":
        vals = {m.head_dim for m in model.modules() if type(getattr(m, "head_dim", None)) is int}
        return sorted(vals) if len(vals) == 1 else []
    return [4 * hidden] if hidden else []


def _learn(model: nn.Module) -> _Model | None:
    cfg0 = model.config
    key = _key(model, cfg0)
    if key is None:
        return None
    if key in _LEARNED:
        return _LEARNED[key]
    _LEARNED[key] = None  # a failure below is remembered: no second try per config
    if len(_LEARNED) > 256:
        _LEARNED.clear()
    base = _rebuild(model, cfg0)
    if base is None:
        return None
    cfg = copy.deepcopy(cfg0)
    explicit: dict[str, int] = {}
    fields: dict[str, int] = {}
    for prefix, sub in list(_sub_configs(cfg)):
        for name in FIELDS:
            if not _settable(sub, name):
                continue
            v = getattr(sub, name, None)
            if v is None and name in _DERIVED:
                for cand in _derived_candidates(model, cfg, prefix, name):
                    trial = copy.deepcopy(cfg)
                    _set(trial, prefix + name, cand)
                    if _rebuild(model, trial) == base:
                        _set(cfg, prefix + name, cand)
                        explicit[prefix + name] = v = cand
                        break
            if type(v) is int and v > 0:
                fields[prefix + name] = v
    effects: dict[Obs, dict[str, int | None]] = {}
    shapes0, attrs0 = base
    for path, v in list(fields.items()):
        trial = copy.deepcopy(cfg)
        try:
            _set(trial, path, 2 * v)
        except Exception:  # noqa: BLE001 - a read-only field
            del fields[path]
            continue
        got = _rebuild(model, trial)
        if got is None:
            del fields[path]
            continue
        hit = False
        for old, new in ((shapes0, got[0]), (attrs0, got[1])):
            for o, a in old.items():
                b = new.get(o)
                if b is not None and b != a:
                    effects.setdefault(o, {})[path] = _exponent(a, b)
                    hit = True
        if not hit:  # the model ignores it (GPT-2 with an explicit head_dim): never written
            del fields[path]
            explicit.pop(path, None)
    learned = _Model(cfg, base, fields, effects, explicit)
    _LEARNED[key] = learned
    return learned


def head_dim_free(model: nn.Module) -> bool | None:
    """Whether the config sets the attention head width independently of the hidden width
    (``head_dim`` / ``d_kv`` honoured: Llama, Qwen2, Phi-3, Gemma, T5); False when it is
    ``hidden_size // num_heads`` (BERT, GPT-2, OPT, Falcon), so pruning heads and the hidden
    width reloads only when both keep ``hidden = heads * head_dim``. None: not a transformers model
    or it does not build from its config."""
    if not is_hf_model(model):
        return None
    learned = _learn(model)
    if learned is None:
        return None
    return any(p.rsplit(".", 1)[-1] in ("head_dim", "d_kv", "kv_channels") for p in learned.fields)


# ---- solve ----------------------------------------------------------------------------------
def _solve(learned: _Model, now: dict[Obs, float], base: dict[Obs, float], solved: dict[str, int],
           conflict: dict[str, set[Fraction]]) -> None:
    """Solve fields from observables ``now`` (vs ``base``), one unknown at a time, into ``solved``."""
    progress = True
    while progress:
        progress = False
        cands: dict[str, set[Fraction]] = {}
        for o, eff in learned.effects.items():
            if o not in now or o not in base or any(e is None for e in eff.values()):
                continue
            unknown = [f for f in eff if f not in solved and f not in conflict]
            if len(unknown) != 1 or any(f in conflict for f in eff):
                continue
            f = unknown[0]
            if not base[o]:
                continue
            ratio = Fraction(now[o]).limit_denominator(1 << 20) / Fraction(base[o]).limit_denominator(1 << 20)
            for g, e in eff.items():
                if g != f:
                    ratio /= Fraction(solved[g], learned.fields[g]) ** e
            cands.setdefault(f, set()).add(learned.fields[f] * ratio ** eff[f])
        for f, vals in cands.items():
            if len(vals) == 1 and (v := next(iter(vals))).denominator == 1 and v > 0:
                solved[f] = int(v)
                progress = True
            else:
                conflict[f] = vals


def _mismatch(now: dict[Obs, int], rebuilt: dict[Obs, int]) -> str | None:
    for o, v in now.items():
        r = rebuilt.get(o)
        if r is not None and r != v and o[2] != -1:
            return f"{o[1]} has size {v} in dim {o[2]}, the config rebuilds {r}"
    return None


def sync_config(model: nn.Module) -> tuple[ConfigSync, Callable[[], None]] | None:
    """Make ``model.config`` describe ``model``'s current widths (see the module docstring).

    Returns ``(what was done, undo)``, or None for a model that is not a transformers model or
    whose class does not build from its config (nothing changed then).
    """
    if not is_hf_model(model):
        return None
    learned = _learn(model)
    if learned is None:
        return None
    cfg = model.config
    shapes, attrs = _observe(model)
    base_shapes, base_attrs = learned.base
    solved: dict[str, int] = {}
    conflict: dict[str, set[Fraction]] = {}
    _solve(learned, shapes, base_shapes, solved, conflict)
    _solve(learned, attrs, base_attrs, solved, conflict)
    new_cfg = copy.deepcopy(learned.cfg)
    for f, v in solved.items():
        _set(new_cfg, f, v)
    undo: list[Callable[[], None]] = []
    report = ConfigSync()
    changes = {f: v for f, v in solved.items() if v != _get(cfg, f)}
    changes.update({f: v for f, v in learned.explicit.items() if _get(cfg, f) is None and f not in changes})
    for f, v in changes.items():
        obj, name = _owner(cfg, f)
        old = getattr(obj, name, None)
        setattr(obj, name, v)
        undo.append(lambda obj=obj, name=name, old=old: setattr(obj, name, old))
        report.fields[f] = v
    rebuilt = _rebuild(model, new_cfg)
    if rebuilt is None:
        report.reloadable, report.reason = False, "the model does not build from the new config"
    else:
        why = _mismatch(shapes, rebuilt[0])
        if why is not None and conflict:  # the likely cause: one field, several widths (layers pruned differently)
            f, vals = sorted(conflict.items())[0]
            shown = ", ".join(str(v) if v.denominator == 1 else f"{float(v):g}" for v in sorted(vals))
            why = f"{f} would need several values: {shown}"
        if why is not None:
            report.reloadable, report.reason = False, why
        else:
            _follow_attributes(model, attrs, base_attrs, rebuilt[1], report, undo)

    def undo_all() -> None:
        for u in reversed(undo):
            u()

    return report, undo_all


# ---- attributes the rebuild computes differently --------------------------------------------
def _follow_attributes(model: nn.Module, now: dict[Obs, float], base: dict[Obs, float], rebuilt: dict[Obs, float],
                       report: ConfigSync, undo: list[Callable[[], None]]) -> None:
    """Scalar module attributes: one surgery never changed (still its value from the old config)
    takes the rebuilt value; one surgery changed to something else means the config cannot
    describe the model. Gemma's embedding scale is recomputed with the weights compensated."""
    for o, v in now.items():
        r = rebuilt.get(o)
        if r is None or r == v:
            continue
        _, mname, attr = o
        mod = model.get_submodule(mname) if mname else model
        if attr == "scalar_embed_scale" and isinstance(getattr(mod, "embed_scale", None), torch.Tensor):
            _rescale_embedding(model, mod, float(v), float(r), undo)
        elif v != base.get(o):
            report.reloadable = False
            report.reason = f"{mname}.{attr} is {v}, the config rebuilds {r}"
            continue
        old = getattr(mod, attr)
        setattr(mod, attr, r)
        undo.append(lambda mod=mod, attr=attr, old=old: setattr(mod, attr, old))
        report.attributes[f"{mname}.{attr}"] = r


def _swap_data(p: torch.Tensor, new: torch.Tensor, undo: list[Callable[[], None]]) -> None:
    old = p.data
    p.data = new
    undo.append(lambda: setattr(p, "data", old))


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The norm in front of the output embedding (``model.norm`` of a decoder LLM), if there is one."""
    base = getattr(model, "base_model", model)
    for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
        m = getattr(base, name, None)
        if isinstance(m, nn.Module) and isinstance(getattr(m, "weight", None), torch.Tensor):
            return m
    return None


def _rescale_embedding(model: nn.Module, emb: nn.Module, old: float, new: float, undo: list[Callable[[], None]]) -> None:
    """Gemma's ``embed_scale = sqrt(hidden_size)``: the rebuilt model multiplies by ``new``. Rows
    are scaled by ``old / new`` so the embedding output is unchanged; a tied output embedding is
    compensated in the final norm (Gemma's norm multiplies by ``1 + weight``)."""
    c = old / new
    with torch.no_grad():
        w = emb.weight
        _swap_data(w, w.data * c, undo)
        buf = emb.embed_scale
        name = "embed_scale"
        emb._buffers[name] = torch.full_like(buf, new)
        undo.append(lambda: emb._buffers.__setitem__(name, buf))
        try:
            out = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            out = None
        if out is not None and getattr(out, "weight", None) is w:
            norm = _final_norm(model)
            if norm is None:
                return
            nw = norm.weight
            one_plus = "Gemma" in type(norm).__name__
            _swap_data(nw, ((1 + nw.data) / c - 1) if one_plus else nw.data / c, undo)
