"""The ``export`` stage: files for real runtimes, checked in them, timed against the original.

ONNX is written for the compressed model and, the same way, for the original model
(``onnx_original``), so the report's ONNX Runtime latencies are measured side by side in one
run: the two sessions alternate call by call and each gets the median of its runs.
A quantized model goes to ONNX as integers (``torchslim.export.export_integer_onnx``); anything else
through the same float exporter the original uses. The compressed ONNX file is also scored on the
test split in ONNX Runtime, so the report's accuracy is the deployed file's, not only torch's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.export.onnx_int import quiet_quantizer as _silenced

__all__ = ["export_stage", "ort_accuracy"]


def _first_tensor(inputs: tuple[Any, ...]) -> torch.Tensor:
    return inputs[0]


def ort_accuracy(path: str | Path, loader: Any) -> float:
    """Top-1 accuracy of an ONNX classifier in ONNX Runtime over a labeled loader."""
    from torchslim.export.ort import ort_feed, ort_session

    sess = ort_session(path)
    correct = total = 0
    for x, y in loader:
        out = torch.from_numpy(sess.run(None, ort_feed(sess, x))[0])
        correct += int((out.argmax(1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


def _paired_latency(a: str, b: str, x: torch.Tensor, runs: int, rounds: int = 3) -> tuple[float, float]:
    """Median ONNX Runtime latencies (ms) of files ``a`` and ``b``, one thread, timed interleaved
    (``profile.latency.measure_pair``: A, B, A, B, ... ``runs * rounds`` times each)."""
    from torchslim.export.ort import ort_runner
    from torchslim.profile.latency import measure_pair

    ta, tb = measure_pair(ort_runner(a, x, threads=1), ort_runner(b, x, threads=1), runs=runs * rounds, warmup=3, threads=1,
                          runtimes=("original", "compressed"))
    return ta.median_ms, tb.median_ms


def export_stage(model: nn.Module, cfg: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from torchslim._modelinfo import example_inputs
    from torchslim.export import export
    from torchslim.export.onnx import export_fp32
    from torchslim.export.onnx_int import export_integer_onnx, integer_scheme
    from torchslim.export.ort import ort_run

    model = model.cpu().eval()
    example = example_inputs(model)
    args = _inputs_of(model)
    out: dict[str, Any] = {"formats": {}}
    for fmt in cfg["formats"]:
        if fmt == "onnx":
            path = ctx.dir / "model.onnx"
            scheme = integer_scheme(model)
            if scheme is not None:
                with _silenced():
                    files = export_integer_onnx(model, args, path, calibration=ctx.calibration(), scheme=scheme)
                ctx.files["onnx"] = files["onnx"]
                ctx.files["onnx_fp32"] = files["onnx_fp32"]
            else:
                with _silenced():
                    export_fp32(model, args, path)
                ctx.files["onnx"] = str(path)
            original = ctx.dir / "original.onnx"
            with _silenced():
                export_fp32(ctx.teacher().cpu().eval(), tuple(_inputs_of(ctx.teacher())), original)
            ctx.files["onnx_original"] = str(original)
            out["formats"]["onnx"] = _onnx_figures(model, ctx, cfg, ort_run)
        else:
            result = export(model, example, ctx.dir / f"model.{_suffix(fmt)}", format=fmt, check=cfg["check"])
            ctx.files[fmt] = str(result.path)
            out["formats"][fmt] = {"size_bytes": result.size_bytes,
                                   "parity": None if result.parity is None else result.parity.to_dict()}
    return out


def _inputs_of(model: nn.Module) -> tuple[Any, ...]:
    from torchslim._modelinfo import example_inputs
    from torchslim.errors import ConfigError

    ex = example_inputs(model)
    if isinstance(ex, dict):
        raise ConfigError("the export stage needs a model with positional inputs; use `torchslim export` for keyword inputs")
    return tuple(ex)


def _suffix(fmt: str) -> str:
    return {"torchscript": "ts", "pt2": "pt2"}.get(fmt, fmt)


@torch.no_grad()
def _onnx_figures(model: nn.Module, ctx: Any, cfg: dict[str, Any], ort_run: Any) -> dict[str, Any]:
    onnx, original = ctx.files["onnx"], ctx.files["onnx_original"]
    x1 = _first_tensor(_inputs_of(model)).cpu()
    fig: dict[str, Any] = {
        "size_bytes": Path(onnx).stat().st_size,
        "original_size_bytes": Path(original).stat().st_size,
        "latency_ms": {},
    }
    fig["size_ratio"] = fig["size_bytes"] / fig["original_size_bytes"]
    if ctx.data is not None and ctx.data.labeled:
        loader = ctx.data.loader("test", batch_size=256)
        xb = next(iter(loader))[0]
        fig["accuracy"] = ort_accuracy(onnx, loader)
        fig["original_accuracy"] = ort_accuracy(original, loader)
    else:
        xb = x1
    ref = model(xb[: min(len(xb), 64)]).float()
    got = ort_run(onnx, xb[: min(len(xb), 64)])
    fig["max_abs_diff_vs_torch"] = float((ref - got).abs().max())
    if cfg["check"] and ctx.data is not None and ctx.data.labeled:
        agree = float((ref.argmax(1) == got.argmax(1)).float().mean())
        fig["top1_agreement_vs_torch"] = agree
    for b in cfg["batch_sizes"]:
        x = xb[:b] if len(xb) >= b else x1.expand(b, *x1.shape[1:]).contiguous()
        lo, lc = _paired_latency(original, onnx, x, cfg["runs"])
        fig["latency_ms"][str(b)] = {"original": lo, "compressed": lc, "speedup": lo / lc if lc > 0 else None}
    return fig
