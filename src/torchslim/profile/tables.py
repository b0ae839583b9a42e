"""Rich tables for profiles and comparisons (``Profile.table()``, ``Comparison.table()``).

Both print as plain text under ``print()`` and render as rich tables on a rich console
(:class:`torchslim._text.Printable`).

They live with the profile they render, so profiling depends on nothing above it; ``report``
imports them from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchslim._text import Printable, printable

if TYPE_CHECKING:
    from torchslim.profile.api import Profile
    from torchslim.profile.compare import CompareRow, Comparison

__all__ = ["LABELS", "change_words", "compare_table", "human", "profile_table"]


def human(n: float | int | None, unit: str = "") -> str:
    """``1234567 -> '1.23M'``; bytes with ``unit='B'`` use KiB/MiB/GiB."""
    if n is None:
        return "-"
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or u == "TiB":
                return f"{n:.0f} {u}" if u == "B" else f"{n:.2f} {u}"
            n /= 1024
    for u in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or u == "T":
            return f"{n:.0f}{unit}" if u == "" else f"{n:.2f}{u}{unit}"
        n /= 1000
    return str(n)


def profile_table(p: Profile, max_layers: int | None = 60) -> Printable:
    """A per-layer table with totals; long models show the costliest ``max_layers`` rows.

    Prints as plain text (``print``/``str``) and renders as rich tables on a rich console.
    """
    from rich.console import Group
    from rich.table import Table

    layers = list(p.layers)
    hidden = 0
    if max_layers is not None and len(layers) > max_layers:
        keep = set(sorted(range(len(layers)), key=lambda i: -layers[i].macs)[:max_layers])
        hidden = len(layers) - len(keep)
        layers = [layer for i, layer in enumerate(layers) if i in keep]
    t = Table(title="Layers", show_lines=False, header_style="bold")
    for col in ("layer", "type", "output", "params", "MACs", "% MACs"):
        t.add_column(col, justify="left" if col in ("layer", "type", "output") else "right")
    total = max(p.macs, 1)
    for layer in layers:
        out = "x".join(str(s) for s in layer.output_shape) if layer.output_shape else ""
        t.add_row(layer.name, layer.type, out, human(layer.params), human(layer.macs), f"{100 * layer.macs / total:.1f}")
    if hidden:
        t.add_row(f"... {hidden} cheaper layers not shown", "", "", "", "", "")
    s = Table(title="Totals", header_style="bold")
    s.add_column("metric")
    s.add_column("value", justify="right")
    s.add_row("parameters", f"{p.params:,} ({human(p.params)})")
    s.add_row("non-zero parameters", f"{p.nonzero_params:,}")
    s.add_row("MACs", f"{p.macs:,} ({human(p.macs)})")
    s.add_row("FLOPs", f"{p.flops:,} ({human(p.flops)})")
    if set(p.macs_by_precision) - {"float"}:
        total = max(p.macs, 1)
        s.add_row("MACs by precision", ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(p.macs_by_precision.items())))
    s.add_row("state (fp32 dense)", human(p.dense_fp32_bytes, "B"))
    s.add_row("weights file", human(p.size_bytes, "B"))
    if p.packed_bytes is not None:
        s.add_row("packed (.tslim)", human(p.packed_bytes, "B"))
    s.add_row("peak activations", human(p.peak_activation_bytes, "B"))
    if p.latency_ms:
        lat = p.latency_ms
        spread = (f"p25 {lat.p25:.3f}, p75 {lat.p75:.3f}" if lat.p25 is not None and lat.p75 is not None
                  else f"p10 {lat.p10:.3f}, p90 {lat.p90:.3f}")
        cpu = f", {lat.cpu}" if lat.cpu else ""
        s.add_row(
            "latency",
            f"{lat.median:.3f} ms median ({spread}; "
            f"{lat.runs} runs, {lat.threads} threads, batch {lat.batch_size}, {lat.device}{cpu})",
        )
    s.add_row("inputs", ", ".join("x".join(map(str, sh)) for sh in p.input_shapes))
    if p.unsupported_ops:
        s.add_row("not counted (no rule)", ", ".join(f"{k} x{v}" for k, v in sorted(p.unsupported_ops.items())))
    return printable(Group(t, s))


#: What the tables call each metric of a profile (JSON keys stay as they are)
LABELS = {
    "params": "parameters",
    "nonzero_params": "parameters (nonzero)",
    "macs": "MACs",
    "flops": "FLOPs",
    "dense_fp32_bytes": "weights as dense fp32",
    "size_bytes": "size on disk",
    "packed_bytes": "packed .tslim file",
    "peak_activation_bytes": "peak activation memory",
    "latency_ms": "latency (ms, ± spread)",
}


def _fmt(metric: str, v: float | None, spread: float | None = None) -> str:
    if v is None:
        return "-"
    if metric.startswith("latency"):
        return f"{v:.3f}" if spread is None else f"{v:.3f} ± {spread:.2g}"
    return human(v, "B" if metric.endswith("bytes") else "")


def change_words(row: CompareRow) -> str:
    """The change of one comparison row in words: ``'3.78x smaller'``, ``'1.53x slower'``,
    ``'same'`` (equal, or a latency difference inside the measured spread), ``'-'`` if unknown.

    Example:
        >>> from torchslim.profile.compare import CompareRow
        >>> change_words(CompareRow("size_bytes", 4096, 1024, 0.25))
        '4.00x smaller'
        >>> change_words(CompareRow("latency_ms", 1.0, 1.1, 1.1, 0.08, 0.05))
        'same'
    """
    if row.ratio is None or row.ratio == 0:
        return "-"
    latency = row.metric.startswith("latency")
    if (latency and row.within_spread) or f"{row.ratio:.3f}" == "1.000":
        return "same"
    if latency:
        less, more = "faster", "slower"
    else:
        less, more = ("smaller", "larger") if row.metric.endswith("bytes") else ("fewer", "more")
    if 0.9 < row.ratio < 1.1:  # a small change reads better in percent than as 1.00x
        return f"{100 * abs(1 - row.ratio):.1f}% {less if row.ratio < 1 else more}"
    return f"{1 / row.ratio:.2f}x {less}" if row.ratio < 1 else f"{row.ratio:.2f}x {more}"


def compare_table(c: Comparison) -> Printable:
    """Before / after / ratio / change in words for every metric of a comparison, with human labels
    and binary units (KiB, MiB); a metric known on neither side (the packed size of an unpacked
    model, an unmeasured latency) is left out; a latency difference
    inside the measured spread reads ``same`` (prints as plain text, renders as rich)."""
    from rich.table import Table

    t = Table(title="Before vs after", header_style="bold")
    for col in ("", "before", "after", "after/before", "change"):
        t.add_column(col, justify="left" if col in ("", "change") else "right", no_wrap=col in ("", "change"))
    for row in c.rows:
        if row.before is None and row.after is None:  # not measured (--no-latency) or none (packed size)
            continue
        ratio = "-" if row.ratio is None else f"{row.ratio:.3f}"
        t.add_row(LABELS.get(row.metric, row.metric), _fmt(row.metric, row.before, row.spread_before),
                  _fmt(row.metric, row.after, row.spread_after), ratio, change_words(row))
    return printable(t)
