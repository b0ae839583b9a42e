"""Markdown and self-contained HTML for a compress report (plots are embedded PNGs).

Both render the same content from ``report.json``, the result that ships first: one sentence per
deployed file (its bytes, speed and accuracy or perplexity against the original shipped the same
way) and the goals in the same units (the guard's "not slower than the original in RUNTIME" among
them); then the deployed files in detail, the stage table
(accuracy, params, MACs, size on disk, eager latency, each with its ratio to the original) and
per-layer width / sparsity / bits.
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

__all__ = ["decode_change", "goal_cells", "guard_note", "headline", "perplexity_change", "render_markdown", "render_html",
           "stage_rows", "plots"]


def _fmt_num(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}" if x == int(x) else f"{x:.3g}"


def _fmt_bytes(x: Any) -> str:
    """Bytes in binary units (KiB, MiB, GiB), as the command-line tables print them."""
    if x is None:
        return "-"
    x = float(x)
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B"


def _fmt_ratio(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}x"


def _type(name: str) -> str:
    """A layer's class name as a person knows it (``ParametrizedLinear`` is a Linear with a mask)."""
    return name[len("Parametrized"):] if name.startswith("Parametrized") and len(name) > len("Parametrized") else name


def stage_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-stage table (shared by Markdown and HTML)."""
    ppl = any(s.get("perplexity") is not None for s in report["stages"])
    acc_col = any(s.get("accuracy") is not None for s in report["stages"]) or not ppl
    head = ["stage", *(["accuracy"] if acc_col else []), *(["perplexity"] if ppl else []), "params", "(ratio)", "MACs", "(ratio)",
            "size on disk", "(ratio)", "eager latency ms", "(ratio)", "time s"]
    rows = []
    for s in report["stages"]:
        r = s["ratios"]
        acc = "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
        lat = "-" if s["latency_ms"] is None else f"{s['latency_ms']:.3f}"
        extra = [("-" if s.get("perplexity") is None else f"{s['perplexity']:.2f}")] if ppl else []
        rows.append([s["label"], *([acc] if acc_col else []), *extra, _fmt_num(s["params"]), _fmt_ratio(r["params"]), _fmt_num(s["macs"]),
                     _fmt_ratio(r["macs"]), _fmt_bytes(s["size_bytes"]), _fmt_ratio(r["size_bytes"]), lat,
                     _fmt_ratio(r["latency_ms"]), f"{s.get('seconds', 0.0):.1f}"])
    return head, rows


_NAMES = {"onnx": "ONNX", "pte": "ExecuTorch .pte", "torch": "PyTorch (ts.save)", "torchscript": "TorchScript",
          "pt2": "torch.export .pt2", "gguf": "GGUF"}


def _shipped(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(t, f) for t, f in report.get("deployed", {}).items() if t != "tslim" and f.get("size_bytes")]


def perplexity_change(fig: dict[str, Any]) -> str | None:
    """``"perplexity 63.27 -> 72.64 (+14.8%, 1023 held-out tokens)"`` of a deployed decoder (None if unscored)."""
    if not (fig.get("perplexity") and fig.get("original_perplexity")):
        return None
    new, old = fig["perplexity"]["perplexity"], fig["original_perplexity"]["perplexity"]
    return f"perplexity {old:.2f} -> {new:.2f} ({100 * (new / old - 1):+.1f}%, {fig['perplexity']['tokens']} held-out tokens)"


def decode_change(fig: dict[str, Any]) -> str | None:
    """``"decode 15.0 -> 52.7 tokens/s (3.52x)"`` of a deployed decoder (None if untimed)."""
    if not (fig.get("speed") and fig.get("original_speed")):
        return None
    new, old = fig["speed"]["decode_tokens_per_s"], fig["original_speed"]["decode_tokens_per_s"]
    return f"decode {old:.1f} -> {new:.1f} tokens/s ({new / old:.2f}x)"


def headline(report: dict[str, Any]) -> list[str]:
    """One sentence per shipped file: its bytes, speed and accuracy (or perplexity) against the
    original shipped the same way; without deployed files, the final model against the original."""
    lines = []
    for target, fig in _shipped(report):
        name, runtime = _NAMES.get(target, target), fig.get("runtime", "")
        parts = [f"{fig['original_size_bytes'] / fig['size_bytes']:.2f}x smaller "
                 f"({_fmt_bytes(fig['original_size_bytes'])} -> {_fmt_bytes(fig['size_bytes'])})"]
        for b, lat in (fig.get("latency_ms") or {}).items():
            parts.append(f"{_speed(lat['speedup'])} at batch {b}")
        if fig.get("accuracy") is not None and fig.get("original_accuracy") is not None:
            parts.append(f"accuracy {100 * fig['original_accuracy']:.2f}% -> {100 * fig['accuracy']:.2f}% "
                         f"({100 * (fig['accuracy'] - fig['original_accuracy']):+.2f} points)")
        parts += [t for t in (perplexity_change(fig), decode_change(fig)) if t]
        lines.append(f"{name} in {runtime}: " + ", ".join(parts) if runtime else f"{name}: " + ", ".join(parts))
    if not lines and report.get("stages"):
        last = report["stages"][-1]
        r = last["ratios"].get("size_bytes")
        text = f"final model (ts.save): {1 / r:.2f}x smaller on disk" if r else "final model (ts.save)"
        if report.get("accuracy_before") is not None and report.get("accuracy_after") is not None:
            a, b = report["accuracy_before"], report["accuracy_after"]
            text += f", accuracy {100 * a:.2f}% -> {100 * b:.2f}% ({100 * (b - a):+.2f} points)"
        lines.append(text)
    return lines


def _deployed_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["artifact", "measure", "original", "compressed", "ratio / speed-up"]
    rows: list[list[str]] = []
    for target, fig in _shipped(report):
        name, runtime = _NAMES.get(target, target), fig.get("runtime", "ONNX Runtime")
        rows.append([name, "bytes on disk", _fmt_bytes(fig["original_size_bytes"]), _fmt_bytes(fig["size_bytes"]),
                     f"{fig['original_size_bytes'] / fig['size_bytes']:.2f}x smaller"])
        if fig.get("accuracy") is not None:
            rows.append([name, f"accuracy in {runtime}", f"{100 * fig['original_accuracy']:.2f}%",
                         f"{100 * fig['accuracy']:.2f}%",
                         f"{100 * (fig['accuracy'] - fig['original_accuracy']):+.2f} points"])
        if fig.get("perplexity") and fig.get("original_perplexity"):
            new, old = fig["perplexity"]["perplexity"], fig["original_perplexity"]["perplexity"]
            rows.append([name, f"perplexity in {runtime} ({fig['perplexity']['tokens']} held-out tokens)",
                         f"{old:.2f}", f"{new:.2f}", f"{100 * (new / old - 1):+.1f}%"])
        if fig.get("speed") and fig.get("original_speed"):
            sp, so = fig["speed"], fig["original_speed"]
            rows.append([name, f"decode tokens/s in {runtime} (batch 1, {sp['threads']} thread)",
                         f"{so['decode_tokens_per_s']:.1f}", f"{sp['decode_tokens_per_s']:.1f}",
                         f"{sp['decode_tokens_per_s'] / so['decode_tokens_per_s']:.2f}x"])
            rows.append([name, f"prefill of {sp['prompt_tokens']} tokens (ms)", f"{so['prefill_ms']:.1f}",
                         f"{sp['prefill_ms']:.1f}", _speed(so["prefill_ms"] / sp["prefill_ms"])])
        for b, lat in fig.get("latency_ms", {}).items():
            rows.append([name, f"{runtime} latency, batch {b} (ms, 1 thread)", f"{lat['original']:.3f}",
                         f"{lat['compressed']:.3f}", _speed(lat["speedup"])])
    tslim = report.get("deployed", {}).get("tslim")
    if tslim:
        base = report["before"]["size_bytes"]
        rows.append([".tslim (packed)", "bytes on disk", _fmt_bytes(base), _fmt_bytes(tslim["size_bytes"]),
                     f"{base / tslim['size_bytes']:.2f}x smaller"])
    return head, rows


_GOAL_WORDS = {"max_accuracy_drop": "accuracy drop", "target_size": "size", "target_macs": "MACs",
               "target_latency": "latency", "max_perplexity_increase": "perplexity increase",
               "not_slower": "not slower than the original"}
_RUNTIME_WORDS = {"onnxruntime": "ONNX Runtime", "xnnpack": "ExecuTorch (XNNPACK)", "eager": "eager PyTorch",
                  "compile": "torch.compile", "torchscript": "TorchScript", "pt2": "torch.export"}


def goal_cells(g: dict[str, Any]) -> list[str]:
    """A goal as table cells: goal, target, reached, measured on, met (the CLI prints the same).

    The guard's ``not_slower`` goal names its runtime, and when missed the stage that made the
    result slower; one allowed by ``allow_slower`` reads "slower, allowed"."""
    word = _GOAL_WORDS.get(g["name"], g["name"])
    basis = g["basis"]
    if g["name"] == "not_slower":
        word += f" in {_RUNTIME_WORDS.get(g.get('runtime', ''), g.get('runtime', ''))}"
        if not g["met"]:
            basis += f"; made slower by stage {g['stage']}" if g.get("stage") else f"; {g.get('stage_note', 'stage not named')}"
    met = "met" if g["met"] else "MISSED"
    if g.get("allowed"):
        met = "slower, allowed"
    return [word, _goal_text(g["name"], g["target"], True), _goal_text(g["name"], g["value"], False), basis, met]


def _goal_text(name: str, x: float | None, target: bool) -> str:
    """A goal's target or value in the units of the tables above (points, fractions with x, %)."""
    if x is None:
        return "-"
    if name == "max_accuracy_drop":
        return f"at most {100 * x:.2f} points" if target else f"{100 * x:.2f} points"
    if name == "max_perplexity_increase":
        return f"at most {100 * x:+.1f}%" if target else f"{100 * x:+.1f}%"
    if name == "not_slower":  # latency over the original's, in the deploy runtime
        return f"latency at most {x:.2f}x the original's" if target else f"{x:.3f}x the original's ({_speed(1 / x)})"
    what = {"target_size": "smaller", "target_macs": "fewer MACs", "target_latency": "faster"}.get(name, "")
    if target:
        return f"at most {x:.2f} of the original ({1 / x:.2f}x {what})" if x > 0 else f"{x}"
    return f"{x:.3f} of the original ({1 / x:.2f}x {what})" if x > 0 else f"{x:.3f}"


def guard_note(report: dict[str, Any]) -> str | None:
    """Why the latency guard judged nothing (None when it did)."""
    why = (report.get("guard") or {}).get("skipped")
    return f"not-slower check skipped: {why}" if why else None


def _goal_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["goal", "target", "reached", "measured on", "met"]
    rows = []
    for g in report.get("goals", []):
        rows.append(goal_cells(g))
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _title(report: dict[str, Any]) -> str:
    return f"torchslim compress: {report['model']} with recipe '{report['recipe']}'"


_EAGER_NOTE = ("Stage latencies are eager PyTorch, 1 thread; a quantized stage's eager figure is int8 simulated "
               "in float (real integer kernels run after ts.quantize.compile and in the deployed files).")


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (tables only; the HTML carries the plots), the shipped result first."""
    parts = [f"# {_title(report)}", "", f"data: `{report['data']}`", "", "## Result", ""]
    parts += [f"- {line}" for line in headline(report)]
    head, rows = _goal_rows(report)
    if rows:
        parts += ["", "## Goals", "", _md_table(head, rows)]
    if guard_note(report):
        parts += ["", str(guard_note(report))]
    head, rows = _deployed_rows(report)
    if rows:
        parts += ["", "## Deployed files (original exported the same way, timed side by side)", "", _md_table(head, rows)]
    parts += ["", "## Stages", "", _md_table(*stage_rows(report)), "", _EAGER_NOTE]
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
            rows.append([r["name"], _type(r["type"]), f"{r['out']} -> (replaced)", "-", "-"])
            continue
        rows.append([r["name"], _type(f["type"]), f"{r['out']} -> {f['out']}", f"{100 * f['sparsity']:.1f}%",
                     f"{r['bits']} -> {f['bits']}"])
    for name, f in final.items():
        if name not in {r["name"] for r in report["layers"]["original"]}:
            rows.append([name, _type(f["type"]), f"(new) {f['out']}", f"{100 * f['sparsity']:.1f}%", f"{f['bits']}"])
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

    # eager latency is left out: after quantization it is simulated int8 (see _EAGER_NOTE)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(stages)), 3.2))
    keys = [("params", "params"), ("macs", "MACs"), ("size_bytes", "size on disk")]
    width = 0.8 / len(keys)
    for j, (key, name) in enumerate(keys):
        vals = [s["ratios"].get(key) or 0.0 for s in stages]
        ax.bar([i + j * width for i in range(len(stages))], vals, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(stages))], labels, rotation=20, ha="right")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylim(0, max(1.05, *(s["ratios"].get(k) or 0.0 for s in stages for k, _ in keys)) * 1.05)
    ax.set_ylabel("ratio to the original")
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    ax.set_title("size and compute after each stage")
    out["stages"] = _png(fig)

    accs = [s["accuracy"] for s in stages]
    if any(a is not None for a in accs):
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        pts = [((s["ratios"].get("size_bytes") or 0.0), 100 * a) for s, a in zip(stages, accs) if a is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="lightgrey", zorder=1)
        named = [(lab, s) for lab, s, a in zip(labels, stages, accs) if a is not None]
        for (x, y), (lab, _) in zip(pts, named):  # one legend entry per stage: labels never overlap the points
            ax.scatter([x], [y], s=36, zorder=2, label=lab)
        ys = [p[1] for p in pts]
        pad = max(1.0, (max(ys) - min(ys)) * 0.15)
        ax.set_ylim(min(ys) - pad, min(100.0, max(ys) + pad))
        ax.set_xlim(0, max(1.05, *(p[0] for p in pts)) * 1.05)
        ax.set_xlabel("size on disk (ratio to the original)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        ax.set_title("accuracy vs size")
        out["accuracy_vs_size"] = _png(fig)

    orig, final = report["layers"]["original"], {r["name"]: r for r in report["layers"]["final"]}
    if orig:
        names = [r["name"] for r in orig]
        x = list(range(len(names)))
        width = [final[n]["out"] if n in final else 0 for n in names]
        sparsity = [100 * final[n]["sparsity"] if n in final else 0.0 for n in names]
        bits = [final[n]["bits"] if n in final else 0 for n in names]
        panels = ["width"]  # only what changed: incidental zeros (< 1%) are no sparsity to plot
        if max(sparsity, default=0.0) >= 1.0:
            panels.append("sparsity")
        if any(b != r["bits"] for b, r in zip(bits, orig)):
            panels.append("bits")
        fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.35 * len(names)), 2.4 * len(panels) + 0.6),
                                 sharex=True, squeeze=False)
        for ax, panel in zip(axes[:, 0], panels):
            if panel == "width":
                ax.bar(x, [r["out"] for r in orig], color="lightgrey", label="original")
                ax.bar(x, width, width=0.5, label="final")
                ax.set_ylabel("output width")
                ax.legend(fontsize=8, loc="upper right")
            elif panel == "sparsity":
                ax.bar(x, sparsity)
                ax.set_ylim(0, 100)
                ax.set_ylabel("zero weights %")
            else:
                ax.bar(x, bits)
                ax.set_ylim(0, 33)
                ax.set_yticks([1, 4, 8, 16, 32])
                ax.set_ylabel("weight bits")
        axes[-1, 0].set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        axes[0, 0].set_title("per layer (final model)")
        out["layers"] = _png(fig)
    return out


# --------------------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,td.text{text-align:left}.met{color:#080}.missed{color:#b00;font-weight:bold}
img{max-width:100%;display:block;margin:1em 0}code{background:#f6f6f6;padding:1px 4px}"""


_NUMERIC = re.compile(r"^[-+]?[\d.]")


def _html_table(head: list[str], rows: list[list[str]], table_id: str) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = []
    for r in rows:
        cells = []
        for c in r:
            cls = ' class="met"' if c == "met" else (' class="missed"' if c == "MISSED" else "")
            if not cls and not _NUMERIC.match(c):
                cls = ' class="text"'  # words read from the left; figures line up on the right
            cells.append(f"<td{cls}>{html.escape(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page: the shipped result and the goals first, then the tables and the
    plots (embedded PNGs, no external files)."""
    imgs = plots(report)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(_title(report))}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(_title(report))}</h1>",
             f"<p>data: <code>{html.escape(str(report['data']))}</code></p>",
             '<section id="headline"><h2>Result</h2><ul>'
             + "".join(f"<li>{html.escape(line)}</li>" for line in headline(report)) + "</ul>"]
    head, rows = _goal_rows(report)
    if rows:
        parts += [_html_table(head, rows, "goals")]
    if guard_note(report):
        parts.append(f"<p>{html.escape(str(guard_note(report)))}</p>")
    parts.append("</section>")
    head, rows = _deployed_rows(report)
    if rows:
        parts += ["<h2>Deployed files</h2><p>The original model shipped the same way; each file measured in its own "
                  "runtime, side by side with the original's in one run.</p>", _html_table(head, rows, "deployed")]
    if "accuracy_vs_size" in imgs:
        parts.append(f'<img alt="accuracy vs size" src="data:image/png;base64,{imgs["accuracy_vs_size"]}">')
    parts += ["<h2>Stages</h2>", _html_table(*stage_rows(report), "stages"), f"<p>{html.escape(_EAGER_NOTE)}</p>"]
    if "stages" in imgs:
        parts.append(f'<img alt="size and compute after each stage" src="data:image/png;base64,{imgs["stages"]}">')
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
