"""``torchslim bench MODEL``: latency of the model in eager PyTorch, torch.compile, TorchScript,
ONNX Runtime (CPU, XNNPACK EP) and ExecuTorch (XNNPACK delegate), fp32 and int8, same inputs, same
threads, interleaved round by round.

The int8 rows (``eager-int8``, ``compile-int8``, ``executorch-int8``, ``onnxruntime-int8``) time a
copy of a float model quantized by ``ts.quantize_`` in static mode, calibrated on the timed inputs
and a few random batches like them; a model that is already quantized is timed as it is.

Prints one table (median ms, p10-p90, latency / eager, max abs difference from eager) or, with
``--json``, one object whose ``runtimes`` list has one entry per runtime.

``--layers`` prints the per-layer table instead (``export.runtime_latency.layer_table``): every
convolution and linear layer timed alone on the input it gets, in each runtime of ``--runtimes``
(``eager``, ``compile``, ``onnxruntime``, ``xnnpack``; default eager), slowest first, with each
layer's share of the summed latencies in the first runtime. Figures come from the per-machine
cache when a layer of the same kind and shape was timed before (marked ``*``); ``--json`` gives
the rows.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``bench`` verb to the ``torchslim`` parser."""
    from torchslim.export.bench import RUNTIMES
    from torchslim.profile.budget import RUNTIMES as LAYER_RUNTIMES

    p = sub.add_parser("bench", help="latency per runtime, fp32 and int8: eager, torch.compile, TorchScript, ONNX Runtime, ExecuTorch (XNNPACK)")
    p.add_argument("model", metavar="MODEL", help="model spec: torchvision:NAME, timm:NAME, zoo:NAME, pretrained:NAME, file.py:factory, or a saved dir")
    p.add_argument("--data", help="data spec the model is built for (input channels/size, classes)")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--batch-size", type=int, help="repeat the example inputs to this batch size (default: as remembered, usually 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every runtime (default 1)")
    p.add_argument("--runtimes", default=None, help=f"comma-separated, from {', '.join(RUNTIMES)} (default: all; eager is always timed); "
                   f"with --layers from {', '.join(LAYER_RUNTIMES)} (default: eager)")
    p.add_argument("--layers", action="store_true",
                   help="per-layer latency table: every Conv/Linear timed alone on its input in each runtime (cached per machine)")
    p.add_argument("--runs", type=int, default=20, help="timed rounds (each times every runtime once; default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per runtime first (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_bench)


_CALIBRATION_BATCHES = 8


def _static_int8_copy(model: Any, inputs: Any) -> Any:
    """A copy of ``model`` quantized by ``ts.quantize_`` (static int8), calibrated on ``inputs`` and
    random batches like them; the model itself when it is quantized already."""
    import copy

    import torchslim as ts
    from torchslim.export.onnx_int import integer_scheme
    from torchslim.export.parity import random_inputs

    if integer_scheme(model) is not None:
        return model
    tensors = inputs.tensors()
    if inputs.kwargs or len(inputs.args) != 1 or len(tensors) != 1:
        raise ValueError(f"static int8 calibration feeds one input tensor; the model takes {inputs.describe()}")
    batches = [tensors[0]] + [random_inputs(inputs, batch=8, seed=k).args[0] for k in range(_CALIBRATION_BATCHES - 1)]
    quantized = copy.deepcopy(model)
    ts.quantize_(quantized, ts.QuantConfig(mode="static"), calibration=batches)
    return quantized.eval()


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import torchslim as ts
    from torchslim._cli_common import console_for, emit_json
    from torchslim.errors import ConfigError
    from torchslim.export.bench import RUNTIMES, bench, parse_runtimes
    from torchslim.zoo.spec import parse_input_shape

    runtimes = _layer_runtimes(args.runtimes) if args.layers else parse_runtimes(args.runtimes or ",".join(RUNTIMES))
    for name, value, low in (("--threads", args.threads, 1), ("--runs", args.runs, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}; got {value}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1; got {args.batch_size}")
    shape = parse_input_shape(args.input_shape) if args.input_shape else None

    torch.manual_seed(args.seed)
    data = ts.load_data(args.data, seed=args.seed) if args.data else None
    model = ts.create_model(args.model, data=data)
    if shape is not None:
        ts.set_example_inputs(model, shape)
    inputs = ts.example_inputs(model, batch_size=args.batch_size)
    if args.layers:
        return _layers(args, model, inputs, runtimes)
    result = bench(model, inputs, runtimes=runtimes, threads=args.threads, runs=args.runs, warmup=args.warmup,
                   int8=_static_int8_copy)
    if args.json:
        emit_json({"verb": "bench", "model": args.model, **result.to_dict()})
    else:
        console_for(args).print(result.table(title=(
            f"{args.model}: latency per runtime, inputs {result.inputs}, {result.threads} thread(s), "
            f"median of {result.runs} interleaved rounds after {result.warmup} warm-up")))
    return 0


def _layer_runtimes(text: str | None) -> tuple[str, ...]:
    """``--runtimes`` for ``--layers``: names from the latency-budget runtimes, none twice."""
    from torchslim.errors import ConfigError
    from torchslim.profile.budget import RUNTIMES as LAYER_RUNTIMES

    names = [n.strip() for n in (text or "eager").split(",") if n.strip()]
    for n in names:
        if n not in LAYER_RUNTIMES:
            raise ConfigError(f"--runtimes with --layers: unknown runtime {n!r}; allowed: {', '.join(LAYER_RUNTIMES)}")
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"--runtimes with --layers names each runtime once (at least one); got {text!r}")
    return tuple(names)


def _layers(args: argparse.Namespace, model: Any, inputs: Any, runtimes: tuple[str, ...]) -> int:
    """The per-layer table of ``model`` in each runtime (rows in the first runtime's order)."""
    from rich.table import Table

    from torchslim._cli_common import console_for, emit_json
    from torchslim.errors import ConfigError
    from torchslim.export.runtime_latency import layer_table, runtime_unavailable

    for rt in runtimes:  # a runtime not installed is refused before anything is timed
        why = runtime_unavailable(rt, model)
        if why:
            raise ConfigError(f"--runtimes: {rt} cannot time layers here: {why}")
    tables = {rt: {r.name: r for r in layer_table(model, inputs, rt, threads=args.threads, runs=args.runs)}
              for rt in runtimes}
    first = tables[runtimes[0]]
    rows = []
    for name, r in first.items():
        row = {"layer": name, "type": r.type, "input_shape": r.input_shape, "share": r.share,
               "ms": {rt: tables[rt][name].median_ms for rt in runtimes if name in tables[rt]},
               "cached": {rt: tables[rt][name].cached for rt in runtimes if name in tables[rt]},
               "shares": {rt: tables[rt][name].share for rt in runtimes if name in tables[rt]}}
        rows.append(row)
    if args.json:
        emit_json({"verb": "bench", "model": args.model, "layers": rows, "runtimes": list(runtimes),
                   "threads": args.threads, "runs": args.runs})
        return 0
    t = Table(title=f"{args.model}: each Conv/Linear alone on its input, median ms of {args.runs} runs, "
                    f"{args.threads} thread(s); * = from the per-machine cache; share of the summed layers in {runtimes[0]}")
    for h in ("layer", "type", "input shape", *(f"{rt} ms" for rt in runtimes), "share"):
        t.add_column(h, justify="left" if h in ("layer", "type", "input shape") else "right")
    for row in rows:
        cells = [f"{row['ms'][rt]:.4f}{'*' if row['cached'][rt] else ''}" if rt in row["ms"] else "-" for rt in runtimes]
        t.add_row(row["layer"], row["type"], "x".join(map(str, row["input_shape"])), *cells, f"{100 * row['share']:.1f}%")
    console_for(args).print(t)
    return 0
