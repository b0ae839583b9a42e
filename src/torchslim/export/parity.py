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

A case passes when ``max_abs <= atol + rtol * max|pytorch|`` for every output, and shapes and
dtypes match.

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
from torchslim.graph._inputs import Inputs

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
    """Allowed difference: ``max_abs <= atol + rtol * max|reference|`` per output.

    Example:
        >>> Tolerance.from_dict(Tolerance(1e-4, 1e-3).to_dict())
        Tolerance(atol=0.0001, rtol=0.001)
    """

    atol: float
    rtol: float

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ConfigError(f"Tolerance.{name} must be a finite number >= 0; got {value!r}")

    def bound(self, scale: float) -> float:
        """The allowed ``max_abs`` for an output whose largest magnitude is ``scale``."""
        return self.atol + self.rtol * scale

    def to_dict(self) -> dict[str, float]:
        return {"atol": float(self.atol), "rtol": float(self.rtol)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tolerance:
        return cls(**d)

    @classmethod
    def coerce(cls, value: Any, default: tuple[float, float]) -> Tolerance:
        """``None`` -> ``default``; a number -> the same atol and rtol; a pair; a dict; a Tolerance."""
        if value is None:
            return cls(*default)
        if isinstance(value, Tolerance):
            return value
        if is_number(value):
            return cls(float(value), float(value))
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, Sequence) and len(value) == 2 and not isinstance(value, str):
            return cls(*value)
        raise ConfigError(f"tolerance must be a number, (atol, rtol), a dict or a Tolerance; got {value!r}")


@dataclass(frozen=True)
class ParityCase:
    """One input set run through both the model and the artifact."""

    name: str
    batch: int
    max_abs: float
    max_rel: float
    ok: bool
    problem: str = ""  # shape/dtype/count mismatch or non-finite values, when there is one

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
            f"max rel diff {self.max_rel:.3g} (tolerance atol={self.tolerance.atol:g}, rtol={self.tolerance.rtol:g})"
        )

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
    reference: Sequence[torch.Tensor], exported: Sequence[torch.Tensor], tolerance: Tolerance, name: str, batch: int = 1
) -> ParityCase:
    """Compare two output lists element-wise (see the module docstring for the measures)."""
    if len(reference) != len(exported):
        return ParityCase(name, batch, math.inf, math.inf, False,
                          f"{len(exported)} outputs where the model gives {len(reference)}")
    worst_abs = worst_rel = 0.0
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
            scale = 1.0
        else:
            r, o = ref.double(), out.double()
            finite = torch.isfinite(r)
            if not torch.equal(finite, torch.isfinite(o)) or not torch.equal(r[~finite], o[~finite]):
                ok, problem = False, problem or f"output {i} has inf/nan where the model's does not (or the reverse)"
            diff = float((r[finite] - o[finite]).abs().max()) if finite.any() else 0.0
            scale = float(r[finite].abs().max()) if finite.any() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
        if diff > tolerance.bound(scale):
            ok = False
    return ParityCase(name, batch, worst_abs, worst_rel, ok, problem)


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
        results.append(compare_outputs(ref, out, tolerance, name, case_inputs.batch_size))
    return ParityReport(format=format, tolerance=tolerance, cases=tuple(results))
