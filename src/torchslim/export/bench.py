"""Latency of one model in several runtimes, measured side by side: ``bench(model, inputs)``.

The runtimes (``RUNTIMES``), the float model first:

* ``eager``: the PyTorch module under ``torch.no_grad`` (always timed: it is the baseline);
* ``compile``: ``torch.compile(model)`` (inductor; on CPU it generates C++ and needs a compiler);
* ``torchscript``: the file ``ts.export`` writes (trace or script), run by ``torch.jit.load``;
* ``onnxruntime``: the ``ts.export`` ONNX file in ONNX Runtime's default CPU execution provider;
* ``onnxruntime-xnnpack``: the same ONNX file in ONNX Runtime's XNNPACK execution provider, where
  the installed build has it (``onnxruntime.get_available_providers()``; the PyPI wheels do not).
  This row was called ``xnnpack`` before ExecuTorch's XNNPACK delegate got its own row;
* ``executorch``: the ``ts.export`` ``.pte`` file (ExecuTorch program, XNNPACK delegate) in
  ExecuTorch's runtime;

then the int8 form of the model (``int8=``: a quantized copy, or the model itself when
``ts.quantize_`` quantized it):

* ``eager-int8``, ``compile-int8``: that model in eager PyTorch and under ``torch.compile``;
* ``executorch-int8``: its int8 ``.pte`` (format ``pte-int8``: PT2E, XNNPACK quantizer);
* ``onnxruntime-int8``: its integer ONNX file (format ``onnx-int8``) in ONNX Runtime's CPU provider.

Every runtime runs the same inputs with the same number of threads (``torch.set_num_threads``
for the PyTorch ones, ``intra_op_num_threads`` for ONNX Runtime, the size of ExecuTorch's
thread pool; restored afterwards). After
``warmup`` untimed calls each, timing goes round by round: each round times one call of every
runtime, in an order rotated every round, so a burst of load from other processes hits all
runtimes alike. A runtime that cannot be prepared (the export or compilation fails, the provider
is missing) gets a row saying why instead of stopping the others. Each row also holds the largest
absolute difference of the runtime's outputs from eager's on the timed inputs (for the int8 rows
that includes the quantization error).

With more than one thread on a machine with few cores, the runtimes' thread pools get in each
other's way: PyTorch's OpenMP workers spin for a while after each call and take the cores the next
runtime's threads need (ExecuTorch's and ONNX Runtime's pools spin too). For such comparisons start
Python with ``OMP_WAIT_POLICY=PASSIVE`` (eager ResNet-18 at 2 threads on 2 busy cores read 15x its
1-thread latency without it, interleaved with ExecuTorch).

The ONNX files are written by ``ts.export`` (parity checked), so a static / QAT quantized model
is timed as int8 QDQ ONNX in ONNX Runtime. The PyTorch rows run on the model's device (CUDA
calls are synchronized before the clock stops); the ONNX Runtime rows run on CPU only, so for a
model on another device they say so instead of timing (ExecuTorch's rows too).

Example:
    >>> import torch
    >>> from torchslim.export.bench import bench
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())
    >>> result = bench(model, torch.randn(1, 8), runtimes="eager,torchscript", runs=3, warmup=1)
    >>> [r.runtime for r in result.rows], result.row("eager").ratio_to_eager
    (['eager', 'torchscript'], 1.0)
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._utils import evaluating, is_int, model_device, num_threads
from torchslim.errors import ConfigError, type_error
from torchslim.export._base import failure_reason, tensor_leaves
from torchslim.graph.inputs import Inputs, as_inputs, call_model
from torchslim.profile.latency import cpu_name, measure_interleaved

__all__ = ["RUNTIMES", "INT8_RUNTIMES", "BenchRow", "BenchResult", "bench", "parse_runtimes"]

RUNTIMES = ("eager", "compile", "torchscript", "onnxruntime", "onnxruntime-xnnpack", "executorch",
            "eager-int8", "compile-int8", "executorch-int8", "onnxruntime-int8")
INT8_RUNTIMES = tuple(r for r in RUNTIMES if r.endswith("-int8"))
_RENAMED = {"xnnpack": "'onnxruntime-xnnpack' (ONNX Runtime's XNNPACK execution provider) or 'executorch' "
                       "(ExecuTorch's XNNPACK delegate)"}
_XNNPACK = "XnnpackExecutionProvider"
_ORT_ROWS = ("onnxruntime", "onnxruntime-xnnpack", "onnxruntime-int8")
_ET_ROWS = ("executorch", "executorch-int8")


@dataclass(frozen=True)
class BenchRow:
    """One runtime's timing.

    Attributes:
        runtime: one of :data:`RUNTIMES`.
        status: ``"ok"``, ``"failed"`` (preparing or running it raised; see ``reason``) or
            ``"unavailable"`` (not installed / not in this build; see ``reason``).
        median_ms, p10_ms, p90_ms: latency of one forward call over the timed rounds.
        ratio_to_eager: ``median_ms / eager's median_ms`` (< 1: faster than eager).
        max_abs_diff: largest ``|output - eager output|`` on the timed inputs.
        prepare_s: seconds spent exporting / compiling / loading before timing.
        reason: why the row has no timing (empty when ``status == "ok"``).
        info: how the runtime was set up (export method, provider, file size...).
    """

    runtime: str
    status: str
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    ratio_to_eager: float | None = None
    max_abs_diff: float | None = None
    prepare_s: float = 0.0
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite numbers (an output of another shape: inf) become None."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class BenchResult:
    """The rows of :func:`bench` (eager first) and the conditions they were measured under."""

    rows: tuple[BenchRow, ...]
    threads: int
    runs: int
    warmup: int
    inputs: str
    batch_size: int
    environment: dict[str, Any] = field(default_factory=dict)

    def row(self, runtime: str) -> BenchRow:
        """The row of ``runtime``.

        Raises:
            ConfigError: no such row.
        """
        for r in self.rows:
            if r.runtime == runtime:
                return r
        raise ConfigError(f"no bench row for {runtime!r}; rows: {', '.join(r.runtime for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "runs": self.runs,
            "warmup": self.warmup,
            "inputs": self.inputs,
            "batch_size": self.batch_size,
            "environment": dict(self.environment),
            "runtimes": [r.to_dict() for r in self.rows],
        }

    def table(self, title: str | None = None) -> Any:
        """A ``rich`` table: one line per runtime with median, p10-p90, ratio to eager, difference."""
        from rich.table import Table

        t = Table(title=title or (f"latency per runtime: inputs {self.inputs}, {self.threads} thread(s), median of "
                                  f"{self.runs} interleaved rounds after {self.warmup} warm-up"))
        for col in ("runtime", "median ms", "p10-p90 ms", "latency / eager", "max abs diff", "note"):
            t.add_column(col, justify="left" if col in ("runtime", "note") else "right", no_wrap=col != "note",
                         min_width=24 if col == "note" else None)
        for r in self.rows:
            if not r.ok:
                t.add_row(r.runtime, r.status, "-", "-", "-", r.reason)
                continue
            note = ", ".join(str(v).replace("ExecutionProvider", " EP") for k, v in r.info.items()
                             if k in ("method", "provider", "backend", "quantized", "int8"))
            t.add_row(r.runtime, f"{r.median_ms:.3f}", f"{r.p10_ms:.3f}-{r.p90_ms:.3f}", f"{r.ratio_to_eager:.2f}",
                      f"{r.max_abs_diff:.2g}", note)
        from torchslim._text import printable

        return printable(t)  # plain text under print(), the rich table on a console


def parse_runtimes(runtimes: str | Sequence[str] | None) -> tuple[str, ...]:
    """Runtime names from ``"eager,onnxruntime"`` or a list; eager is put first (it is the baseline).

    Raises:
        ConfigError: an unknown or repeated name (the message lists the allowed ones).
    """
    if runtimes is None:
        names: list[str] = list(RUNTIMES)
    elif isinstance(runtimes, str):
        names = [n.strip() for n in runtimes.split(",") if n.strip()]
    elif isinstance(runtimes, Sequence) and all(isinstance(n, str) for n in runtimes):
        names = [n.strip() for n in runtimes]
    else:
        raise type_error("runtimes", runtimes, "a comma-separated string or a list of runtime names")
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown and unknown[0] in _RENAMED:
        raise ConfigError(f"runtime {unknown[0]!r} was renamed: use {_RENAMED[unknown[0]]}")
    if unknown:
        raise ConfigError(f"unknown runtime {unknown[0]!r}; allowed: {', '.join(RUNTIMES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"runtimes lists a runtime twice: {', '.join(names)}")
    if not names:
        raise ConfigError(f"runtimes is empty; allowed: {', '.join(RUNTIMES)}")
    return ("eager", *(n for n in names if n != "eager"))


# ---- runtimes: each preparer returns (run, info) or raises ------------------------------------
Runner = Callable[[], list[torch.Tensor]]
Int8 = nn.Module | Callable[[nn.Module, Inputs], nn.Module] | None


def _torch_runner(module: Callable[..., Any], inputs: Inputs) -> Runner:
    cuda = any(t.is_cuda for t in inputs.tensors())

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            out = tensor_leaves(module(*inputs.args, **inputs.kwargs))
        if cuda:  # time the work, not its launch
            torch.cuda.synchronize()
        return out

    return run


def _prepare_compile(model: nn.Module, inputs: Inputs) -> tuple[Runner, dict[str, Any]]:
    from torchslim._compile import compile_model, compiler_for

    compiled = compile_model(model)  # a static-int8 model: on oneDNN's int8 kernels
    run = _torch_runner(compiled, inputs)
    run()  # compiles now, so a failure is reported at preparation and compile time is not timed
    kernels = compiler_for(model)
    return run, {"backend": "inductor", **({"kernels": kernels} if kernels else {})}


def _prepare_torchscript(model: nn.Module, inputs: Inputs, workdir: Path) -> tuple[Runner, dict[str, Any]]:
    from torchslim.export.api import export

    result = export(model, inputs, workdir / "model.pt", random_inputs=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.10+ marks TorchScript deprecated
        module = torch.jit.load(str(result.path), map_location=model_device(model))
    module.eval()
    return _torch_runner(module, inputs), {"method": result.info.get("method"), "size_bytes": result.size_bytes}


def _exported(model: nn.Module, inputs: Inputs, path: Path, cache: dict[str, Any], format: str | None = None) -> Any:
    """Export ``path`` once for every row that runs it (an export failure is kept and re-raised)."""
    if path.name not in cache:
        from torchslim.export.api import export

        try:
            cache[path.name] = export(model, inputs, path, format=format, random_inputs=0)
        except Exception as exc:  # reported in every row that needs the file
            cache[path.name] = exc
    if isinstance(cache[path.name], Exception):
        raise cache[path.name]
    return cache[path.name]


def _ort_runner(path: Path, inputs: Inputs, threads: int, provider: str) -> Runner:
    from torchslim.export.ort import ort_feed, ort_session

    if provider == _XNNPACK:
        # XNNPACK runs its own thread pool; ONNX Runtime's is left at one thread so the two do not compete
        providers: list[Any] = [(_XNNPACK, {"intra_op_num_threads": str(threads)}), "CPUExecutionProvider"]
        session = ort_session(path, 1, providers=providers)
    else:
        session = ort_session(path, threads)
    names = [i.name for i in session.get_inputs()]
    tensors = inputs.tensors()
    if inputs.kwargs and set(inputs.kwargs) == set(names):  # keyword inputs: feed by name
        feed = {n: inputs.kwargs[n].detach().cpu().contiguous().numpy() for n in names}
    elif len(tensors) == len(names):
        feed = ort_feed(session, tensors)
    else:
        raise ConfigError(f"the ONNX graph takes {len(names)} inputs ({', '.join(names)}) but {len(tensors)} "
                          "tensors were given")

    def run() -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in session.run(None, feed)]

    return run


def _facts(result: Any, **extra: Any) -> dict[str, Any]:
    info = {**extra, "exporter": result.info.get("exporter"), "size_bytes": result.size_bytes}
    if "quantized" in result.info:
        info["quantized"] = result.info["quantized"]
    return info


def _prepare_ort(model: nn.Module, inputs: Inputs, workdir: Path, threads: int, cache: dict[str, Any],
                 provider: str, int8: bool = False) -> tuple[Runner, dict[str, Any]]:
    if int8:  # the integer writer for any quantized model (static QDQ, dynamic int8, int4)
        result = _exported(model, inputs, workdir / "model.int8.onnx", cache, format="onnx-int8")
    else:
        result = _exported(model, inputs, workdir / "model.onnx", cache)
    return _ort_runner(result.path, inputs, threads, provider), _facts(result, provider=provider)


def _prepare_executorch(model: nn.Module, inputs: Inputs, workdir: Path, cache: dict[str, Any],
                        int8: bool = False) -> tuple[Runner, dict[str, Any]]:
    from torchslim.export.pte import load_pte

    name = "model.int8.pte" if int8 else "model.pte"  # a quantized model goes to pte-int8 either way
    result = _exported(model, inputs, workdir / name, cache, format="pte-int8" if int8 else None)
    run = load_pte(result.path)
    facts = _facts(result, backend="XNNPACK delegate")
    if result.info.get("undelegated_ops"):
        facts["undelegated_ops"] = result.info["undelegated_ops"]
    return (lambda: run(inputs)), facts


def _unavailable(runtime: str, device: torch.device) -> str:
    """Why ``runtime`` cannot run in this installation ('' when it can)."""
    if runtime in _ET_ROWS:
        if device.type != "cpu":
            return f"ExecuTorch rows run on CPU; the model is on {device} (bench a CPU copy to compare them)"
        try:
            import executorch.exir  # noqa: F401
            import executorch.runtime  # noqa: F401
        except ImportError:
            return "executorch is not installed (pip install 'torchslim[executorch]')"
        return ""
    if runtime not in _ORT_ROWS:
        return ""
    if device.type != "cpu":
        return f"ONNX Runtime rows run on CPU; the model is on {device} (bench a CPU copy to compare them)"
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError:
        return "onnx / onnxruntime is not installed (pip install 'torchslim[onnx]')"
    if runtime == "onnxruntime-xnnpack" and _XNNPACK not in ort.get_available_providers():
        return (f"not in this onnxruntime build (onnxruntime {ort.__version__} has "
                f"{', '.join(ort.get_available_providers())})")
    return ""


def _max_diff(reference: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    if len(reference) != len(out):
        return float("inf")
    worst = 0.0
    for a, b in zip(reference, out):
        if a.shape != b.shape:
            return float("inf")
        if a.numel():
            worst = max(worst, float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max()))
    return worst


def _check_args(threads: Any, runs: Any, warmup: Any) -> int:
    if threads is None:
        threads = torch.get_num_threads()
    for name, value, low in (("threads", threads, 1), ("runs", runs, 1), ("warmup", warmup, 0)):
        if not is_int(value) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(threads)


def _is_quantized(model: nn.Module) -> bool:
    from torchslim.export.onnx_int import integer_scheme

    return integer_scheme(model) is not None


def bench(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    runtimes: str | Sequence[str] | None = None,
    threads: int | None = 1,
    runs: int = 20,
    warmup: int = 3,
    int8: Int8 = None,
) -> BenchResult:
    """Time ``model`` in several runtimes on the same inputs, with the same threads, interleaved.

    Args:
        model: the model (not modified; it runs in eval mode and its modes are restored).
        example_inputs: a tensor, a tuple of inputs or a dict of keyword inputs (default: the
            inputs the model remembers, for models built by ``ts.create_model``); timed as given,
            so pass the batch size you want to measure.
        runtimes: names from :data:`RUNTIMES`, as a list or ``"eager,onnxruntime"`` (default:
            all). Eager is always timed, first, as the baseline of ``ratio_to_eager``.
        threads: intra-op threads of every runtime (``None``: torch's current setting).
        runs: timed rounds; every round times one call of each runtime.
        warmup: untimed calls of each runtime before the rounds.
        int8: the model the ``*-int8`` rows time: a quantized model, or a function
            ``int8(model, inputs) -> quantized copy`` (called once; ``torchslim bench`` passes one
            that runs ``ts.quantize_`` static on a copy, calibrated on the inputs). Default: the
            model itself when ``ts.quantize_`` quantized it; for a float model those rows say
            ``unavailable``.

    Returns:
        A :class:`BenchResult`: one :class:`BenchRow` per runtime, eager first.

    Raises:
        ConfigError: an unknown runtime (the message lists the allowed ones), or a bad
            ``threads`` / ``runs`` / ``warmup`` / ``int8``. Nothing has run yet.
        InputShapeError, ModelRunError: the model does not run eagerly on the inputs.

    Example:
        >>> import torch
        >>> r = bench(torch.nn.Linear(4, 2), torch.randn(1, 4), runtimes=["eager"], runs=2, warmup=0)
        >>> r.rows[0].status, r.rows[0].median_ms > 0
        ('ok', True)
    """
    if not isinstance(model, nn.Module):
        raise type_error("model", model, "an nn.Module")
    names = parse_runtimes(runtimes)
    threads = _check_args(threads, runs, warmup)
    if int8 is not None and not (isinstance(int8, nn.Module) or callable(int8)):
        raise type_error("int8", int8, "a quantized nn.Module, a function (model, inputs) -> quantized model, or None")
    if example_inputs is None:
        from torchslim._modelinfo import example_inputs as remembered

        example_inputs = remembered(model)
    inputs = as_inputs(example_inputs).to(model_device(model))

    with num_threads(threads), evaluating(model), torch.no_grad():
        call_model(model, inputs)  # a model that does not run gets the usual readable error
        rows = _measure(model, inputs, names, threads, runs, warmup, int8)
    env: dict[str, Any] = {"torch": torch.__version__, "interop_threads": torch.get_num_interop_threads(),
                           "cpu": cpu_name()}
    try:
        import onnxruntime as ort

        env.update(onnxruntime=ort.__version__, onnxruntime_providers=list(ort.get_available_providers()))
    except ImportError:
        env["onnxruntime"] = None
    try:
        from executorch.version import __version__ as et_version

        env["executorch"] = str(et_version)
    except ImportError:
        env["executorch"] = None
    return BenchResult(rows=tuple(rows), threads=threads, runs=runs, warmup=warmup, inputs=inputs.describe(),
                       batch_size=inputs.batch_size, environment=env)


def _int8_model(model: nn.Module, inputs: Inputs, int8: Int8) -> tuple[nn.Module, str]:
    """The model the int8 rows time and how it came to be (raises when there is none)."""
    if isinstance(int8, nn.Module):
        return int8.eval(), "given"
    if int8 is not None:
        made = int8(model, inputs)
        if not isinstance(made, nn.Module):
            raise ConfigError(f"int8(model, inputs) must return the quantized model; it returned {type(made).__name__}")
        return made.eval(), "quantized copy"
    if _is_quantized(model):
        return model, "the model's own quantization"
    raise LookupError("the model is float: pass int8= a quantized copy or a function making one "
                      "(torchslim bench quantizes a copy with ts.quantize_ static)")


def _prepare(name: str, model: nn.Module, inputs: Inputs, workdir: Path, threads: int,
             cache: dict[str, Any]) -> tuple[Runner, dict[str, Any]]:
    """Prepare one runtime on ``model`` (the float model, or the int8 one for ``*-int8`` rows)."""
    base = name.removesuffix("-int8")
    int8 = name in INT8_RUNTIMES
    if base == "eager":
        return _torch_runner(model, inputs), {}
    if base == "compile":
        return _prepare_compile(model, inputs)
    if base == "torchscript":
        return _prepare_torchscript(model, inputs, workdir)
    if base == "executorch":
        return _prepare_executorch(model, inputs, workdir, cache, int8=int8)
    provider = _XNNPACK if name == "onnxruntime-xnnpack" else "CPUExecutionProvider"
    return _prepare_ort(model, inputs, workdir, threads, cache, provider, int8=int8)


def _measure(model: nn.Module, inputs: Inputs, names: tuple[str, ...], threads: int, runs: int,
             warmup: int, int8: Int8) -> list[BenchRow]:
    runners: dict[str, Runner] = {"eager": _torch_runner(model, inputs)}
    infos: dict[str, dict[str, Any]] = {"eager": {}}
    prepare: dict[str, float] = {"eager": 0.0}
    problems: dict[str, tuple[str, str]] = {}
    cache: dict[str, Any] = {}
    quantized: tuple[nn.Module, str] | BaseException | None = None
    et_threads: int | None = None  # ExecuTorch's thread pool size before, restored at the end
    try:
        with tempfile.TemporaryDirectory(prefix="torchslim-bench-") as tmp:
            workdir = Path(tmp)
            for name in names[1:]:
                why = _unavailable(name, model_device(model))
                if why:
                    problems[name] = ("unavailable", why)
                    continue
                start = time.perf_counter()
                try:
                    target = model
                    if name in INT8_RUNTIMES:
                        if quantized is None:
                            try:
                                quantized = _int8_model(model, inputs, int8)
                            except Exception as exc:  # kept: every int8 row reports it
                                quantized = exc
                        if isinstance(quantized, LookupError):
                            problems[name] = ("unavailable", str(quantized))
                            continue
                        if isinstance(quantized, BaseException):
                            raise quantized
                        target = quantized[0]
                    if name in _ET_ROWS and et_threads is None:
                        from torchslim.export.pte import set_threads

                        et_threads = set_threads(threads)
                    runners[name], infos[name] = _prepare(name, target, inputs, workdir, threads, cache)
                    if name in INT8_RUNTIMES:
                        infos[name] = {"int8": quantized[1], **infos[name]}
                except Exception as exc:  # any runtime may fail in its own way; the row says how
                    problems[name] = ("failed", failure_reason(exc))
                finally:
                    prepare[name] = time.perf_counter() - start
        return _time(runners, infos, prepare, problems, names, runs, warmup)
    finally:
        if et_threads is not None:
            from torchslim.export.pte import set_threads

            set_threads(et_threads)


def _time(runners: dict[str, Runner], infos: dict[str, dict[str, Any]], prepare: dict[str, float],
          problems: dict[str, tuple[str, str]], names: tuple[str, ...], runs: int, warmup: int) -> list[BenchRow]:
    reference = runners["eager"]()
    diffs: dict[str, float] = {"eager": 0.0}
    for name, run in list(runners.items()):
        try:
            if name != "eager":  # the first call gives the difference and counts as a warm-up call
                diffs[name] = _max_diff(reference, run())
            for _ in range(warmup - 1):
                run()
        except Exception as exc:  # a runtime that raises when run is reported, the others go on
            if name == "eager":
                raise
            problems[name] = ("failed", failure_reason(exc))
            del runners[name]

    # one call of each per round, the order rotated each round: no runtime is always first
    timings = measure_interleaved(runners, runs=runs, warmup=0, rotate=True)
    eager_ms = timings["eager"].median_ms
    rows = []
    for name in names:
        if name in problems:
            status, reason = problems[name]
            rows.append(BenchRow(name, status, prepare_s=prepare.get(name, 0.0), reason=reason,
                                 info=infos.get(name, {})))
            continue
        t = timings[name]
        median = t.median_ms
        rows.append(BenchRow(
            name, "ok", median_ms=median, p10_ms=t.quantile(0.1), p90_ms=t.quantile(0.9),
            ratio_to_eager=1.0 if name == "eager" else median / eager_ms, max_abs_diff=diffs[name],
            prepare_s=prepare[name], info=infos[name],
        ))
    return rows
