"""Latency where the model runs: whole models and single layers timed in a target runtime.

MACs are a proxy; a latency budget is only honest when it is measured in the runtime the model
ships to. This module is the one place that turns a model into a timed call in each of the four
deploy runtimes a budget may name (``RUNTIMES``):

* ``eager``: the PyTorch module under ``torch.no_grad``;
* ``compile``: ``torch.compile`` (inductor, static shapes);
* ``onnxruntime``: the ``ts.export`` ONNX file in ONNX Runtime's CPU execution provider;
* ``xnnpack``: the ``ts.export`` ``.pte`` file (ExecuTorch, XNNPACK delegate) in ExecuTorch's runtime.

:func:`paired_latency` prepares every model given, then times them round by round with the order
rotated every round (``profile.latency.measure_interleaved``), all with the same thread count, so
load from other processes hits them alike; :func:`latency_ratio` is the candidate's median over the
original's from such a run. ``memory_format="channels_last"`` converts the PyTorch runtimes' copy of
the model and 4-D inputs (the file runtimes choose their own layouts).

:func:`layer_latency` times one layer alone on an input of a given shape and keeps the median in a
per-machine cache (``$TORCHSLIM_CACHE/latency/RUNTIME.json``, default ``~/.cache/torchslim``), keyed
by the layer's hyper-parameters, the input shape, the runtime, the thread count, the memory format
and the CPU, so a table is measured once per runtime. :func:`layer_table` measures every
convolution and linear layer of a model that way (``torchslim bench --layers``), and
:func:`fastest_widths` measures candidate output widths of one layer, for rounding pruned widths to
the sizes a runtime's kernels like. :func:`module_latencies` times any small modules (a factorized
sequence at candidate ranks, say) on one input shape, interleaved, cached under a signature the
caller gives (what the module is, in JSON), so a planner can compare forms of one layer.

Example:
    >>> import torch
    >>> from torchslim.export.runtime_latency import latency_ratio
    >>> big = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    >>> small = torch.nn.Sequential(torch.nn.Linear(256, 16), torch.nn.ReLU(), torch.nn.Linear(16, 256))
    >>> ratio, timings = latency_ratio(big, small, torch.randn(64, 256), runtime="eager", runs=5, warmup=1)
    >>> sorted(timings), ratio > 0
    (['candidate', 'original'], True)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._fs import atomic_path
from torchslim._utils import evaluating, is_int
from torchslim.errors import ConfigError
from torchslim.graph.inputs import Inputs, as_inputs
from torchslim.profile.budget import MEMORY_FORMATS, RUNTIMES
from torchslim.profile.latency import Timing, cpu_name, measure_interleaved

__all__ = ["MEMORY_FORMATS", "RUNTIMES", "LayerLatency", "check_runtime", "conv_class", "fastest_widths", "latency_ratio",
           "layer_input_shapes", "layer_latency", "layer_table", "module_latencies", "module_latency", "paired_latency",
           "runtime_unavailable"]

_BENCH_NAME = {"eager": "eager", "compile": "compile", "onnxruntime": "onnxruntime", "xnnpack": "executorch"}
_TORCH_RUNTIMES = ("eager", "compile")
_LAYER_KINDS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check_runtime(runtime: Any, memory_format: Any = None, threads: Any = None) -> tuple[str, str | None, int | None]:
    """``(runtime, memory_format, threads)`` validated; a one-line ConfigError naming what is allowed."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    if memory_format is not None and memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)} (or None); got {memory_format!r}")
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ConfigError(f"threads must be an integer >= 1 (or None: the current torch setting); got {threads!r}")
    return runtime, memory_format, None if threads is None else int(threads)


def runtime_unavailable(runtime: str, model: nn.Module | None = None) -> str:
    """Why ``runtime`` cannot time models in this installation ('' when it can)."""
    from torchslim.export.bench import _unavailable

    check_runtime(runtime)
    device = torch.device("cpu")
    if model is not None:
        from torchslim._utils import model_device

        device = model_device(model)
    return _unavailable(_BENCH_NAME[runtime], device)


def _formatted(model: nn.Module, inputs: Inputs, memory_format: str | None) -> tuple[nn.Module, Inputs]:
    if memory_format != "channels_last":
        return model, inputs
    moved = copy.deepcopy(model).to(memory_format=torch.channels_last)
    conv = lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t  # noqa: E731
    args = tuple(conv(a) if isinstance(a, torch.Tensor) else a for a in inputs.args)
    kwargs = {k: conv(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.kwargs.items()}
    return moved, Inputs(args, kwargs)


@contextlib.contextmanager
def _threads(runtime: str, threads: int | None) -> Iterator[None]:
    """ExecuTorch's pool sized like the others while the runtime is prepared and timed."""
    if runtime != "xnnpack" or threads is None:
        yield
        return
    from torchslim.export.pte import set_threads

    before = set_threads(threads)
    try:
        yield
    finally:
        set_threads(before)


def _runner(model: nn.Module, inputs: Inputs, runtime: str, workdir: Path, threads: int,
            memory_format: str | None, cache: dict[str, Any]) -> Callable[[], Any]:
    from torchslim.export.bench import _prepare

    if runtime in _TORCH_RUNTIMES:
        model, inputs = _formatted(model, inputs, memory_format)
    why = runtime_unavailable(runtime, model)
    if why:
        raise ConfigError(f"cannot time in {runtime}: {why}")
    run, _ = _prepare(_BENCH_NAME[runtime], model, inputs, workdir, threads, cache)
    return run


def paired_latency(models: Mapping[str, nn.Module], inputs: Any, runtime: str = "eager", *, threads: int | None = None,
                   runs: int = 15, warmup: int = 2, memory_format: str | None = None) -> dict[str, Timing]:
    """Every model of ``models`` prepared in ``runtime`` and timed round by round (order rotated).

    Args:
        models: label -> model (each left as it was; the file runtimes export it to a temporary folder).
        inputs: example inputs (a tensor, a tuple, or an ``Inputs``), the same for every model.
        runtime: one of ``RUNTIMES``.
        threads: intra-op threads of the runtime (``None``: the current torch setting).
        runs, warmup: timed and untimed rounds.
        memory_format: ``"channels_last"`` for the PyTorch runtimes' copies, or None.

    Returns:
        label -> :class:`~torchslim.profile.latency.Timing`.

    Raises:
        ConfigError: an unknown runtime or memory format, a runtime not installed here, or a model
            the runtime cannot take (the reason given).
    """
    runtime, memory_format, threads = check_runtime(runtime, memory_format, threads)
    if not models:
        raise ConfigError("paired_latency needs at least one model")
    n = threads if threads is not None else torch.get_num_threads()
    x = as_inputs(inputs)
    runners: dict[str, Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory(prefix="torchslim-latency-") as tmp, _threads(runtime, n):
        for i, (label, model) in enumerate(models.items()):
            work = Path(tmp) / str(i)
            work.mkdir()
            with evaluating(model):
                try:
                    runners[label] = _runner(model, x, runtime, work, n, memory_format, {})
                except ConfigError:
                    raise
                except Exception as exc:  # an export or compile failure, said in one line
                    from torchslim.export._base import failure_reason

                    raise ConfigError(f"cannot time {label!r} in {runtime}: {failure_reason(exc)}") from exc
        with contextlib.ExitStack() as stack:
            for model in models.values():
                stack.enter_context(evaluating(model))
            return measure_interleaved(runners, runs=runs, warmup=warmup, threads=n, rotate=True)


def latency_ratio(original: nn.Module, candidate: nn.Module, inputs: Any, runtime: str = "eager", *,
                  threads: int | None = None, runs: int = 15, warmup: int = 2,
                  memory_format: str | None = None) -> tuple[float, dict[str, Timing]]:
    """``(candidate median / original median, timings)`` from one interleaved run in ``runtime``."""
    t = paired_latency({"original": original, "candidate": candidate}, inputs, runtime, threads=threads, runs=runs,
                       warmup=warmup, memory_format=memory_format)
    return t["candidate"].median_ms / max(t["original"].median_ms, 1e-9), t


# ---- single layers: timed alone, cached per machine ------------------------------------------------------------
@dataclass
class LayerLatency:
    """One layer of :func:`layer_table`: its name, type, input shape and median latency alone."""

    name: str
    type: str
    input_shape: list[int]
    median_ms: float
    share: float = 0.0  # of the summed layer latencies
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def conv_class(module: nn.Module) -> type[nn.Module]:
    """The plain ``nn.Conv1d/2d/3d`` a convolution (or a subclass of one, e.g. a static-"same"-padding
    conv of EfficientNet) is timed as: its layer rebuilt with random weights."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(module.kernel_size)]


def _signature(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return {"type": conv_class(module).__name__, "in": module.in_channels, "out": module.out_channels,
                "kernel": list(module.kernel_size), "stride": list(module.stride), "padding": str(module.padding),
                "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None}
    raise ConfigError(f"layer_latency times Conv1d/2d/3d and Linear layers; got {type(module).__name__}")


def _cache_file(runtime: str) -> Path:
    root = os.environ.get("TORCHSLIM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torchslim")
    return Path(root) / "latency" / f"{runtime}.json"


def _key(module: nn.Module, input_shape: Sequence[int], runtime: str, threads: int, memory_format: str | None) -> str:
    body = json.dumps({"layer": _signature(module), "input": list(input_shape), "threads": threads,
                       "memory_format": memory_format or "contiguous", "cpu": cpu_name(),
                       "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha1(body.encode()).hexdigest()[:20]


def _read_cache(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
        return {k: float(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}  # a missing or damaged cache is measured again


def _write_cache(path: Path, entries: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**_read_cache(path), **entries}  # another process may have added entries meanwhile
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))


def layer_latency(module: nn.Module, input_shape: Sequence[int], runtime: str = "eager", *, threads: int | None = 1,
                  memory_format: str | None = None, cache: bool = True, runs: int = 15, warmup: int = 2) -> float:
    """Median milliseconds of ``module`` alone on a random input of ``input_shape`` in ``runtime``.

    The layer is rebuilt with random weights of the same hyper-parameters (its own weights do not
    change its speed), so the figure is reusable: with ``cache`` it is kept per machine and read
    back for any layer of the same kind, shape, runtime, threads and memory format.
    """
    runtime, memory_format, threads = check_runtime(runtime, memory_format, threads)
    n = threads if threads is not None else torch.get_num_threads()
    shape = [int(s) for s in input_shape]
    key = _key(module, shape, runtime, n, memory_format)
    path = _cache_file(runtime)
    if cache:
        hit = _read_cache(path).get(key)
        if hit is not None:
            return hit
    layer = _fresh(module)
    ms = paired_latency({"layer": layer}, torch.randn(*shape), runtime, threads=n, runs=runs, warmup=warmup,
                        memory_format=memory_format)["layer"].median_ms
    if cache:
        _write_cache(path, {key: ms})
    return ms


def _fresh(module: nn.Module) -> nn.Module:
    sig = _signature(module)
    if sig["type"] == "Linear":
        return nn.Linear(sig["in"], sig["out"], bias=sig["bias"]).eval()
    return conv_class(module)(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
               padding=module.padding, dilation=module.dilation, groups=module.groups,
               bias=module.bias is not None).eval()


def layer_input_shapes(model: nn.Module, inputs: Any) -> dict[str, list[int]]:
    """Name -> input shape of every convolution and linear layer in one forward of ``inputs``."""
    inputs = as_inputs(inputs)
    shapes: dict[str, list[int]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, _LAYER_KINDS):
            def hook(m: nn.Module, args: Any, name: str = name) -> None:
                if name not in shapes and args and isinstance(args[0], torch.Tensor):
                    shapes[name] = list(args[0].shape)
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        from torchslim.graph.inputs import call_model

        with torch.no_grad(), evaluating(model):
            call_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def layer_table(model: nn.Module, inputs: Any, runtime: str = "eager", *, threads: int | None = 1,
                memory_format: str | None = None, cache: bool = True, runs: int = 15) -> list[LayerLatency]:
    """Every convolution and linear layer of ``model``, timed alone in ``runtime`` on the input it
    gets in a forward of ``inputs``; slowest first, with each one's share of the summed latencies."""
    check_runtime(runtime, memory_format, threads)
    shapes = layer_input_shapes(model, inputs)
    rows = []
    for name, shape in shapes.items():
        mod = model.get_submodule(name)
        n = threads if threads is not None else torch.get_num_threads()
        hit = cache and _read_cache(_cache_file(runtime)).get(_key(mod, shape, runtime, n, memory_format)) is not None
        ms = layer_latency(mod, shape, runtime, threads=threads, memory_format=memory_format, cache=cache, runs=runs)
        rows.append(LayerLatency(name, type(mod).__name__, shape, ms, cached=bool(hit)))
    total = sum(r.median_ms for r in rows) or 1.0
    for r in rows:
        r.share = r.median_ms / total
    return sorted(rows, key=lambda r: -r.median_ms)


def fastest_widths(module: nn.Module, input_shape: Sequence[int], widths: Sequence[int], runtime: str = "eager", *,
                   threads: int | None = 1, memory_format: str | None = None, cache: bool = True) -> dict[int, float]:
    """Median milliseconds of ``module`` rebuilt with each output width of ``widths`` (cached)."""
    out: dict[int, float] = {}
    for w in sorted({int(w) for w in widths}):
        if w < 1:
            raise ConfigError(f"widths must be integers >= 1; got {w}")
        sig = _signature(module)
        if sig["type"] == "Linear":
            probe: nn.Module = nn.Linear(sig["in"], w, bias=sig["bias"])
        else:
            groups = module.groups
            if groups not in (1, module.in_channels) or w % groups:
                raise ConfigError(f"fastest_widths: width {w} does not fit a convolution with groups={groups}")
            probe = conv_class(module)(module.in_channels, w, module.kernel_size, stride=module.stride, padding=module.padding,
                                 dilation=module.dilation, groups=groups, bias=module.bias is not None)
        out[w] = layer_latency(probe, input_shape, runtime, threads=threads, memory_format=memory_format, cache=cache)
    return out


# ---- arbitrary small modules, cached under the caller's signature --------------------------------------------------
def _module_key(signature: Any, input_shape: Sequence[int], threads: int, memory_format: str | None) -> str:
    body = json.dumps({"module": signature, "input": list(input_shape), "threads": threads,
                       "memory_format": memory_format or "contiguous", "cpu": cpu_name(),
                       "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha1(body.encode()).hexdigest()[:20]


def module_latencies(modules: Mapping[str, tuple[nn.Module, Any]], input_shape: Sequence[int],
                     runtime: str = "eager", *, threads: int | None = 1, memory_format: str | None = None,
                     cache: bool = True, runs: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each module of ``modules`` (label -> ``(module, signature)``) on a random
    input of ``input_shape`` in ``runtime``.

    The modules not in the cache are timed together in one interleaved run (so load hits them alike
    and their ratios are fair), each as given: its weights are not rebuilt. ``signature`` is any
    JSON-able value that says what the module is (type, widths, ranks...); with ``cache`` the median
    is kept in the runtime's per-machine cache under that signature, the input shape, the threads,
    the memory format, the CPU and the torch version, and read back by any later call with the same.

    Raises:
        ConfigError: a bad runtime / threads / memory format, a signature that is not JSON, or a
            module the runtime cannot take.
    """
    runtime, memory_format, threads = check_runtime(runtime, memory_format, threads)
    n = threads if threads is not None else torch.get_num_threads()
    shape = [int(s) for s in input_shape]
    keys: dict[str, str] = {}
    for label, (_, signature) in modules.items():
        try:
            keys[label] = _module_key(signature, shape, n, memory_format)
        except TypeError as exc:
            raise ConfigError(f"module_latencies: the signature of {label!r} must be JSON ({exc})") from None
    path = _cache_file(runtime)
    known = _read_cache(path) if cache else {}
    out = {label: known[k] for label, k in keys.items() if k in known}
    todo = {label: mod for label, (mod, _) in modules.items() if label not in out}
    if todo:
        timings = paired_latency(todo, torch.randn(*shape), runtime, threads=n, runs=runs, warmup=warmup,
                                 memory_format=memory_format)
        fresh = {label: t.median_ms for label, t in timings.items()}
        out.update(fresh)
        if cache:
            _write_cache(path, {keys[label]: ms for label, ms in fresh.items()})
    return {label: out[label] for label in modules}


def module_latency(module: nn.Module, input_shape: Sequence[int], runtime: str = "eager", *, signature: Any,
                   threads: int | None = 1, memory_format: str | None = None, cache: bool = True, runs: int = 15,
                   warmup: int = 2) -> float:
    """Median milliseconds of ``module`` on a random input of ``input_shape`` in ``runtime``, cached
    under ``signature`` (see :func:`module_latencies`).

    Example:
        >>> import torch
        >>> seq = torch.nn.Sequential(torch.nn.Linear(32, 4), torch.nn.Linear(4, 32))
        >>> module_latency(seq, (8, 32), signature={"svd": [32, 4, 32]}, cache=False, runs=3, warmup=1) > 0
        True
    """
    return module_latencies({"module": (module, signature)}, input_shape, runtime, threads=threads,
                            memory_format=memory_format, cache=cache, runs=runs, warmup=warmup)["module"]
