"""The compress report: ``report.json`` from the run's state, then Markdown and HTML beside it.

The JSON is the common shape of DESIGN section 5 for the whole run (``before`` = the original,
``after`` = the final model) plus ``stages`` (the same figures after every stage, with ratios to
the original), ``goals`` (each with ``met``; ``not_slower`` per deploy runtime, from the guard),
``latency_runtime`` (where each latency was measured), ``guard`` (the guard's checks) and
``deployed`` (the exported / packed artifacts against the original exported the same way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchslim.recipe.schema import Recipe

__all__ = ["build_report", "write_reports"]

_FIGURES = ("accuracy", "perplexity", "params", "nonzero_params", "macs", "size_bytes", "latency_ms")


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def _row(rec: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    row = {k: rec.get(k) for k in _FIGURES if k != "perplexity" or rec.get(k) is not None}
    row["ratios"] = {k: _ratio(rec.get(k), base.get(k)) for k in _FIGURES if k != "accuracy" and k in row}
    return row


def _deployed(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """The last figures of every deploy target the recipe exported (``onnx``, ``pte``, ``torch``...,
    each measured in its runtime) and the last packed file, if the recipe made them."""
    out: dict[str, Any] = {}
    for rec in stages:
        for target, figures in ((rec.get("extras") or {}).get("formats") or {}).items():
            if figures:
                out[target] = figures
        if rec["kind"] == "pack":
            out["tslim"] = {"size_bytes": rec["extras"].get("packed_bytes")}
    return out


def _goals(recipe: Recipe, before: dict[str, Any], after: dict[str, Any], deployed: dict[str, Any]) -> list[dict[str, Any]]:
    g = recipe.goals
    onnx = deployed.get("onnx") or {}
    goals = []
    if g.max_accuracy_drop is not None:
        if onnx.get("accuracy") is not None:  # judged on the deployed file when there is one
            drop, basis = onnx["original_accuracy"] - onnx["accuracy"], "onnx runtime"
        elif before.get("accuracy") is not None:
            drop, basis = before["accuracy"] - after["accuracy"], "torch"
        else:
            drop, basis = None, "no labeled data"
        goals.append({"name": "max_accuracy_drop", "target": g.max_accuracy_drop, "value": drop, "basis": basis,
                      "met": drop is not None and drop <= g.max_accuracy_drop + 1e-12})
    if g.max_perplexity_increase is not None:
        shipped = next((f for f in (deployed.get("onnx") or {}, deployed.get("torch") or {}) if f.get("perplexity")), None)
        if shipped is not None:  # judged on the shipped file (ONNX decoder first)
            new, old = shipped["perplexity"]["perplexity"], shipped["original_perplexity"]["perplexity"]
            basis = "onnx runtime" if shipped is deployed.get("onnx") else "torch"
        else:
            new, old, basis = after.get("perplexity"), before.get("perplexity"), "torch"
        v = None if new is None or old is None else new / old - 1.0
        goals.append({"name": "max_perplexity_increase", "target": g.max_perplexity_increase, "value": v,
                      "basis": basis if v is not None else "no text data", "met": v is not None and v <= g.max_perplexity_increase + 1e-12})
    if g.target_macs is not None:
        v = _ratio(after["macs"], before["macs"])
        goals.append({"name": "target_macs", "target": g.target_macs, "value": v, "basis": "profile",
                      "met": v is not None and v <= g.target_macs})
    if g.target_size is not None:
        v, basis = _size_ratio(before, after, deployed)
        goals.append({"name": "target_size", "target": g.target_size, "value": v, "basis": basis,
                      "met": v is not None and v <= g.target_size})
    if g.target_latency is not None:
        if onnx.get("latency_ms"):
            v = max(r["compressed"] / r["original"] for r in onnx["latency_ms"].values())  # the worst batch size
            basis = "onnx runtime, worst of batch sizes " + ", ".join(onnx["latency_ms"])
        else:
            v, basis = _ratio(after.get("latency_ms"), before.get("latency_ms")), "torch"
        goals.append({"name": "target_latency", "target": g.target_latency, "value": v, "basis": basis,
                      "met": v is not None and v <= g.target_latency})
    return goals


def _size_ratio(before: dict[str, Any], after: dict[str, Any], deployed: dict[str, Any]) -> tuple[float | None, str]:
    if "tslim" in deployed and deployed["tslim"]["size_bytes"]:
        return _ratio(deployed["tslim"]["size_bytes"], before["size_bytes"]), ".tslim vs original safetensors"
    if "onnx" in deployed:
        return deployed["onnx"]["size_ratio"], "onnx vs original onnx"
    return _ratio(after["size_bytes"], before["size_bytes"]), "safetensors"


def build_report(state: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The report dict (``report.json``) from a finished run's state."""
    orig = state["original"]
    stages = state["stages"]
    last = stages[-1] if stages else orig
    deployed = _deployed(stages)
    before = dict(orig["profile"], size_bytes=orig["size_bytes"])
    after = dict(last["profile"], size_bytes=last["size_bytes"])
    files: dict[str, str] = {}
    for rec in stages:
        files.update(rec.get("files") or {})
    from torchslim.recipe._guard import goals_from

    goals = _goals(recipe, {**orig}, {**last}, deployed) + goals_from(state.get("guard"))
    size_ratio, size_basis = _size_ratio(orig, last, deployed)
    return {
        "verb": "compress",
        "model": state["model"],
        "data": state["data"],
        "recipe": recipe.name,
        "before": before,
        "after": after,
        "accuracy_before": orig["accuracy"],
        "accuracy_after": last["accuracy"],
        **({"perplexity_before": orig.get("perplexity"), "perplexity_after": last.get("perplexity")}
           if orig.get("perplexity") is not None else {}),
        "summary": {"size_ratio": size_ratio, "size_basis": size_basis,
                    "macs_ratio": _ratio(last["macs"], orig["macs"]),
                    "params_ratio": _ratio(last["params"], orig["params"])},
        "stages": [{"index": 0, "label": "00-original", "kind": "original", **_row(orig, orig), "seconds": 0.0}]
        + [{"index": r["index"], "label": r["label"], "kind": r["kind"], **_row(r, orig), "seconds": r["seconds"],
            "extras": r.get("extras", {})} for r in stages],
        "goals": goals,
        "latency_runtime": {"stages": "eager PyTorch, 1 thread",
                            **{t: f.get("runtime") for t, f in deployed.items() if f.get("runtime")}},
        "guard": state.get("guard") or {"checks": []},
        "deployed": deployed,
        "layers": {"original": orig["layers"], "final": last["layers"]},
        "files": files,
    }


def write_reports(report: dict[str, Any], out: Path) -> dict[str, str]:
    """Write ``report.md`` and ``report.html`` (plots embedded) into ``out``; return name -> path."""
    from torchslim._utils import atomic_path
    from torchslim.report.html import render_html, render_markdown

    files = {"report_json": str(out / "report.json"), "report_md": str(out / "report.md"),
             "report_html": str(out / "report.html"), "model": str(out / "model"),
             "recipe": str(out / "resolved_recipe.yaml")}
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(render_markdown(report))
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(render_html(report))
    return files
