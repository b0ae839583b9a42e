"""Parity: run an exported artifact back and compare it with the PyTorch model it came from.

Every export is loaded by its own runtime (ONNX Runtime, ``torch.jit.load``,
``torch.export.load``) and run on the example inputs plus a few random ones; random inputs keep
the example's dtypes and value ranges (integer token ids stay integers within the example's
range, booleans and constant tensors such as all-ones attention masks stay as they are). Where
the format has a dynamic batch axis, one random case also uses another batch size.

The differences reported per case and overall:

* ``max_abs``: the largest ``|exported - pytorch|`` over every output element;
* ``max_rel``: ``max_abs`` divided by the largest ``|pytorch|`` of that output (relative to the
  output's scale, so values near zero do not blow it up).

A case passes when ``max_abs <= atol + rtol * max|pytorch| + steps * step`` for every output,
and shapes and dtypes match. ``step`` is one quantization step of the PyTorch output's range,
``(max - min) / (2**bits - 1)``, or the output's own quantization step where the reference
knows it (an int8 program whose outputs are quantized: the ``output_steps`` attribute of the
reference, one per output, ``None`` where unknown): quantized exports are checked in such steps,
since ONNX Runtime's integer kernels round differently from the float simulation in PyTorch
(and quantize tensors the simulation leaves in float). For those, each case also reports the
SQNR of output 0 (dB) and, for ``(batch, classes)`` outputs, the share of rows whose top-1 class
agrees.

Example:
    >>> import torch
    >>> from torchslim.export.parity import Tolerance, compare_outputs
    >>> case = compare_outputs([torch.ones(2)], [torch.ones(2) + 1e-7], Tolerance(1e-5, 1e-5), "example")
    >>> case.ok
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim._utils import evaluating, is_int, is_number
from torchslim.errors import ConfigError, TorchslimError
from torchslim.export._base import batched, tensor_leaves
from torchslim.graph.inputs import Inputs

__all__ = [
    "ParityCase",
    "ParityError",
    "ParityReport",
    "Tolerance",
    "check_parity",
    "compare_outputs",
    "random_inputs",
]


class ParityError(TorchslimError, ValueError):
    """An exported artifact computes something else than the model; ``report`` holds the numbers."""

    def __init__(self, message: str, report: ParityReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Tolerance:
    """Allowed difference: ``max_abs <= atol + rtol * max|reference| + steps * step`` per output.

    ``step`` is one ``bits``-bit quantization step of the reference output's range (see the
    module docstring); ``steps=0`` (the default) leaves it out.

    Example:
        >>> Tolerance.from_dict(Tolerance(1e-4, 1e-3).to_dict())
        Tolerance(atol=0.0001, rtol=0.001, steps=0.0, bits=8)
        >>> Tolerance(0, 0, steps=8).describe()
        '8 quantization steps of the output range (8-bit)'
    """

    atol: float
    rtol: float
    steps: float = 0.0
    bits: int = 8

    def __post_init__(self) -> None:
        for name in ("atol", "rtol", "steps"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ConfigError(f"Tolerance.{name} must be a finite number >= 0; got {value!r}")
        if not is_int(self.bits) or not 2 <= self.bits <= 16:
            raise ConfigError(f"Tolerance.bits must be an integer from 2 to 16; got {self.bits!r}")

    def bound(self, scale: float, step: float = 0.0) -> float:
        """The allowed ``max_abs`` for an output whose largest magnitude is ``scale`` and whose
        range makes one quantization step ``step``."""
        return self.atol + self.rtol * scale + self.steps * step

    def describe(self) -> str:
        """The tolerance in words, for messages."""
        parts = [f"atol={self.atol:g}, rtol={self.rtol:g}"] if self.atol or self.rtol or not self.steps else []
        if self.steps:
            parts.append(f"{self.steps:g} quantization steps of the output range ({self.bits}-bit)")
        return " + ".join(parts)

    def to_dict(self) -> dict[str, float]:
        d = {"atol": float(self.atol), "rtol": float(self.rtol)}
        if self.steps:
            d.update(steps=float(self.steps), bits=int(self.bits))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tolerance:
        return cls(**d)

    @classmethod
    def coerce(cls, value: Any, default: tuple[float, float]) -> Tolerance:
        """``None`` -> ``default``; a number -> the same atol and rtol; ``(atol, rtol)`` or
        ``(atol, rtol, steps)``; a dict; a Tolerance."""
        if value is None:
            return cls(*default)
        if isinstance(value, Tolerance):
            return value
        if is_number(value):
            return cls(float(value), float(value))
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, Sequence) and len(value) in (2, 3) and not isinstance(value, str):
            return cls(*value)
        raise ConfigError(f"tolerance must be a number, (atol, rtol), (atol, rtol, steps), a dict or a Tolerance; "
                          f"got {value!r}")


@dataclass(frozen=True)
class ParityCase:
    """One input set run through both the model and the artifact."""

    name: str
    batch: int
    max_abs: float
    max_rel: float
    ok: bool
    problem: str = ""  # shape/dtype/count mismatch or non-finite values, when there is one
    max_steps: float | None = None  # max_abs in quantization steps of the output (steps tolerances)
    sqnr_db: float | None = None  # SQNR of output 0 (steps tolerances)
    top1_agreement: float | None = None  # share of rows with the same argmax ((batch, classes) outputs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ParityReport:
    """Parity of one artifact: every case and the worst differences over them."""

    format: str
    tolerance: Tolerance
    cases: tuple[ParityCase, ...] = field(default_factory=tuple)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.cases), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((c.max_rel for c in self.cases), default=0.0)

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(c.ok for c in self.cases)

    def summary(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return (
            f"{self.format}: {verdict} over {len(self.cases)} input sets, max abs diff {self.max_abs:.3g}, "
            f"max rel diff {self.max_rel:.3g}{self._quant_summary()} (tolerance {self.tolerance.describe()})"
        )

    def _quant_summary(self) -> str:
        steps = [c.max_steps for c in self.cases if c.max_steps is not None]
        sqnr = [c.sqnr_db for c in self.cases if c.sqnr_db is not None]
        top1 = [c.top1_agreement for c in self.cases if c.top1_agreement is not None]
        text = f", max {max(steps):.2f} quantization steps" if steps else ""
        text += f", min SQNR {min(sqnr):.1f} dB" if sqnr else ""
        return text + (f", top-1 agreement {min(top1):.0%}" if top1 else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "tolerance": self.tolerance.to_dict(),
            "ok": self.ok,
            "cases": [c.to_dict() for c in self.cases],
        }


def _random_like(x: torch.Tensor, batch: int | None, gen: torch.Generator) -> torch.Tensor:
    shape = list(x.shape)
    if batch is not None and x.dim() > 0:
        shape[0] = batch
    if x.dtype == torch.bool or x.numel() == 0:  # masks: keep the example's values
        return batched(Inputs((x,)), batch).args[0] if batch is not None and x.dim() > 0 else x.clone()
    lo, hi = x.min(), x.max()
    if lo == hi:  # constant (all-ones masks, zero token types): keep it constant
        return torch.full(shape, lo.item(), dtype=x.dtype, device=x.device)
    if x.is_floating_point():
        xf = x.double()
        out = torch.randn(shape, generator=gen, dtype=torch.float64) * xf.std().item() + xf.mean().item()
        return out.to(dtype=x.dtype, device=x.device)
    return torch.randint(int(lo), int(hi) + 1, shape, generator=gen, dtype=torch.int64).to(dtype=x.dtype, device=x.device)


def random_inputs(inputs: Inputs, *, batch: int | None = None, seed: int = 0) -> Inputs:
    """Random inputs shaped like ``inputs`` (first dimension set to ``batch`` when given).

    Float tensors get Gaussian values with the example's mean and spread; integer tensors
    uniform integers in the example's ``[min, max]``; booleans and constant tensors are kept.
    Non-tensor inputs pass through unchanged.

    Example:
        >>> ids = torch.tensor([[2, 7, 5]])
        >>> r = random_inputs(Inputs((ids,)), batch=4).args[0]
        >>> r.shape, r.dtype, bool(r.min() >= 2 and r.max() <= 7)
        (torch.Size([4, 3]), torch.int64, True)
    """
    gen = torch.Generator().manual_seed(seed)

    def make(x: Any) -> Any:
        return _random_like(x, batch, gen) if isinstance(x, torch.Tensor) else x

    args, kwargs = torch.utils._pytree.tree_map(make, (inputs.args, inputs.kwargs))
    return Inputs(tuple(args), dict(kwargs))


def compare_outputs(
    reference: Sequence[torch.Tensor], exported: Sequence[torch.Tensor], tolerance: Tolerance, name: str, batch: int = 1,
    known_steps: Sequence[float | None] | None = None,
) -> ParityCase:
    """Compare two output lists element-wise (see the module docstring for the measures).

    ``known_steps`` (one entry per output, ``None`` where unknown) are the quantization steps the
    reference really has on its outputs (an int8 program's output scale); where given, a step
    tolerance counts in them instead of in steps of the output's range.
    """
    if len(reference) != len(exported):
        return ParityCase(name, batch, math.inf, math.inf, False,
                          f"{len(exported)} outputs where the model gives {len(reference)}")
    worst_abs = worst_rel = worst_steps = 0.0
    ok, problem = True, ""
    for i, (ref, out) in enumerate(zip(reference, exported)):
        ref, out = ref.detach().cpu(), out.detach().cpu()
        if tuple(ref.shape) != tuple(out.shape):
            return ParityCase(name, batch, math.inf, math.inf, False,
                              f"output {i} has shape {list(out.shape)}, the model's {list(ref.shape)}")
        if ref.numel() == 0:
            continue
        if ref.dtype == torch.bool or out.dtype == torch.bool:
            diff = float((ref != out).sum())
            scale, step = 1.0, 0.0
        else:
            r, o = ref.double(), out.double()
            finite = torch.isfinite(r)
            if not torch.equal(finite, torch.isfinite(o)) or not torch.equal(r[~finite], o[~finite]):
                ok, problem = False, problem or f"output {i} has inf/nan where the model's does not (or the reverse)"
            diff = float((r[finite] - o[finite]).abs().max()) if finite.any() else 0.0
            scale = float(r[finite].abs().max()) if finite.any() else 0.0
            step = float(r[finite].max() - r[finite].min()) / (2**tolerance.bits - 1) if finite.any() else 0.0
            if known_steps is not None and i < len(known_steps) and known_steps[i]:
                step = float(known_steps[i])
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
        if tolerance.steps:
            worst_steps = max(worst_steps, diff / step if step > 0 else (0.0 if diff == 0 else math.inf))
        if diff > tolerance.bound(scale, step):
            ok = False
    if not tolerance.steps:
        return ParityCase(name, batch, worst_abs, worst_rel, ok, problem)
    return ParityCase(name, batch, worst_abs, worst_rel, ok, problem, max_steps=worst_steps,
                      sqnr_db=_sqnr_db(reference[0], exported[0]), top1_agreement=_top1(reference[0], exported[0]))


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float | None:
    """``10 log10(sum ref^2 / sum (ref - out)^2)`` (inf when equal; None for non-float outputs)."""
    if not ref.is_floating_point() or ref.numel() == 0:
        return None
    r, o = ref.detach().cpu().double(), out.detach().cpu().double()
    noise = float(((r - o) ** 2).sum())
    signal = float((r**2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _top1(ref: torch.Tensor, out: torch.Tensor) -> float | None:
    """Share of rows whose argmax agrees, for ``(batch, classes)`` outputs (None otherwise)."""
    if ref.dim() != 2 or ref.shape[1] < 2 or not ref.is_floating_point():
        return None
    return float((ref.argmax(1).cpu() == out.argmax(1).cpu()).double().mean())


def _reference(model: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    with evaluating(model), torch.no_grad():
        return tensor_leaves(model(*inputs.args, **inputs.kwargs))


def check_parity(
    model: nn.Module,
    run: Callable[[Inputs], list[torch.Tensor]],
    inputs: Inputs,
    *,
    format: str,
    tolerance: Tolerance,
    random_cases: int = 2,
    other_batch: int | None = None,
    seed: int = 0,
) -> ParityReport:
    """Run ``run`` (a loaded artifact) and ``model`` on the same inputs and compare.

    Args:
        model: the PyTorch model (run in eval mode under ``no_grad``; its modes are restored).
        run: the artifact as a function of :class:`Inputs` returning its output tensors.
        inputs: the example inputs.
        format: name for the report.
        tolerance: the allowed difference.
        random_cases: how many random input sets besides the example (>= 0).
        other_batch: when given, the last random case uses this batch size (dynamic batch).
        seed: seed of the random inputs.

    Returns:
        The :class:`ParityReport` (its ``ok`` says whether every case was within tolerance).

    Raises:
        ConfigError: ``random_cases`` is not an integer >= 0.
    """
    if not is_int(random_cases) or random_cases < 0:
        raise ConfigError(f"random_cases must be an integer >= 0; got {random_cases!r}")
    cases = [("example", inputs)]
    for k in range(random_cases):
        batch = other_batch if (other_batch is not None and k == random_cases - 1) else None
        r = random_inputs(inputs, batch=batch, seed=seed + k)
        cases.append((f"random{k}" + (f"_batch{batch}" if batch else ""), r))
    results = []
    for name, case_inputs in cases:
        ref = _reference(model, case_inputs)
        try:
            out = run(case_inputs)
        except Exception as exc:  # the runtime's own errors: report them as a failed case
            msg = " ".join(str(exc).split())[:300]
            results.append(ParityCase(name, case_inputs.batch_size, math.inf, math.inf, False,
                                      f"the exported model raised {type(exc).__name__}: {msg}"))
            continue
        results.append(compare_outputs(ref, out, tolerance, name, case_inputs.batch_size,
                                       known_steps=getattr(model, "output_steps", None)))
    return ParityReport(format=format, tolerance=tolerance, cases=tuple(results))
