"""Int8 convs on oneDNN with primitives built once: ``torchslim_onednn::qconv2d``.

PyTorch's ``onednn::qconv_pointwise`` (what inductor's x86 int8 lowering calls) builds its oneDNN
primitive descriptor at every call. At batch 1 that is about 55 us per conv on this project's
CPUs: a compiled int8 MobileNetV2 spent 2.92 of its 5.97 ms around the kernels
(``benchmarks/onednn_split.py``). PyTorch does not export its oneDNN, so torchslim ships a small
C++ operator (``csrc/onednn_qconv.cpp``) built against a separate oneDNN: each distinct call
(weight, input shape, scales, post-ops) creates its primitive and reorders its weights once, and
later calls only execute it (about 2 us per call outside the kernel,
``benchmarks/onednn_cached_conv.py``).

The operator computes, for a uint8 input ``x`` (per-tensor scale / zero point), int8 weights with
per-output-channel scales (zero points 0) and a float bias::

    y = round(act(x_scale * w_scale * conv(x - x_zp, w) + bias [+ accum_scale * (accum - accum_zp)]) / y_scale) + y_zp

saturated to uint8 and written channels-last, ``act`` none / ReLU / clamp to [0, 6]; ``accum``
is a residual operand read on its own uint8 grid (oneDNN's ``sum`` post-op). That is the math of
the decomposed pattern the Int8 layers trace, so :func:`use_cached_qconv` (run by
``ts.quantize.compile``'s graph pass) replaces each ``dequantize -> conv [-> add] [-> ReLU/ReLU6]
-> quantize`` chain of a 2-D Int8Conv with one call. Convs it cannot take (a float consumer, a
1-D / 3-D conv, a transposed conv) and large ones (over :data:`MAX_MACS` multiply-adds, where
PyTorch's per-call cost is small and its newer oneDNN's kernels are faster) keep the oneDNN
lowering of torchao's x86 passes.

Where it comes from: the ``onednn-cpu-gomp`` wheel (oneDNN 3.2 for CPUs, GNU OpenMP) and the
headers of ``onednn-devel`` (whose ``dnnl_config.h`` names the SYCL runtime; a copy with the CPU /
OpenMP runtime is written beside the build). ``make setup`` installs both (``--no-deps``). The
operator is compiled on first use with ``torch.utils.cpp_extension`` (about 30 s, then cached in
``$TORCHSLIM_CACHE`` or ``~/.cache/torchslim``). Without the wheels, or with
``TORCHSLIM_ONEDNN=0``, :func:`available` is False, :func:`why_unavailable` says why, and
``ts.quantize.compile`` uses PyTorch's kernels as before.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["MAX_MACS", "available", "why_unavailable", "qconv2d", "use_cached_qconv", "cached_primitives"]

SOURCE = Path(__file__).with_name("csrc") / "onednn_qconv.cpp"
_state: dict[str, Any] = {"tried": False, "ok": False, "why": None}


def _cache_dir() -> Path:
    root = os.environ.get("TORCHSLIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "torchslim")
    return Path(root)


def _locate() -> tuple[Path, Path]:
    """(the include folder with ``oneapi/dnnl/dnnl.h``, the folder with ``libdnnl.so.3``)."""
    for prefix in dict.fromkeys([Path(sys.prefix), Path(sys.base_prefix)]):
        inc, lib = prefix / "include", prefix / "lib"
        if (inc / "oneapi" / "dnnl" / "dnnl.h").is_file() and (lib / "libdnnl.so.3").exists():
            return inc, lib
    raise FileNotFoundError("oneDNN not found (pip install --no-deps onednn-cpu-gomp==2023.2.0 onednn-devel==2024.2.0; "
                            "`make setup` does)")


def _config_header(include: Path, build: Path) -> Path:
    """A copy of ``dnnl_config.h`` naming the CPU / OpenMP runtime the library was built with."""
    text = (include / "oneapi" / "dnnl" / "dnnl_config.h").read_text()
    for macro in ("DNNL_CPU_THREADING_RUNTIME", "DNNL_CPU_RUNTIME"):
        text = re.sub(rf"#define {macro} \w+", f"#define {macro} DNNL_RUNTIME_OMP", text)
    text = re.sub(r"#define DNNL_GPU_RUNTIME \w+", "#define DNNL_GPU_RUNTIME DNNL_RUNTIME_NONE", text)
    out = build / "include" / "oneapi" / "dnnl"
    out.mkdir(parents=True, exist_ok=True)
    target = out / "dnnl_config.h"
    if not target.is_file() or target.read_text() != text:  # atomically: another process may be compiling with it
        tmp = out / f"dnnl_config.h.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, target)
    return build / "include"


def _load() -> None:
    from torch.utils.cpp_extension import load

    if os.environ.get("TORCHSLIM_ONEDNN", "1") == "0":
        raise RuntimeError("turned off by TORCHSLIM_ONEDNN=0")
    if not sys.platform.startswith("linux"):
        raise RuntimeError("built for Linux only")
    include, lib = _locate()
    tag = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + str(include).encode()).hexdigest()[:12]
    build = _cache_dir() / f"onednn_qconv_{tag}"
    build.mkdir(parents=True, exist_ok=True)
    config = _config_header(include, build)
    load(name="torchslim_onednn_qconv", sources=[str(SOURCE)], build_directory=str(build), is_python_module=False,
         extra_include_paths=[str(config), str(include)], extra_cflags=["-O2", "-fopenmp"],
         extra_ldflags=[f"-L{lib}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib}", "-lgomp"], verbose=False)

    @torch.library.register_fake("torchslim_onednn::qconv2d")
    def _fake(x: torch.Tensor, x_scale: float, x_zp: int, w: torch.Tensor, w_scale: torch.Tensor, bias: Any,
              stride: list[int], padding: list[int], dilation: list[int], groups: int, y_scale: float, y_zp: int, act: int,
              accum: Any, accum_scale: float, accum_zp: int) -> torch.Tensor:
        n, _, h, w_ = x.shape
        kh, kw = w.shape[2], w.shape[3]
        oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (w_ + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        return torch.empty((n, w.shape[0], oh, ow), dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)


def available() -> bool:
    """Whether ``torchslim_onednn::qconv2d`` is built and loaded (built on the first call)."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _load()
            _state["ok"] = True
        except Exception as exc:  # noqa: BLE001 - any failure means: use PyTorch's kernels
            _state["why"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1][:300]}"
    return bool(_state["ok"])


def why_unavailable() -> str | None:
    """Why :func:`available` is False (``None`` when it is True or was not asked yet)."""
    return None if _state["ok"] else _state["why"]


def qconv2d(x: torch.Tensor, x_scale: float, x_zp: int, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
            stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1),
            groups: int = 1, *, y_scale: float, y_zp: int, act: str = "none", accum: torch.Tensor | None = None,
            accum_scale: float = 0.0, accum_zp: int = 0) -> torch.Tensor:
    """Call the operator (see the module doc); ``act``: ``"none"``, ``"relu"`` or ``"relu6"``."""
    if not available():
        raise RuntimeError(f"torchslim's oneDNN conv is not available: {why_unavailable()}")
    code = {"none": 0, "relu": 1, "relu6": 2}[act]
    return torch.ops.torchslim_onednn.qconv2d(x, float(x_scale), int(x_zp), w, w_scale, bias, list(stride), list(padding),
                                              list(dilation), int(groups), float(y_scale), int(y_zp), code, accum,
                                              float(accum_scale), int(accum_zp))


def cached_primitives() -> int:
    """How many primitives the operator holds (one per distinct call)."""
    return int(torch.ops.torchslim_onednn.cached_primitives()) if available() else 0


# --------------------------------------------------------------------------- the graph pass

_AT = torch.ops.aten

#: Convs with more multiply-adds than this keep PyTorch's oneDNN kernel. PyTorch's per-call cost
#: (tens of microseconds) is small beside such a conv's kernel (about 0.5 ms at 1 thread), and the
#: oneDNN inside torch 2.14.1 is newer than the 3.2 library this operator links: on ResNet-18's
#: 3x3 convs (58-118 M multiply-adds) the whole model was 3.07x faster than fp32 with every conv
#: on this operator and 3.20x with PyTorch's (``benchmarks/torch_int8.py --threads 1``, AMD EPYC).
#: MobileNetV2's convs (at most 20 M) and ResNet's 1x1 downsamples (6-13 M) are under it.
MAX_MACS = 32_000_000


def _node(x: Any, target: Any) -> bool:
    return getattr(x, "op", None) == "call_function" and x.target == target


def _uint8_dq(node: Any) -> bool:
    qd = torch.ops.quantized_decomposed
    return _node(node, qd.dequantize_per_tensor.default) and len(node.args) == 6 and not node.kwargs \
        and node.args[3:] == (0, 255, torch.uint8)


def _uint8_q(node: Any) -> bool:
    qd = torch.ops.quantized_decomposed
    return _node(node, qd.quantize_per_tensor.default) and len(node.args) == 6 and not node.kwargs \
        and node.args[3:] == (0, 255, torch.uint8)


def _only_user(node: Any) -> Any:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _activation(node: Any) -> tuple[int, Any]:
    """The ReLU / ReLU6 that follows ``node`` alone: ``(0 none | 1 relu | 2 clamp [0, 6], last node)``."""
    u = _only_user(node)
    if u is None or u.kwargs:
        return 0, node
    if _node(u, _AT.relu.default):
        return 1, u
    if _node(u, _AT.hardtanh.default) and tuple(u.args[1:]) == (0.0, 6.0):
        return 2, u
    if _node(u, _AT.clamp.default) and tuple(u.args[1:]) == (0.0, 6.0):
        return 2, u
    if _node(u, _AT.clamp_min.default) and u.args[1] == 0.0:
        v = _only_user(u)
        if v is not None and not v.kwargs and _node(v, _AT.clamp_max.default) and v.args[1] == 6.0:
            return 2, v
        return 1, u
    return 0, node


def use_cached_qconv(graph: torch.fx.Graph, max_macs: int | None = None) -> int:
    """Replace every ``dequantize(x_u8) -> conv2d(., dequantize_per_channel(w_i8)) [-> add(.,
    dequantize(t_u8))] [-> ReLU / ReLU6] -> quantize`` chain by one ``torchslim_onednn::qconv2d``
    (uint8 in, uint8 out), on inductor's aten graph; returns how many. A chain whose output has
    any other reader, or a conv of more than ``max_macs`` multiply-adds (default :data:`MAX_MACS`),
    stays as it is."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    qd = torch.ops.quantized_decomposed
    op = torch.ops.torchslim_onednn.qconv2d.default
    max_macs = MAX_MACS if max_macs is None else max_macs
    order = {n: i for i, n in enumerate(graph.nodes)}
    done = 0
    for conv in list(graph.nodes):
        if not _node(conv, _AT.convolution.default) or len(conv.args) != 9 or conv.kwargs:
            continue
        dq_x, dq_w, bias, stride, padding, dilation, transposed, _, groups = conv.args
        if transposed or not _uint8_dq(dq_x) or not _node(dq_w, qd.dequantize_per_channel.default):
            continue
        if len(dq_w.args) != 7 or dq_w.kwargs or dq_w.args[3:] != (0, -128, 127, torch.int8):
            continue
        val, out, weight = dq_x.args[0].meta.get("val"), conv.meta.get("val"), dq_w.args[0].meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 4 or val.device.type != "cpu" or len(stride) != 2:
            continue
        if not isinstance(out, torch.Tensor) or not isinstance(weight, torch.Tensor) \
                or out.numel() * weight[0].numel() > max_macs:
            continue
        last, accum = conv, None
        add = _only_user(conv)
        if add is not None and _node(add, _AT.add.Tensor) and len(add.args) == 2 and not add.kwargs:
            other = add.args[1] if add.args[0] is conv else add.args[0]
            if other is not conv and _uint8_dq(other) and other.args[0].meta.get("val") is not None \
                    and tuple(other.args[0].meta["val"].shape) == tuple(conv.meta["val"].shape):
                accum, last = other, add
        act, last = _activation(last)
        qs = sorted(last.users, key=order.get)
        if not qs or not all(_uint8_q(q) and q.args[1:] == qs[0].args[1:] for q in qs):
            continue
        y_scale, y_zp = qs[0].args[1], qs[0].args[2]
        args = (dq_x.args[0], dq_x.args[1], dq_x.args[2], dq_w.args[0], dq_w.args[1], bias, list(stride), list(padding),
                list(dilation), groups, y_scale, y_zp, act, accum.args[0] if accum is not None else None,
                accum.args[1] if accum is not None else 0.0, accum.args[2] if accum is not None else 0)
        with graph.inserting_before(qs[0]):
            new = graph.call_function(op, args)
        fake = detect_fake_mode([a.meta.get("val") for a in (args[0], args[3], args[4]) if hasattr(a, "meta")])
        if fake is not None:
            with fake:
                vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
                new.meta["val"] = op(*vals)
            new.meta["tensor_meta"] = _extract_tensor_metadata(new.meta["val"])  # read by torchao's x86 patterns
        for q in qs:
            q.replace_all_uses_with(new)
            graph.erase_node(q)
        done += 1
    if done:
        # the operator writes channels-last, where the traced graph had contiguous tensors: a view
        # (a flatten after a pool, say) of such a tensor becomes a reshape, which copies only when
        # the strides ask for it (the graph is functional: nothing aliases through it)
        for node in graph.nodes:
            if _node(node, _AT.view.default) or _node(node, _AT._unsafe_view.default):
                node.target = _AT.reshape.default
        graph.eliminate_dead_code()
    return done
