"""Budgeted compression search on Optuna: the most accurate model for a MACs / latency / size budget.

``ts.search(model, data, budget="macs=0.3", trials=30, out="runs/search")`` searches one pruning
ratio per coupled channel group (and optional per-layer bit widths and rank fractions), writes the
Pareto front, the best configuration as a recipe ``torchslim compress`` runs, and the compressed
best model. The study lives in SQLite in the output directory (resumable) or in a shared PostgreSQL database
(``storage="postgresql://..."``) that any number of workers join.
"""

from torchslim.search import _cli  # noqa: E402,F401  (registers the search CLI verbs)
from torchslim.search.api import DEFAULT_STUDY, SearchConfig, SearchResult, search
from torchslim.search.cost import CostModel
from torchslim.search.objectives import METRICS, bn_recalibrate_, parse_budget, parse_objectives
from torchslim.search.space import GroupChoice, LayerBitsChoice, LayerRankChoice, SearchSpace, build_space

__all__ = [
    "DEFAULT_STUDY",
    "METRICS",
    "CostModel",
    "GroupChoice",
    "LayerBitsChoice",
    "LayerRankChoice",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "bn_recalibrate_",
    "build_space",
    "parse_budget",
    "parse_objectives",
    "search",
]
