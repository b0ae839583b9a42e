"""Transformer blocks found by their parts' names, and what removing heads or neurons keeps.

Hugging Face BERT-style encoders (``query``/``key``/``value`` + ``output.dense``) and Llama-style
decoders (``q_proj``/``k_proj``/``v_proj``/``o_proj``, grouped-query attention) are recognised
wherever they sit inside a model, without tracing it:

* :func:`attention_sites`, :func:`ffn_sites`: the attention and feed-forward blocks, by name;
* :func:`layer_list`: the model's list of transformer blocks;
* :func:`head_keep` / :func:`neuron_keep`: the indices to keep of every tensor when some heads
  (or FFN neurons) go, in the form :func:`torchslim.graph.surgery.slice_model_` applies; the
  one surgery then cuts them (the same one channel pruning uses).

With grouped-query attention the query heads left must be spread evenly over the key/value heads
left (a key/value head goes when all of its query heads go); :func:`head_keep` refuses a removal
that breaks this.

Example:
    >>> import torch, transformers
    >>> from torchslim.graph.surgery import slice_model_
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=4, intermediate_size=32)
    >>> model = transformers.BertModel(cfg, add_pooling_layer=False)
    >>> site = attention_sites(model)["encoder.layer.0.attention"]
    >>> keep, attrs = head_keep(site, [0, 2])
    >>> slice_model_(model, keep, attrs=attrs)
    >>> attention_sites(model)["encoder.layer.0.attention"].num_heads, site.q.out_features
    (2, 8)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from torchslim.errors import ConfigError

__all__ = [
    "AttentionSite",
    "FFNSite",
    "attention_sites",
    "ffn_sites",
    "head_keep",
    "head_layout",
    "layer_list",
    "neuron_keep",
]

KeepMap = dict[str, list[torch.Tensor | None]]

# attributes of an attention module that hold its query head count, key/value head count, width
_QUERY_HEADS = ("num_attention_heads", "num_heads")
_KV_HEADS = ("num_key_value_heads",)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@dataclass
class AttentionSite:
    """One attention block: its projections, head layout and where they sit in the model.

    Attributes:
        name: the block's module name (the key of :func:`attention_sites`).
        module: the module holding the head-count attributes (``num_attention_heads``...).
        q, k, v, o: the query / key / value / output projections.
        head_dim: width of one head.
        path: module name of ``module``; ``paths``: module name of each projection (``"q"``...).
    """

    name: str
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int
    path: str = ""
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def groups(self) -> int:
        return self.num_heads // max(self.num_kv_heads, 1)


@dataclass
class FFNSite:
    """One feed-forward block: the up projections (rows) and the down projection (columns).

    ``up_paths`` / ``down_path`` are the projections' module names.
    """

    name: str
    up: list[nn.Linear]
    down: nn.Linear
    up_paths: list[str] = field(default_factory=list)
    down_path: str = ""

    @property
    def width(self) -> int:
        return self.down.in_features


def attention_sites(model: nn.Module) -> dict[str, AttentionSite]:
    """Every BERT-style or Llama-style attention block of ``model``, by module name."""
    out = {}
    for name, m in model.named_modules():
        sa, so = getattr(m, "self", None), getattr(m, "output", None)
        if sa is not None and all(isinstance(getattr(sa, a, None), nn.Linear) for a in ("query", "key", "value")) and isinstance(
            getattr(so, "dense", None), nn.Linear
        ):
            own = _join(name, "self")
            paths = {"q": _join(own, "query"), "k": _join(own, "key"), "v": _join(own, "value"), "o": _join(name, "output", "dense")}
            out[name] = AttentionSite(name, sa, sa.query, sa.key, sa.value, so.dense, int(sa.attention_head_size), own, paths)
        elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            hd = getattr(m, "head_dim", None)
            if hd is None:
                continue
            paths = {key: _join(name, f"{key}_proj") for key in ("q", "k", "v", "o")}
            out[name] = AttentionSite(name, m, m.q_proj, m.k_proj, m.v_proj, m.o_proj, int(hd), name, paths)
    return out


def ffn_sites(model: nn.Module) -> dict[str, FFNSite]:
    """Every BERT-style (``intermediate.dense`` -> ``output.dense``) or Llama-style MLP, by name."""
    out = {}
    for name, m in model.named_modules():
        inter, outp = getattr(m, "intermediate", None), getattr(m, "output", None)
        if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(outp, "dense", None), nn.Linear):
            out[name] = FFNSite(name, [inter.dense], outp.dense, [_join(name, "intermediate", "dense")], _join(name, "output", "dense"))
        elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            out[name] = FFNSite(
                name, [m.gate_proj, m.up_proj], m.down_proj, [_join(name, "gate_proj"), _join(name, "up_proj")], _join(name, "down_proj")
            )
    return out


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's transformer blocks: a ``ModuleList`` named layer / layers / h / blocks.

    Raises:
        ConfigError: the model has no such list.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers", "h", "blocks") and len(m):
            return name, m
    raise ConfigError("no transformer layer list (a ModuleList named layer / layers / h / blocks) found in the model")


def head_layout(site: AttentionSite, heads: Sequence[int]) -> tuple[list[int], list[int], int]:
    """(query heads kept, key/value heads kept, query heads per key/value head after) for removing ``heads``.

    Raises:
        ConfigError: an index that is not an integer in range, a removal leaving no head, or
            (grouped-query attention) an uneven number of query heads left per key/value head.
    """
    n, nkv, groups = site.num_heads, site.num_kv_heads, site.groups
    bad = [h for h in heads if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < n]
    if bad:
        raise ConfigError(f"{site.name}: head indices must be integers in [0, {n}); got {bad}")
    drop = set(heads)
    kept = [h for h in range(n) if h not in drop]
    if not kept:
        raise ConfigError(f"{site.name}: pruning heads {sorted(drop)} leaves zero of its {n} heads; keep at least one")
    per_group = [sum(1 for h in kept if h // groups == j) for j in range(nkv)]
    alive = [c for c in per_group if c]
    if len(set(alive)) > 1:
        raise ConfigError(
            f"{site.name}: grouped-query attention ({n} query heads over {nkv} key/value heads) needs the same number of "
            f"query heads left in every key/value group; this prune leaves {per_group} per group. Remove the same count "
            "from every group, or whole groups"
        )
    kv_kept = [j for j, c in enumerate(per_group) if c]
    return kept, kv_kept, alive[0]


def _units(units: Sequence[int], size: int) -> torch.Tensor:
    """Indices of the ``size``-wide slices ``units`` of a dimension."""
    return torch.tensor([u * size + i for u in units for i in range(size)], dtype=torch.long)


def _rows(keep: KeepMap, path: str, lin: nn.Linear, idx: torch.Tensor) -> None:
    keep[f"{path}.weight"] = [idx, None]
    if lin.bias is not None:
        keep[f"{path}.bias"] = [idx]


def head_keep(site: AttentionSite, heads: Sequence[int]) -> tuple[KeepMap, dict[str, dict[str, int]]]:
    """What :func:`~torchslim.graph.surgery.slice_model_` needs to remove ``heads`` of ``site``.

    Returns:
        ``(keep, attrs)``: the kept rows of the query / key / value projections and the kept
        columns of the output projection, and the new head counts of the attention module.

    Raises:
        ConfigError: as :func:`head_layout`.
    """
    kept, kv_kept, groups = head_layout(site, heads)
    hd = site.head_dim
    q_rows, kv_rows = _units(kept, hd), _units(kv_kept, hd)
    keep: KeepMap = {}
    _rows(keep, site.paths["q"], site.q, q_rows)
    _rows(keep, site.paths["k"], site.k, kv_rows)
    _rows(keep, site.paths["v"], site.v, kv_rows)
    keep[f"{site.paths['o']}.weight"] = [None, q_rows]
    m = site.module
    new: dict[str, int] = {}
    for a in _QUERY_HEADS:
        if type(getattr(m, a, None)) is int:
            new[a] = len(kept)
    for a in _KV_HEADS:
        if type(getattr(m, a, None)) is int:
            new[a] = len(kv_kept)
    if hasattr(m, "all_head_size"):
        new["all_head_size"] = len(kept) * hd
    if hasattr(m, "num_key_value_groups"):
        new["num_key_value_groups"] = groups
    return keep, {site.path: new}


def neuron_keep(site: FFNSite, neurons: Sequence[int]) -> KeepMap:
    """What :func:`~torchslim.graph.surgery.slice_model_` needs to remove FFN ``neurons`` of ``site``.

    Raises:
        ConfigError: an index that is not an integer in range, or a removal leaving no neuron.
    """
    width = site.width
    bad = [i for i in neurons if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < width]
    if bad:
        raise ConfigError(f"{site.name}: neuron indices must be integers in [0, {width}); got {bad[:5]}")
    drop = set(neurons)
    kept = torch.tensor([i for i in range(width) if i not in drop], dtype=torch.long)
    if not kept.numel():
        raise ConfigError(f"{site.name}: pruning every one of its {width} neurons leaves none; keep at least one")
    keep: KeepMap = {}
    for path, lin in zip(site.up_paths, site.up):
        _rows(keep, path, lin, kept)
    keep[f"{site.down_path}.weight"] = [None, kept]
    return keep
