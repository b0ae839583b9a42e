"""The ``export`` stage: files for real runtimes, checked in them, timed against the original.

The stage's ``formats`` are the deploy targets the user picks: any registered export format
(``ts.export``'s ``format=``: ``onnx``, ``pte``, ``torchscript``, ``pt2``...) and ``torch`` (the
model as ``ts.save`` writes it, run in eager PyTorch; a model with static-int8 layers runs under
``torch.compile``, where its integer kernels are, and its original is compiled the same way). For each one the original model is shipped
the same way (an int8 format's original is its float counterpart: ``pte-int8`` -> ``pte``), and
the report gets, per target: the bytes of the shipped file against the original's, the latency of
the file in its own runtime (ONNX Runtime, ExecuTorch with XNNPACK, TorchScript, eager PyTorch)
timed side by side with the original's (one thread; the two alternate call by call and each gets
the median of its runs), and with labeled data the test accuracy of the file run in that runtime.
A file with static shapes (ExecuTorch's ``.pte``) is timed and scored at the batch size it was
written for, the example's. A quantized model goes to ONNX as integers
(``torchslim.export.export_integer_onnx``) and to ``pte`` as XNNPACK int8 (``pte-int8``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._compile import compile_model, compiler_for
from torchslim.export.onnx_int import quiet_quantizer as _silenced
from torchslim.graph.inputs import as_inputs

__all__ = ["TORCH", "check_targets", "deploy_targets", "export_stage", "ort_accuracy", "runtime_module"]

#: The deploy target that is no export format: the ``ts.save`` folder, run in eager PyTorch (a
#: model with static-int8 layers, whose integer kernels exist only under inductor, runs compiled:
#: ``torchslim._compile.compile_model``, and the original is compiled the same way).
TORCH = "torch"
TORCH_COMPILE = "torch-compile"
#: The float format an int8 format's original is shipped in.
_FLOAT_OF = {"onnx-int8": "onnx", "pte-int8": "pte"}
#: The runtime each format runs in, for the tables.
_RUNTIME = {"onnx": "ONNX Runtime", "onnx-int8": "ONNX Runtime", "pte": "ExecuTorch (XNNPACK)",
            "pte-int8": "ExecuTorch (XNNPACK)", "torchscript": "TorchScript", "pt2": "torch.export", TORCH: "eager PyTorch",
            TORCH_COMPILE: "torch.compile (int8 on oneDNN)",
            "gguf": "llama.cpp", "hf": "transformers"}
#: Deploy targets that are no registered export format: decoder LLMs only (``_export_llm``).
GGUF = "gguf"
HF = "hf"


#: The package each target's runtime needs (checked before a run starts, not after its training).
_NEEDS = {"onnx": "onnxruntime", "onnx-int8": "onnxruntime", "pte": "executorch", "pte-int8": "executorch", GGUF: "gguf"}


def runtime_module(fmt: str) -> str | None:
    """The package the runtime of deploy target ``fmt`` needs (None: PyTorch itself)."""
    return _NEEDS.get(fmt)


def check_targets(formats: Any) -> None:
    """Raise :class:`~torchslim.errors.MissingDependencyError` (with the install line) when the
    runtime of a deploy target in ``formats`` is not installed."""
    import importlib.util

    from torchslim.errors import MissingDependencyError

    for fmt in formats:
        module = _NEEDS.get(fmt)
        if module is not None and importlib.util.find_spec(module) is None:
            extra = {"executorch": "executorch", "onnxruntime": "onnx", "gguf": "llm"}[module]
            raise MissingDependencyError(
                f"the export target {fmt!r} runs in {_RUNTIME[fmt]}, which needs the optional package {module!r} "
                f'(not installed); install it with: pip install "torchslim[{extra}]", or drop {fmt!r} from formats')


def deploy_targets() -> list[str]:
    """What an export stage may list in ``formats``: every registered export format, ``torch``, and
    ``gguf`` and ``hf`` (decoder LLMs)."""
    from torchslim.export import list_formats

    return sorted({*list_formats(), TORCH, GGUF, HF})


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
    from torchslim.recipe._export_llm import is_decoder_lm, llm_export_stage

    if is_decoder_lm(model):  # an ONNX decoder with a KV cache, GGUF, torch: scored by perplexity
        return llm_export_stage(model, cfg, ctx)  # which targets fit which model: checked before the run (runner)
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
            out["formats"]["onnx"] = {"runtime": _RUNTIME["onnx"], "format": "onnx" if scheme is None else "onnx-int8",
                                      **_onnx_figures(model, ctx, cfg, ort_run)}
        elif fmt == TORCH:
            out["formats"][TORCH] = _torch_figures(model, ctx, cfg)
        else:
            out["formats"][fmt] = _runtime_figures(model, example, fmt, ctx, cfg, export)
    return out


def _calibration_for(fmt: str, model: nn.Module, ctx: Any) -> dict[str, Any]:
    """``calibration=`` for ``ts.export`` when ``fmt`` writes ``model`` as calibrated int8, else nothing."""
    from torchslim.export import get_format
    from torchslim.export.pte import route_pte
    from torchslim.export.quantized import QUANTIZED_ONNX, route

    routed = get_format(route_pte(route(fmt, model), model))
    wanted = routed.name == QUANTIZED_ONNX or routed.calibrated
    return {"calibration": _inputs_only(ctx.calibration())} if wanted and ctx.data is not None else {}


def _inputs_only(loader: Any) -> list[torch.Tensor]:
    """The first few input batches of a loader of ``(x, y)`` (calibration needs no labels)."""
    out = []
    for batch in loader:
        out.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
        if len(out) == 8:
            break
    return out


def _runtime_figures(model: nn.Module, example: Any, fmt: str, ctx: Any, cfg: dict[str, Any], export: Any) -> dict[str, Any]:
    """Ship ``model`` and the original as ``fmt``; bytes, latency in the runtime and accuracy of both files."""
    with _one_runtime_thread(fmt):  # before any program is loaded: XNNPACK keeps the pool it was loaded with
        return _shipped_figures(model, example, fmt, ctx, cfg, export)


def _shipped_figures(model: nn.Module, example: Any, fmt: str, ctx: Any, cfg: dict[str, Any], export: Any) -> dict[str, Any]:
    from torchslim.export import get_format

    suffix = _suffix(fmt)
    result = export(model, example, ctx.dir / f"model.{suffix}", format=fmt, check=cfg["check"],
                    **_calibration_for(fmt, model, ctx))
    teacher = ctx.teacher().cpu().eval()
    original = export(teacher, tuple(_inputs_of(teacher)), ctx.dir / f"original.{suffix}",
                      format=_FLOAT_OF.get(fmt, fmt), check=False)
    ctx.files[fmt] = str(result.path)
    ctx.files[f"{fmt}_original"] = str(original.path)
    static = not (result.info.get("dynamic_batch") and original.info.get("dynamic_batch"))
    fig: dict[str, Any] = {
        "runtime": _RUNTIME.get(result.format, result.format), "format": result.format,
        "size_bytes": result.size_bytes, "original_size_bytes": original.size_bytes,
        "size_ratio": result.size_bytes / original.size_bytes,
        "parity": None if result.parity is None else result.parity.to_dict(),
    }
    batch = _first_tensor(_inputs_of(model)).shape[0] if static else None
    if static:
        fig["static_batch"] = batch  # the file runs at the example's batch size only
    run_c = get_format(result.format).load(result.path, torch.device("cpu"))
    run_o = get_format(original.format).load(original.path, torch.device("cpu"))
    _time_and_score(fig, lambda x: run_c(as_inputs(x))[0], lambda x: run_o(as_inputs(x))[0], model, ctx, cfg, batch)
    return fig


@torch.no_grad()
def _torch_figures(model: nn.Module, ctx: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``ts.save`` folder of ``model`` and of the original: bytes of their weights, eager latency, accuracy."""
    from torchslim.saving import save

    teacher = ctx.teacher().cpu().eval()
    save(model, ctx.dir / "torch")
    save(teacher, ctx.dir / "torch_original")
    ctx.files[TORCH] = str(ctx.dir / "torch")
    ctx.files[f"{TORCH}_original"] = str(ctx.dir / "torch_original")
    size = (ctx.dir / "torch" / "model.safetensors").stat().st_size
    size_o = (ctx.dir / "torch_original" / "model.safetensors").stat().st_size
    fig: dict[str, Any] = {"runtime": _RUNTIME[TORCH], "format": TORCH, "size_bytes": size,
                           "original_size_bytes": size_o, "size_ratio": size / size_o}
    run_c, run_o = model, teacher
    if compiler_for(model) is not None:  # static int8 is real on oneDNN's kernels under torch.compile only
        run_c, run_o = compile_model(model), compile_model(teacher)
        fig.update(runtime=_RUNTIME[TORCH_COMPILE], timed_in="compile")
    _time_and_score(fig, lambda x: run_c(x), lambda x: run_o(x), model, ctx, cfg, None)
    return fig


@contextlib.contextmanager
def _one_runtime_thread(fmt: str) -> Iterator[None]:
    """ExecuTorch's thread pool at one thread while ``fmt`` (a ``pte`` format) is shipped and timed;
    the pool is put back after the programs loaded meanwhile are gone."""
    if not fmt.startswith("pte"):
        yield
        return
    import gc

    from torchslim.export.pte import set_threads

    before = set_threads(1)
    try:
        yield
    finally:
        gc.collect()  # the loaded programs hold the pool they were loaded with
        set_threads(before)


@torch.no_grad()
def _time_and_score(fig: dict[str, Any], run_c: Any, run_o: Any, model: nn.Module, ctx: Any, cfg: dict[str, Any],
                    static_batch: int | None) -> None:
    """Latency of both files side by side (one thread) at the stage's batch sizes (or the file's
    static one), and with labeled data their test accuracy in the runtime."""
    from torchslim.profile.latency import measure_pair

    x1 = _first_tensor(_inputs_of(model)).cpu()
    labeled = ctx.data is not None and ctx.data.labeled
    xb = next(iter(ctx.data.loader("test", batch_size=256)))[0] if labeled else x1
    sizes = [static_batch] if static_batch is not None else list(cfg["batch_sizes"])
    fig["latency_ms"] = {}
    for b in sizes:
        x = xb[:b] if len(xb) >= b else x1.expand(b, *x1.shape[1:]).contiguous()
        to, tc = measure_pair(functools.partial(run_o, x), functools.partial(run_c, x), runs=cfg["runs"] * 3, warmup=3, threads=1,
                              runtimes=("original", "compressed"))
        fig["latency_ms"][str(b)] = {"original": to.median_ms, "compressed": tc.median_ms,
                                     "speedup": to.median_ms / tc.median_ms if tc.median_ms > 0 else None}
    if labeled:
        loader = ctx.data.loader("test", batch_size=256)
        fig["accuracy"] = _accuracy(run_c, loader, static_batch)
        fig["original_accuracy"] = _accuracy(run_o, loader, static_batch)
    fig["threads"] = 1


def _accuracy(run: Any, loader: Any, batch: int | None) -> float:
    """Top-1 accuracy of ``run`` (a batch -> logits function) over a labeled loader, fed in pieces of
    ``batch`` rows when the file has a static batch size (the last piece padded)."""
    correct = total = 0
    for x, y in loader:
        if batch is None:
            logits = run(x)
        else:
            parts = []
            for i in range(0, len(x), batch):
                piece = x[i : i + batch]
                pad = batch - len(piece)
                if pad:
                    piece = torch.cat([piece, piece[-1:].expand(pad, *piece.shape[1:])])
                parts.append(run(piece)[: batch - pad])
            logits = torch.cat(parts)
        correct += int((logits.argmax(1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


def _inputs_of(model: nn.Module) -> tuple[Any, ...]:
    from torchslim._modelinfo import example_inputs
    from torchslim.errors import ConfigError

    ex = example_inputs(model)
    if isinstance(ex, dict):
        raise ConfigError("the export stage needs a model with positional inputs; use `torchslim export` for keyword inputs")
    return tuple(ex)


def _suffix(fmt: str) -> str:
    return {"torchscript": "ts", "pt2": "pt2", "pte-int8": "pte", "onnx-int8": "onnx"}.get(fmt, fmt)


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
