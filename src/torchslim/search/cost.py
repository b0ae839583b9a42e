"""What a searched configuration costs, and the repair that brings a sample to the budget.

A sampled configuration is *repaired* toward the budget before it is evaluated: the kept
fraction of every group is multiplied by one global factor, found by bisection on shape-only
(meta-device) copies, until the MACs (or params) budget is met; the budget left over by the
integer rounding is then filled channel by channel (:meth:`CostModel.fill`), so trials land just
under the budget. The sampled per-group proportions survive; trials are not wasted on
configurations that miss the budget. Factorized layers are costed analytically with the formulas
``factorize_`` uses, including its rule to leave a layer alone when the factorized form would
not be smaller.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from torchslim.errors import ConfigError
from torchslim.search.space import SearchSpace

__all__ = ["CostModel"]


class CostModel:
    """MACs and params of the compressed model for per-group kept counts and per-layer ranks.

    Channel pruning is costed on shape-only (meta-device) copies: the copy is sliced as
    ``prune_channels_`` would slice it and profiled. Kept counts are what ``prune_channels_``
    keeps for ratios ``(size - kept) / size`` (those ratios are exact, so the real pruning keeps
    exactly these counts). Factorization is costed analytically on the pruned shapes with the
    formulas of the ``factorize_`` method (SVD: ``r * (in + out)`` per output position; Tucker-2:
    ``I*r_in`` per input position plus ``r_out*r_in*kh*kw + O*r_out`` per output position), ranks
    ``fraction`` of the pruned layer's full rank, and a layer whose factorized form would not have
    fewer MACs and fewer params is left alone, as ``factorize_(only_if_smaller=True)`` does.

    Example:
        >>> import torchslim as ts
        >>> from torchslim.search import build_space
        >>> model = ts.create_model("zoo:lenet5")
        >>> space = build_space(model, ranks=(0.25, 1.0))
        >>> cost = CostModel(model, ts.example_inputs(model), space)
        >>> full = [c.size for c in space.groups]
        >>> cost.cost(full)["macs"], cost.cost(full, {"classifier.0": 0.25})["macs"] < 1.0
        (1.0, True)
    """

    def __init__(self, model: nn.Module, example_inputs: Any, space: SearchSpace, skip: Sequence[str] = ()) -> None:
        from torchslim.graph.spaces import analyse, meta_copy, to_meta
        from torchslim.profile import profile

        self.model = model
        self.space = space
        self.cg = analyse(model, example_inputs, skip=tuple(skip))
        self.by_id = {g.id: g for g in self.cg.groups}
        self._meta = meta_copy(model) is not None
        self.inputs = to_meta(example_inputs) if self._meta else example_inputs
        shadow = meta_copy(model) if self._meta else model
        base = profile(shadow, self.inputs, latency=False, size=False)
        self.base = {"macs": float(base.macs), "params": float(base.params)}
        self._methods: dict[str, Any] = {}
        self._geometry: dict[str, Any] = {}
        if space.layer_ranks:
            from torchslim.lowrank import layer_geometry  # the very geometry factorize_ costs layers with

            layers = [(c.layer, shadow.get_submodule(c.layer)) for c in space.layer_ranks]
            self._geometry = layer_geometry(shadow, layers, self.inputs)
        self._cache: dict[Any, tuple[dict[str, float], dict[str, float]]] = {}

    @staticmethod
    def _key(kept: Sequence[int], ranks: Mapping[str, float] | None) -> tuple[Any, ...]:
        low = tuple(sorted((str(k), float(v)) for k, v in (ranks or {}).items() if float(v) < 1.0))
        return tuple(int(k) for k in kept), low

    def cost(self, kept: Sequence[int], ranks: Mapping[str, float] | None = None) -> dict[str, float]:
        """``{"macs", "params"}`` as fractions of the original.

        Args:
            kept: kept channels, one count per searched group.
            ranks: ``{layer: fraction of full rank}``; ``1.0`` or absent: the layer is not factorized.
        """
        return self._evaluate(kept, ranks)[0]

    def factorized(self, kept: Sequence[int], ranks: Mapping[str, float] | None) -> dict[str, float]:
        """The layers ``factorize_`` really replaces for these choices (``{layer: fraction}``)."""
        return dict(self._evaluate(kept, ranks)[1])

    def _method(self, layer: str) -> Any:
        name = self.space.rank_method(layer)
        if name not in self._methods:
            from torchslim._registry import get_method

            self._methods[name] = get_method("lowrank.method", name)()
        return self._methods[name]

    def _evaluate(self, kept: Sequence[int],
                  ranks: Mapping[str, float] | None) -> tuple[dict[str, float], dict[str, float]]:
        key = self._key(kept, ranks)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        from torchslim.graph.spaces import meta_copy
        from torchslim.graph.surgery import slice_model_
        from torchslim.profile import profile

        removed: set[int] = set()
        for c, k in zip(self.space.groups, key[0]):
            g = self.by_id[c.group]
            removed.update(g.channels[k:])
        trial = meta_copy(self.model) if self._meta else copy.deepcopy(self.model)
        if removed:
            slice_model_(trial, self.cg.keep_indices(removed))
        p = profile(trial, self.inputs, latency=False, size=False)
        macs, params = float(p.macs), float(p.params)
        done: dict[str, float] = {}
        for layer, fraction in key[1]:
            if layer not in self._geometry:
                raise ConfigError(f"ranks name {layer!r}, whose rank is not searched; "
                                  f"searched: {sorted(self._geometry)}")
            module, method, geo = trial.get_submodule(layer), self._method(layer), self._geometry[layer]
            macs0, params0 = method.original_cost(module, geo)
            macs1, params1 = method.cost(module, method.scaled(module, fraction), geo)
            if params1 < params0 and (macs1 < macs0 or macs0 == 0):  # else factorize_ leaves it alone
                macs += macs1 - macs0
                params += params1 - params0
                done[layer] = fraction
        out = {"macs": macs / max(self.base["macs"], 1.0), "params": params / max(self.base["params"], 1.0)}
        self._cache[key] = (out, done)
        return out, done

    def kept_for(self, ratios: Mapping[str, float]) -> list[int]:
        """Kept counts of sampled ratios (``floor(size * ratio)`` channels removed per group)."""
        return [c.size - int(math.floor(c.size * float(ratios.get(c.key, 0.0)) + 1e-9)) for c in self.space.groups]

    def floor_kept(self, min_channels: int) -> list[int]:
        return [min(c.size, max(1, min_channels)) for c in self.space.groups]

    def min_cost(self, min_channels: int, ranks: Mapping[str, float] | None = None) -> dict[str, float]:
        """The cost when every searched group keeps only ``min_channels``: the most any budget can save."""
        return self.cost(self.floor_kept(min_channels), ranks)

    def repair(self, kept: Sequence[int], metric: str, fraction: float, *, ranks: Mapping[str, float] | None = None,
               min_channels: int = 1, grow: bool = True, iters: int = 20, fill: bool = True,
               tol: float = 0.02, passes: int = 3) -> list[int] | None:
        """Scale every kept fraction by one factor so ``metric`` lands at or just under ``fraction``.

        Shrinks an over-budget configuration; with ``grow`` also widens one under the budget.
        The factor is bisected; the budget the integer rounding leaves over is then filled with
        :meth:`fill`. When that still lands more than ``tol`` (relative) under the budget, because
        the groups that could grow are coarse (one channel of a 6-channel conv is several percent
        of the MACs), each such group is tried one channel wider with the others trimmed (see
        :meth:`trim`) or scaled down, then refilled, and the configuration closest to the budget
        is kept (up to ``passes`` times while that helps). The ranks stay as sampled: when they
        alone bring the unpruned model under the budget, nothing can grow and the trial stays under.

        Returns:
            The repaired kept counts, or None when the budget cannot be met.
        """
        sizes = [c.size for c in self.space.groups]
        now = self.cost(list(kept), ranks)[metric]
        if now <= fraction and not grow:
            return list(kept)
        if not sizes:
            return [] if now <= fraction else None
        floor = self.floor_kept(min_channels)
        best = self._scale(kept, metric, fraction, ranks, floor, -1, iters)
        if best is None or not fill:
            return best
        best = self.fill(best, metric, fraction, ranks=ranks, target=kept)
        got = self.cost(best, ranks)[metric]
        for _ in range(passes):
            before = got
            for g in sorted(range(len(sizes)), key=lambda g: best[g] / max(kept[g], 1)):
                if got >= fraction * (1 - tol):
                    return best
                if best[g] >= sizes[g]:
                    continue
                start = [*best[:g], best[g] + 1, *best[g + 1:]]
                for how in ("trim", "scale"):  # fewer channels elsewhere: most over-proportion first, or all
                    cand = (self.trim(start, metric, fraction, ranks=ranks, target=kept, floor=floor, pinned=g)
                            if how == "trim" else self._scale(start, metric, fraction, ranks, floor, g, iters))
                    if cand is None:
                        continue
                    cand = self.fill(cand, metric, fraction, ranks=ranks, target=kept)
                    c = self.cost(cand, ranks)[metric]
                    if got < c <= fraction:
                        best, got = cand, c
                        break
            if got <= before:
                break
        return best

    def _scale(self, kept: Sequence[int], metric: str, fraction: float, ranks: Mapping[str, float] | None,
               floor: Sequence[int], pinned: int, iters: int) -> list[int] | None:
        """The bisected common factor of every group's kept count but ``pinned``'s (None: cannot fit)."""
        sizes = [c.size for c in self.space.groups]

        def scaled(s: float) -> list[int]:
            return [k if g == pinned else min(n, max(f, int(round(k * s))))
                    for g, (k, n, f) in enumerate(zip(kept, sizes, floor))]

        def fits(s: float) -> bool:
            return self.cost(scaled(s), ranks)[metric] <= fraction

        if self.cost(list(kept), ranks)[metric] > fraction:
            lo, hi = 0.0, 1.0  # fits(lo) is the floor, checked below
            if not fits(lo):
                return None
        else:
            lo, hi = 1.0, max(n / max(k, 1) for g, (k, n) in enumerate(zip(kept, sizes)) if g != pinned)
            if fits(hi):
                return scaled(hi)
        for _ in range(iters):
            mid = (lo + hi) / 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
            if hi - lo < 2e-3:
                break
        return scaled(lo)

    def fill(self, kept: Sequence[int], metric: str, fraction: float, *, ranks: Mapping[str, float] | None = None,
             target: Sequence[int] | None = None, rounds: int = 3) -> list[int]:
        """Spend the budget ``kept`` leaves unused on more channels, keeping within ``fraction``.

        Each round measures what one more channel costs in every group that can grow, plans
        additions with those marginal costs (one channel at a time to the group furthest below its
        ``target`` proportion, default ``kept``), and keeps the longest prefix of the plan that
        really fits (bisected on real costs). Stops when nothing more fits.

        Args:
            kept: a configuration within the budget.
            metric: ``"macs"`` or ``"params"``.
            fraction: the budget.
            ranks: the configuration's ranks (kept as they are).
            target: the proportions to keep (the sampled kept counts).
            rounds: at most this many rounds.

        Returns:
            Kept counts, each at least the given one, whose ``metric`` is still at most ``fraction``.
        """
        import heapq

        sizes = [c.size for c in self.space.groups]
        cur = [int(k) for k in kept]
        want = [max(1, int(t)) for t in (target if target is not None else kept)]
        now = self.cost(cur, ranks)[metric]
        cheapest = 0.0
        for _ in range(rounds):
            if now > fraction or (cheapest > 0 and fraction - now < cheapest):
                break
            marginal: dict[int, float] = {}
            for g, (k, n) in enumerate(zip(cur, sizes)):
                if k < n:
                    c = self.cost([*cur[:g], k + 1, *cur[g + 1:]], ranks)[metric]
                    if c <= fraction:
                        marginal[g] = max(c - now, 0.0)
            if not marginal:
                break
            cheapest = min(v for v in marginal.values() if v > 0) if any(marginal.values()) else 0.0
            plan: list[int] = []
            grown, left = list(cur), fraction - now
            heap = [(cur[g] / want[g], g) for g in marginal]
            heapq.heapify(heap)
            while heap:
                _, g = heapq.heappop(heap)
                if grown[g] >= sizes[g] or marginal[g] > left:
                    continue
                grown[g] += 1
                left -= marginal[g]
                plan.append(g)
                heapq.heappush(heap, (grown[g] / want[g], g))
            if not plan:
                break

            lo, hi = 1, len(plan)  # _grown(cur, plan, 1) fits: its marginal cost was measured
            if self.cost(_grown(cur, plan, hi), ranks)[metric] <= fraction:
                lo = hi
            else:
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self.cost(_grown(cur, plan, mid), ranks)[metric] <= fraction:
                        lo = mid
                    else:
                        hi = mid
            cur = _grown(cur, plan, lo)
            now = self.cost(cur, ranks)[metric]
        return cur

    def trim(self, kept: Sequence[int], metric: str, fraction: float, *, ranks: Mapping[str, float] | None = None,
             target: Sequence[int] | None = None, floor: Sequence[int] | None = None, pinned: int = -1,
             rounds: int = 3) -> list[int] | None:
        """Remove channels from an over-budget ``kept`` until ``metric`` is within ``fraction``.

        The reverse of :meth:`fill`: one channel at a time from the group furthest above its
        ``target`` proportion (never from ``pinned``, never below ``floor``), planned with measured
        marginal savings, the shortest prefix of the plan that fits kept.

        Returns:
            The trimmed kept counts, or None when no trim within ``rounds`` rounds fits.
        """
        import heapq

        cur = [int(k) for k in kept]
        low = list(floor) if floor is not None else [1] * len(cur)
        want = [max(1, int(t)) for t in (target if target is not None else kept)]
        now = self.cost(cur, ranks)[metric]
        for _ in range(rounds):
            if now <= fraction:
                return cur
            saving = {h: max(now - self.cost(_grown(cur, [h], 1, -1), ranks)[metric], 0.0)
                      for h in range(len(cur)) if h != pinned and cur[h] > low[h]}
            if not saving:
                return None
            plan: list[int] = []
            shrunk, need = list(cur), now - fraction
            heap = [(-cur[h] / want[h], h) for h in saving]
            heapq.heapify(heap)
            while heap and need > 0:
                _, h = heapq.heappop(heap)
                if shrunk[h] <= low[h]:
                    continue
                shrunk[h] -= 1
                need -= saving[h]
                plan.append(h)
                heapq.heappush(heap, (-shrunk[h] / want[h], h))
            lo, hi = 0, len(plan)  # the shortest prefix that fits: in (lo, hi]
            if self.cost(_grown(cur, plan, hi, -1), ranks)[metric] > fraction:
                lo = hi
            else:
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self.cost(_grown(cur, plan, mid, -1), ranks)[metric] <= fraction:
                        hi = mid
                    else:
                        lo = mid
            cur = _grown(cur, plan, hi, -1)  # hi == len(plan) when even the whole plan is over
            now = self.cost(cur, ranks)[metric]
        return cur if now <= fraction else None

    def ratios_for(self, kept: Sequence[int]) -> dict[str, float]:
        """The ``prune_channels_`` ratios that keep exactly these counts."""
        return {c.key: (c.size - int(k)) / c.size for c, k in zip(self.space.groups, kept)}


def _grown(kept: Sequence[int], plan: Sequence[int], m: int, step: int = 1) -> list[int]:
    """``kept`` with ``step`` more channels for each of the first ``m`` groups in ``plan``."""
    out = list(kept)
    for g in plan[:m]:
        out[g] += step
    return out
