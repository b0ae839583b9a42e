"""What a search leaves in its output directory: trials, the Pareto front (table and plot)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchslim._utils import atomic_path

__all__ = ["budget_words", "front_metrics", "pareto_front", "write_trials", "pareto_table", "plot_pareto"]

#: what the tables and lines call each searched metric
_NAMES = {"macs": "MACs", "params": "parameters", "size": "size", "latency": "latency", "accuracy": "accuracy"}


def budget_words(budget: Any) -> str:
    """A budget in words: ``{'macs': 0.3}`` -> ``'MACs <= 0.30 of the original'``; empty -> ``'none'``.

    Example:
        >>> budget_words({"macs": 0.3, "latency": 0.5})
        'MACs <= 0.30 of the original, latency <= 0.50 of the original'
        >>> budget_words({})
        'none'
    """
    items = dict(budget or {})
    if not items:
        return "none"
    return ", ".join(f"{_NAMES.get(k, k)} <= {float(v):.2f} of the original" for k, v in items.items())


def front_metrics(objectives: Sequence[str]) -> tuple[str, ...]:
    """The metrics the Pareto front is taken over: the objectives, or accuracy vs MACs for one."""
    if len(objectives) > 1:
        return tuple(objectives)
    other = "macs" if objectives[0] != "macs" else "accuracy"
    return (objectives[0], other)


def _key(metric: str, value: float) -> float:
    return -value if metric == "accuracy" else value  # everything minimised


def pareto_front(trials: Sequence[Any], metrics: Sequence[str]) -> list[Any]:
    """The complete trials no other complete trial beats on every metric, sorted by the first."""
    rows = [(t, [_key(m, t.user_attrs["metrics"][m]) for m in metrics]) for t in trials
            if all(m in t.user_attrs.get("metrics", {}) for m in metrics)]
    front = []
    for t, v in rows:
        dominated = any(all(a <= b for a, b in zip(w, v)) and any(a < b for a, b in zip(w, v)) for _, w in rows)
        if not dominated:
            front.append((t, v))
    seen, out = set(), []
    for t, v in sorted(front, key=lambda tv: (tv[1], tv[0].number)):
        if tuple(v) in seen:  # equal points: keep the earliest trial
            continue
        seen.add(tuple(v))
        out.append(t)
    return out


def _trial_row(t: Any) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name.lower(),
        "values": list(t.values) if t.values is not None else None,
        "metrics": t.user_attrs.get("metrics"),
        "ratios": t.user_attrs.get("ratios"),
        "layer_bits": t.user_attrs.get("layer_bits"),
        "ranks": t.user_attrs.get("ranks"),
        "factorized": t.user_attrs.get("factorized"),
        "params": t.params,
        "worker": t.user_attrs.get("worker"),
        "note": t.user_attrs.get("pruned_because") or t.system_attrs.get("fail_reason"),
        "retry_of": t.system_attrs.get("failed_trial"),
        "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
        if t.datetime_complete and t.datetime_start else None,
    }


def write_trials(trials: Sequence[Any], out: Path) -> dict[str, str]:
    """``trials.json`` (everything) and ``trials.csv`` (one flat row per trial)."""
    rows = [_trial_row(t) for t in trials]
    jpath, cpath = out / "trials.json", out / "trials.csv"
    with atomic_path(jpath) as tmp:
        tmp.write_text(json.dumps(rows, indent=1, default=str))
    metric_cols = sorted({k for r in rows for k in (r["metrics"] or {})})
    ratio_cols = sorted({k for r in rows for k in (r["ratios"] or {})})
    bit_cols = sorted({k for r in rows for k in (r["layer_bits"] or {})})
    rank_cols = sorted({k for r in rows for k in (r["ranks"] or {})})
    with atomic_path(cpath) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", *metric_cols, *[f"ratio:{k}" for k in ratio_cols],
                    *[f"bits:{k}" for k in bit_cols], *[f"rank:{k}" for k in rank_cols], "note"])
        for r in rows:
            m, ra, b = r["metrics"] or {}, r["ratios"] or {}, r["layer_bits"] or {}
            fz = r["factorized"] or {}  # the rank a layer really got (1.0: left alone)
            w.writerow([r["number"], r["state"], *[m.get(k, "") for k in metric_cols], *[ra.get(k, "") for k in ratio_cols],
                        *[b.get(k, "") for k in bit_cols], *[fz.get(k, 1.0) if r["ranks"] else "" for k in rank_cols],
                        r["note"] or ""])
    return {"trials_json": str(jpath), "trials_csv": str(cpath)}


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if metric == "accuracy" else f"{v:.3f}"


def pareto_table(front: Sequence[Any], best: Any, recipes: dict[int, str], objectives: Sequence[str] = ("accuracy", "macs")) -> Any:
    """A rich table of the front: accuracy and every cost as a fraction of the original.

    With one objective the title says so (the best trial, with the trials that trade it against
    MACs); with two or more it is the Pareto front of the objectives. The caption explains ``*``.
    """
    from rich.table import Table

    cols = [m for m in ("accuracy", "macs", "params", "size", "latency")
            if any(m in t.user_attrs.get("metrics", {}) for t in front)]
    if len(objectives) == 1:
        one = _NAMES.get(objectives[0], objectives[0])
        other = _NAMES.get(front_metrics(objectives)[1], "")
        title = (f"Best trial by {one}, and the trials that trade {one} against {other} "
                 "(costs as fractions of the original)")
        caption = "* the best trial: its recipe is best_recipe.yaml"
    else:
        title = (f"Pareto front of {', '.join(_NAMES.get(o, o) for o in objectives)}: no trial beats one of these on "
                 "every objective (costs as fractions of the original)")
        lead = "accuracy" if "accuracy" in objectives else objectives[0]
        caption = (f"* the trial picked as best (best_recipe.yaml): the "
                   f"{'highest' if lead == 'accuracy' else 'lowest'} {_NAMES.get(lead, lead)} on the front")
    t = Table(title=title, caption=caption if best is not None else None, caption_justify="left")
    t.add_column("trial", justify="right")
    for c in cols:
        t.add_column(_NAMES.get(c, c), justify="right")
    t.add_column("recipe")
    for tr in front:
        m = tr.user_attrs.get("metrics", {})
        mark = " *" if best is not None and tr.number == best.number else ""
        t.add_row(f"{tr.number}{mark}", *[_fmt(c, m.get(c)) for c in cols], recipes.get(tr.number, ""))
    from torchslim._text import printable

    return printable(t)  # plain text under print(), the rich table on a console


def plot_pareto(trials: Sequence[Any], front: Sequence[Any], path: Path) -> str | None:
    """Accuracy against every measured cost (MACs, size, latency), the front highlighted; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if "accuracy" in t.user_attrs.get("metrics", {})]
    costs = [c for c in ("macs", "size", "latency") if any(c in t.user_attrs["metrics"] for t in done)]
    if not done or not costs:
        return None
    fig, axes = plt.subplots(1, len(costs), figsize=(4.2 * len(costs), 3.6), squeeze=False)
    on_front = {t.number for t in front}
    for ax, c in zip(axes[0], costs):
        pts = [(t.user_attrs["metrics"][c], t.user_attrs["metrics"]["accuracy"], t.number in on_front)
               for t in done if c in t.user_attrs["metrics"]]
        ax.scatter([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], s=14, c="0.6", label="trials")
        fr = sorted((p for p in pts if p[2]), key=lambda p: p[0])
        ax.plot([p[0] for p in fr], [p[1] for p in fr], "o-", c="tab:red", ms=5, label="Pareto front")
        ax.set_xlabel(f"{c} (fraction of original)")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return str(path)
