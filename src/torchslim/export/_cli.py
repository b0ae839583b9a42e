"""``torchslim export MODEL --format onnx|torchscript|pt2|pte|pte-int8 --out PATH``: write, run back,
report parity.

With one format and an ``--out`` that ends in a suffix, ``--out`` is the file; otherwise ``--out``
is a directory that receives ``model.onnx`` / ``model.pt`` / ``model.pt2`` / ``model.pte`` /
``model.int8.pte``. ``pte`` is an ExecuTorch program with the XNNPACK delegate; ``pte-int8`` the
same quantized to int8 (PT2E, XNNPACK quantizer), calibrated on the training split of ``--data``
when given (else on random batches like the example inputs); a model quantized by
``torchslim quantize`` goes to ``pte-int8`` by itself. The exported files
are checked against the PyTorch model (``--no-check`` skips it); ``--check-cpp`` also builds the
C++ runner and checks the TorchScript file from C++, ``--isolated-ort`` runs the ONNX file in a
process without PyTorch.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from torchslim._registry import register as _register_entry

__all__ = ["register"]

_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2", "onnx-int8": ".int8.onnx", "pte": ".pte",
           "pte-int8": ".int8.pte"}
_CALIBRATION_BATCHES = 8  # batches of --data's training split an int8 .pte is calibrated on


def register(sub: Any) -> None:
    """Add the ``export`` verb to the ``torchslim`` parser."""
    from torchslim._cli_common import add_out_args

    p = sub.add_parser("export", help="export to ONNX / TorchScript / torch.export (.pt2) / ExecuTorch (.pte) and check parity")
    p.add_argument("model", metavar="MODEL", help="model spec: torchvision:NAME, timm:NAME, zoo:NAME, file.py:factory, or a saved dir")
    p.add_argument("--format", help="onnx, torchscript, pt2, pte (ExecuTorch, XNNPACK) or pte-int8; several separated by commas (default: from --out's suffix)")
    add_out_args(p, kind="any", help="output file (one format) or folder (model.<suffix> per format)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    p.add_argument("--data", help="data spec the model is built for (input channels/size, classes)")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--no-check", action="store_true", help="do not run the exported files back")
    p.add_argument("--tolerance", type=float, help="atol = rtol for the parity check (default per format)")
    p.add_argument("--random-inputs", type=int, default=2, help="random input sets checked besides the example (default 2)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 18)")
    p.add_argument("--static-batch", action="store_true", help="keep the example's batch size fixed (ONNX, pt2)")
    p.add_argument("--method", default="auto", help="TorchScript capture: auto, trace or script (default auto)")
    p.add_argument("--check-cpp", action="store_true", help="build the C++ runner (CMake + libtorch from the torch wheel) and check the TorchScript file from C++")
    p.add_argument("--isolated-ort", action="store_true", help="also run the ONNX file with ONNX Runtime in a process without PyTorch")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_export)

    from torchslim.export._bench_cli import register as register_bench

    register_bench(sub)  # ``torchslim bench`` lives beside export (same family, same runtimes)


def _targets(args: argparse.Namespace) -> dict[str, Path]:
    from torchslim.errors import ConfigError
    from torchslim.export._base import format_for_path, get_format

    out = Path(args.out)
    if args.format:
        formats = [f.strip() for f in args.format.split(",") if f.strip()]
        for f in formats:
            get_format(f)
        if len(set(formats)) != len(formats):
            raise ConfigError(f"--format lists a format twice: {args.format!r}")
    else:
        by_suffix = format_for_path(out)
        if by_suffix is None:
            raise ConfigError(f"--format is required when --out ({args.out!r}) has no .onnx/.pt/.pt2/.pte suffix; "
                              "allowed: onnx, torchscript, pt2, pte, pte-int8 (comma-separated for several)")
        formats = [by_suffix]
    if len(formats) == 1 and format_for_path(out) is not None:
        return {formats[0]: out}
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a file; with several formats it must be a directory")
    return {f: out / f"model{_SUFFIX.get(f, '.' + f)}" for f in formats}


def _calibration(fmt: str, model: Any, data: Any) -> list[Any] | None:
    """Batches of ``--data``'s training split for an int8 ``.pte`` (None otherwise: random batches)."""
    from torchslim.export.pte import PTE_INT8, route_pte

    if data is None or route_pte(fmt, model) != PTE_INT8:
        return None
    batches = []
    for batch in data.loader("train", 32, shuffle=False):
        batches.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
        if len(batches) >= _CALIBRATION_BATCHES:
            break
    return batches or None


def format_is_dir(targets: dict[str, Path], out: str) -> bool:
    """Whether ``--out`` names a directory that receives the files (not the file itself)."""
    return any(path.parent == Path(out) for path in targets.values())


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _parity_entry(report: Any) -> dict[str, Any]:
    d = report.to_dict()
    return _finite({"max_abs": d["max_abs"], "max_rel": d["max_rel"], "tolerance": d["tolerance"], "ok": d["ok"],
                    "cases": len(d["cases"])})


def _cmd_export(args: argparse.Namespace) -> int:
    import torchslim as ts
    from torchslim._cli_common import build_model, console_for, emit_json, writing, writing_beside
    from torchslim.errors import ConfigError
    from torchslim.export import export
    from torchslim.export.torchscript import METHODS

    targets = _targets(args)  # everything is validated before the model is built
    if args.method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {args.method!r}")
    if args.random_inputs < 0:
        raise ConfigError(f"--random-inputs must be >= 0; got {args.random_inputs}")
    if args.check_cpp and "torchscript" not in targets:
        raise ConfigError("--check-cpp checks the TorchScript file: add torchscript to --format")
    if args.isolated_ort and "onnx" not in targets:
        raise ConfigError("--isolated-ort checks the ONNX file: add onnx to --format")
    if (args.check_cpp or args.isolated_ort) and args.no_check:
        raise ConfigError("--check-cpp / --isolated-ort cannot be combined with --no-check")
    data = ts.load_data(args.data, seed=args.seed) if args.data else None
    model = build_model(args, data)
    inputs = ts.example_inputs(model)

    results = {}
    extra: dict[str, Any] = {}
    into_dir = len(targets) > 1 or format_is_dir(targets, args.out)
    out = Path(args.out)
    # everything is written under a hidden name and published only when every check passed
    with (writing(out) if into_dir else writing_beside(out)) as tmp:
        if into_dir:
            tmp.mkdir()
        for fmt, path in targets.items():
            results[fmt] = export(
                model, inputs, tmp / path.name, format=fmt, check=not args.no_check, tolerance=args.tolerance,
                random_inputs=args.random_inputs, dynamic_batch=not args.static_batch, opset=args.opset,
                method=args.method, seed=args.seed, calibration=_calibration(fmt, model, data),
            )
        if args.check_cpp:
            from torchslim.export._cpp import build_runner, check_cpp

            binary = build_runner()
            extra["torchscript-cpp"] = check_cpp(model, results["torchscript"].path, inputs, tolerance=args.tolerance,
                                                 random_inputs=args.random_inputs, binary=binary, seed=args.seed)
        if args.isolated_ort:
            from torchslim.export._isolated import load_onnx_isolated
            from torchslim.export.parity import Tolerance, check_parity
            from torchslim.graph.inputs import as_inputs

            extra["onnx-isolated"] = check_parity(
                model, load_onnx_isolated(results["onnx"].path), as_inputs(inputs), format="onnx-isolated",
                tolerance=Tolerance.coerce(args.tolerance, (1e-4, 1e-4)), random_cases=args.random_inputs,
                seed=args.seed,
            )
        failed = [name for name, rep in extra.items() if not rep.ok]
        if failed:
            raise ConfigError(f"parity failed for {', '.join(failed)}: " + "; ".join(extra[n].summary() for n in failed))
    home = out if into_dir else out.parent

    def final(p: Any) -> str:  # where a file written under the hidden name now lies
        return str(home / Path(p).relative_to(tmp))

    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for fmt, r in results.items():
        for name, p in r.files.items():
            key = fmt if name == "model" else f"{fmt}:{name}"
            files[key], sizes[key] = final(p), r.sizes[name]
    parity = {fmt: _parity_entry(r.parity) for fmt, r in results.items() if r.parity is not None}
    parity.update({name: _parity_entry(rep) for name, rep in extra.items()})
    if args.json:
        emit_json({"verb": "export", "model": args.model, "files": files, "sizes": sizes, "parity": parity,
                   "exporters": {fmt: r.info for fmt, r in results.items()},
                   "seconds": {fmt: r.seconds for fmt, r in results.items()}})
    else:
        _print_table(console_for(args), args.model, results, extra)
    return 0


def _print_table(con: Any, model: str, results: dict[str, Any], extra: dict[str, Any]) -> None:
    from rich.table import Table

    from torchslim.profile.tables import human

    t = Table(title=f"export of {model}")
    for col in ("format", "file", "size", "how", "max abs diff", "max rel diff", "tolerance", "parity"):
        t.add_column(col)

    def row(name: str, path: str, size: str, how: str, rep: Any) -> None:
        if rep is None:
            t.add_row(name, path, size, how, "-", "-", "-", "not checked")
            return
        verdict = "[green]ok[/green]" if rep.ok else "[red]MISMATCH[/red]"
        t.add_row(name, path, size, how, f"{rep.max_abs:.3g}", f"{rep.max_rel:.3g}",
                  rep.tolerance.describe(), verdict)

    for fmt, r in results.items():
        how = ", ".join(f"{k}={v}" for k, v in r.info.items()
                        if k in ("exporter", "opset", "dynamic_batch", "method", "quantized"))
        row(fmt, r.path.name, human(r.size_bytes, "B"), how, r.parity)
    for name, rep in extra.items():
        path = results["torchscript" if name.startswith("torchscript") else "onnx"].path.name
        row(name, path, "", "C++ libtorch" if name.startswith("torchscript") else "ORT, no torch in process", rep)
    con.print(t)


# the verbs above, found by `torchslim` through the registry (ordered by `order` in --help)
_register_entry("cli_verb", "export", register, family="export", order=70, verbs=("export", "bench"))
