"""Markdown and self-contained HTML for a compress report (plots are embedded PNGs).

Both render the same content from ``report.json``: the stage table (accuracy, params, MACs,
bytes on disk, latency, each with its ratio to the original), the deployed artifacts against the
original exported the same way, the goals (met / missed), and per-layer width / sparsity / bits.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

__all__ = ["render_markdown", "render_html", "stage_rows", "plots"]


def _fmt_num(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}" if x == int(x) else f"{x:.3g}"


def _fmt_bytes(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B"


def _fmt_ratio(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}x"


def stage_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-stage table (shared by Markdown and HTML)."""
    head = ["stage", "accuracy", "params", "(ratio)", "MACs", "(ratio)", "bytes on disk", "(ratio)",
            "latency ms", "(ratio)", "time s"]
    rows = []
    for s in report["stages"]:
        r = s["ratios"]
        acc = "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
        lat = "-" if s["latency_ms"] is None else f"{s['latency_ms']:.3f}"
        rows.append([s["label"], acc, _fmt_num(s["params"]), _fmt_ratio(r["params"]), _fmt_num(s["macs"]),
                     _fmt_ratio(r["macs"]), _fmt_bytes(s["size_bytes"]), _fmt_ratio(r["size_bytes"]), lat,
                     _fmt_ratio(r["latency_ms"]), f"{s.get('seconds', 0.0):.1f}"])
    return head, rows


def _deployed_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["artifact", "measure", "original", "compressed", "ratio / speed-up"]
    rows: list[list[str]] = []
    names = {"onnx": "ONNX", "pte": "ExecuTorch .pte", "torch": "PyTorch (ts.save)", "torchscript": "TorchScript",
             "pt2": "torch.export .pt2"}
    for target, fig in report.get("deployed", {}).items():
        if target == "tslim" or not fig.get("size_bytes"):
            continue
        name, runtime = names.get(target, target), fig.get("runtime", "ONNX Runtime")
        rows.append([name, "bytes on disk", _fmt_bytes(fig["original_size_bytes"]), _fmt_bytes(fig["size_bytes"]),
                     f"{fig['original_size_bytes'] / fig['size_bytes']:.2f}x smaller"])
        if fig.get("accuracy") is not None:
            rows.append([name, f"accuracy in {runtime}", f"{100 * fig['original_accuracy']:.2f}%",
                         f"{100 * fig['accuracy']:.2f}%",
                         f"{100 * (fig['accuracy'] - fig['original_accuracy']):+.2f} points"])
        for b, lat in fig.get("latency_ms", {}).items():
            rows.append([name, f"{runtime} latency, batch {b} (ms, 1 thread)", f"{lat['original']:.3f}",
                         f"{lat['compressed']:.3f}", _speed(lat["speedup"])])
    tslim = report.get("deployed", {}).get("tslim")
    if tslim:
        base = report["before"]["size_bytes"]
        rows.append([".tslim (packed)", "bytes on disk", _fmt_bytes(base), _fmt_bytes(tslim["size_bytes"]),
                     f"{base / tslim['size_bytes']:.2f}x smaller"])
    return head, rows


def _goal_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["goal", "target", "value", "basis", "met"]
    rows = []
    for g in report.get("goals", []):
        value = "-" if g["value"] is None else f"{g['value']:.4f}"
        rows.append([g["name"], f"{g['target']}", value, g["basis"], "met" if g["met"] else "MISSED"])
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _title(report: dict[str, Any]) -> str:
    return f"torchslim compress: {report['model']} with recipe '{report['recipe']}'"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (tables only; the HTML carries the plots)."""
    parts = [f"# {_title(report)}", "", f"data: `{report['data']}`", "", "## Stages", "", _md_table(*stage_rows(report))]
    head, rows = _deployed_rows(report)
    if rows:
        parts += ["", "## Deployed files (original exported the same way, timed side by side)", "", _md_table(head, rows)]
    head, rows = _goal_rows(report)
    if rows:
        parts += ["", "## Goals", "", _md_table(head, rows)]
    parts += ["", "## Layers (original -> final)", "", _md_table(*_layer_rows(report))]
    parts += ["", "## Files", ""] + [f"- {k}: `{v}`" for k, v in sorted(report["files"].items())]
    return "\n".join(parts) + "\n"


def _layer_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    final = {r["name"]: r for r in report["layers"]["final"]}
    head = ["layer", "type", "width", "sparsity", "weight bits"]
    rows = []
    for r in report["layers"]["original"]:
        f = final.get(r["name"])
        if f is None:
            rows.append([r["name"], r["type"], f"{r['out']} -> (replaced)", "-", "-"])
            continue
        rows.append([r["name"], f["type"], f"{r['out']} -> {f['out']}", f"{100 * f['sparsity']:.1f}%",
                     f"{r['bits']} -> {f['bits']}"])
    for name, f in final.items():
        if name not in {r["name"] for r in report["layers"]["original"]}:
            rows.append([name, f["type"], f"(new) {f['out']}", f"{100 * f['sparsity']:.1f}%", f"{f['bits']}"])
    return head, rows


# --------------------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(report: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs: stage ratios, accuracy vs size, per-layer width / sparsity / bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    labels = [s["label"] for s in stages]
    out: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(stages)), 3.2))
    keys = [("params", "params"), ("macs", "MACs"), ("size_bytes", "bytes on disk"), ("latency_ms", "latency")]
    width = 0.8 / len(keys)
    for j, (key, name) in enumerate(keys):
        vals = [s["ratios"].get(key) or 0.0 for s in stages]
        ax.bar([i + j * width for i in range(len(stages))], vals, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(stages))], labels, rotation=20, ha="right")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("ratio to the original")
    ax.legend(fontsize=8, ncol=4)
    ax.set_title("cost after each stage")
    out["stages"] = _png(fig)

    accs = [s["accuracy"] for s in stages]
    if any(a is not None for a in accs):
        fig, ax = plt.subplots(figsize=(5, 3.4))
        xs = [s["ratios"].get("size_bytes") or 0.0 for s in stages]
        ys = [100 * (a or 0.0) for a in accs]
        ax.plot(xs, ys, "o-")
        for x, y, lab in zip(xs, ys, labels):
            ax.annotate(lab, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("bytes on disk (ratio to the original)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("accuracy vs size")
        out["accuracy_vs_size"] = _png(fig)

    orig, final = report["layers"]["original"], {r["name"]: r for r in report["layers"]["final"]}
    if orig:
        names = [r["name"] for r in orig]
        fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.35 * len(names)), 7), sharex=True)
        x = list(range(len(names)))
        axes[0].bar(x, [r["out"] for r in orig], color="lightgrey", label="original")
        axes[0].bar(x, [final[n]["out"] if n in final else 0 for n in names], width=0.5, label="final")
        axes[0].set_ylabel("width")
        axes[0].legend(fontsize=8)
        axes[1].bar(x, [100 * final[n]["sparsity"] if n in final else 0 for n in names])
        axes[1].set_ylabel("sparsity %")
        axes[2].bar(x, [final[n]["bits"] if n in final else 0 for n in names])
        axes[2].set_ylabel("weight bits")
        axes[2].set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        axes[0].set_title("per layer (final model)")
        out["layers"] = _png(fig)
    return out


# --------------------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.met{color:#080}.missed{color:#b00;font-weight:bold}
img{max-width:100%;display:block;margin:1em 0}code{background:#f6f6f6;padding:1px 4px}"""


def _html_table(head: list[str], rows: list[list[str]], table_id: str) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = []
    for r in rows:
        cells = []
        for c in r:
            cls = ' class="met"' if c == "met" else (' class="missed"' if c == "MISSED" else "")
            cells.append(f"<td{cls}>{html.escape(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page: tables plus the plots as embedded PNGs (no external files)."""
    imgs = plots(report)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(_title(report))}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(_title(report))}</h1>",
             f"<p>data: <code>{html.escape(str(report['data']))}</code></p>",
             "<h2>Stages</h2>", _html_table(*stage_rows(report), "stages")]
    if "stages" in imgs:
        parts.append(f'<img alt="cost after each stage" src="data:image/png;base64,{imgs["stages"]}">')
    head, rows = _deployed_rows(report)
    if rows:
        parts += ["<h2>Deployed files</h2><p>The original model exported the same way; ONNX Runtime latencies "
                  "measured side by side in one run.</p>", _html_table(head, rows, "deployed")]
    head, rows = _goal_rows(report)
    if rows:
        parts += ["<h2>Goals</h2>", _html_table(head, rows, "goals")]
    if "accuracy_vs_size" in imgs:
        parts.append(f'<img alt="accuracy vs size" src="data:image/png;base64,{imgs["accuracy_vs_size"]}">')
    parts += ["<h2>Layers</h2>", _html_table(*_layer_rows(report), "layers")]
    if "layers" in imgs:
        parts.append(f'<img alt="per-layer width, sparsity and bits" src="data:image/png;base64,{imgs["layers"]}">')
    parts.append("<h2>Files</h2><ul>" + "".join(
        f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in sorted(report["files"].items())
    ) + "</ul></body></html>")
    return "\n".join(parts)


def _speed(ratio: float | None) -> str:
    """``original / compressed`` latency as words: "2.10x faster" or "1.60x slower"."""
    if not ratio:
        return "-"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
