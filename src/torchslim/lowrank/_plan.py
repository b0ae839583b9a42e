"""Planning for ``factorize_``: which layers, where they run, which ranks, and what it costs.

Nothing here changes the model: the planner reads weights, runs one forward with hooks to
learn each layer's geometry, and returns decisions that ``api.factorize_`` then applies.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchslim._select import matches
from torchslim._utils import evaluating
from torchslim.errors import ConfigError
from torchslim.lowrank._base import Factorization, Geometry, conv_geometry_default, energy_rank
from torchslim.lowrank.cp import CPFactorization
from torchslim.lowrank.ranks import largest_within, vbmf_rank
from torchslim.lowrank.separable import SeparableRewrite
from torchslim.lowrank.spatial import SpatialFactorization
from torchslim.lowrank.svd import SVDFactorization
from torchslim.lowrank.tucker import TuckerFactorization

METHODS: dict[str, Factorization] = {
    m.name: m
    for m in (SVDFactorization(), TuckerFactorization(), CPFactorization(), SpatialFactorization(), SeparableRewrite())
}


@dataclass
class Candidate:
    """One layer the planner considers."""

    name: str
    module: nn.Module
    geometry: Geometry
    macs: int = 0
    params: int = 0
    energies: list[torch.Tensor] | None = None


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def factorized_prefixes(model: nn.Module) -> list[str]:
    """Names of layers an earlier ``factorize_`` replaced (their insides are not re-factorized)."""
    from torchslim._modelinfo import model_info

    info = model_info(model)
    out: list[str] = []
    for plan in info.plans if info is not None else []:
        if plan.get("kind") == "factorize":
            out += [entry["name"] for entry in plan.get("layers", [])]
    return out


def select(
    model: nn.Module, method: Factorization, modules: tuple[str, ...] | None, exclude: tuple[str, ...]
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module, str]]]:
    """``(chosen, skipped)``: the layers to plan for, and same-type layers that cannot be done.

    Raises:
        ConfigError: a name matches nothing, or an explicitly named layer has no factorization
            with this method, or nothing at all is left to factorize.
    """
    named = dict(model.named_modules())
    explicit: set[str] = set()
    if modules is None:
        picked = [n for n, m in named.items() if n and isinstance(m, method.layer_types)]
    else:
        picked = []
        for pat in modules:
            if _has_glob(pat) or pat.startswith("re:"):
                hits = [n for n in named if n and matches(n, pat)]
                if not hits:
                    raise ConfigError(f"modules pattern {pat!r} matches no submodule of {type(model).__name__}")
                picked += [n for n in hits if isinstance(named[n], method.layer_types)]
            else:
                if pat not in named or not pat:
                    near = difflib.get_close_matches(pat, [n for n in named if n], n=3)
                    hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
                    raise ConfigError(f"modules names {pat!r}, which is not a submodule of {type(model).__name__}{hint}")
                reason = method.unsupported(named[pat])
                if reason is not None:
                    raise ConfigError(f"cannot factorize {pat!r} with method {method.name!r}: {reason}")
                picked.append(pat)
                explicit.add(pat)
    done = factorized_prefixes(model)
    chosen: list[tuple[str, nn.Module]] = []
    skipped: list[tuple[str, nn.Module, str]] = []
    seen: set[str] = set()
    for n in picked:
        if n in seen or any(matches(n, e) for e in exclude):
            continue
        seen.add(n)
        if any(n.startswith(p + ".") for p in done):
            continue  # part of a layer factorized before
        reason = method.unsupported(named[n])
        if reason is not None:
            skipped.append((n, named[n], reason))
        else:
            chosen.append((n, named[n]))
    if not chosen:
        kinds = " or ".join(t.__name__ for t in method.layer_types)
        what = "the selected modules" if modules is not None else type(model).__name__
        from torchslim._modelinfo import integer_layers_note

        note = integer_layers_note(model, "factorize_")
        raise ConfigError(
            f"method {method.name!r} found no layer to factorize in {what} (it applies to {kinds} "
            f"with groups=1; skipped: {len(skipped)})" + (note or "; check modules=/skip= or pick another method")
        )
    return chosen, skipped


def geometry(model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Any) -> dict[str, Geometry]:
    """Where each layer runs on ``inputs`` (summed over calls), from one hooked forward."""
    if inputs is None:
        return {n: conv_geometry_default(m) for n, m in layers}
    from torchslim.graph.inputs import as_inputs, call_model

    acc: dict[str, list[int]] = {n: [0, 0, 0] for n, _ in layers}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = args[0]
            a = acc[name]
            if isinstance(mod, nn.Linear):
                rows = x.numel() // mod.in_features
                a[0] += rows
                a[1] += rows
                a[2] += rows
            else:
                n_in = x.shape[0] if x.dim() == 4 else 1
                hi, wi = x.shape[-2:]
                ho, wo = out.shape[-2:]
                a[0] += n_in * hi * wi
                a[1] += n_in * ho * wo
                a[2] += n_in * ho * wi

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    try:
        with evaluating(model), torch.no_grad():
            from torchslim._utils import model_device

            call_model(model, as_inputs(inputs).to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return {n: Geometry(*acc[n]) for n, _ in layers}


def fixed_ranks(method: Factorization, cand: Candidate, rank: int | float | str) -> tuple[int, ...]:
    """Ranks from ``rank=``: an integer, a fraction of full rank, or ``"vbmf"``."""
    m = cand.module
    top = method.max_ranks(m)
    if isinstance(rank, str):  # "vbmf" (validated by the config)
        return method.combine(m, [max(1, vbmf_rank(mat)) for mat in method.mode_matrices(m)])
    if isinstance(rank, float):
        return method.scaled(m, rank)
    if rank > max(top):
        shape = "x".join(str(d) for d in m.weight.shape)
        raise ConfigError(
            f"rank={rank} is larger than layer {cand.name!r} allows with method {method.name!r} "
            f"(at most {max(top)} for its {shape} weight); give a smaller rank, a fraction such as "
            "rank=0.5, or leave the layer out with skip="
        )
    return tuple(min(rank, t) for t in top)


def energy_ranks(method: Factorization, cand: Candidate, energy: float) -> tuple[int, ...]:
    if cand.energies is None:
        cand.energies = method.mode_energies(cand.module)
    return method.combine(cand.module, [energy_rank(e, energy) for e in cand.energies])


def layer_target_ranks(method: Factorization, cand: Candidate, fraction: float, metric: int) -> tuple[int, ...]:
    """Largest ranks whose MACs (``metric=0``) or params (``metric=1``) fit ``fraction`` of the layer's."""
    m = cand.module
    budget = fraction * (cand.macs if metric == 0 else cand.params)
    k = largest_within(lambda j: method.cost(m, method.ladder(m, j), cand.geometry)[metric], method.ladder_size(m), budget)
    return method.ladder(m, k)


def worth_it(method: Factorization, cand: Candidate, ranks: tuple[int, ...]) -> tuple[bool, int, int]:
    """Whether the factorized form is cheaper in both MACs and params; and its cost."""
    macs, params = method.cost(cand.module, ranks, cand.geometry)
    cheaper = params < cand.params and (macs < cand.macs or cand.macs == 0)
    return cheaper, macs, params


def model_target_energy(
    method: Factorization, cands: list[Candidate], total: int, fraction: float, metric: int, only_if_smaller: bool
) -> float:
    """The largest energy level at which the whole model fits ``fraction`` of ``total``.

    Raises:
        ConfigError: even rank 1 everywhere does not reach the target.
    """

    def total_at(e: float) -> int:
        t = total
        for c in cands:
            ranks = energy_ranks(method, c, e)
            ok, macs, params = worth_it(method, c, ranks)
            if ok or not only_if_smaller:
                t += (macs - c.macs) if metric == 0 else (params - c.params)
        return t

    budget = fraction * total
    lowest = total_at(0.0)
    if lowest > budget:
        what = "MACs" if metric == 0 else "params"
        raise ConfigError(
            f"target_{'macs' if metric == 0 else 'params'}={fraction} cannot be reached with method "
            f"{method.name!r} on the selected layers: rank 1 everywhere still leaves "
            f"{lowest / total:.3f} of the model's {what}; raise the target or select more layers"
        )
    lo, hi = 0.0, 1.0
    if total_at(hi) <= budget:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if total_at(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
