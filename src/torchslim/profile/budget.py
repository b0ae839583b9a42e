"""What a compressed model may cost: :class:`Budget`, one value every verb reads.

A budget is a fraction of the original: ``Budget(macs=0.5)``, ``Budget(params=0.3)`` or
``Budget(latency=0.6)``. A latency budget is measured, not estimated, in the runtime the model
ships to (``runtime``: ``eager``, ``compile``, ``onnxruntime`` or ``xnnpack``, see
:mod:`torchslim.export.runtime_latency`), with ``threads`` intra-op threads, inputs repeated to
``batch`` rows (None: the example inputs as given) and, for the PyTorch runtimes, the model in
``memory_format`` (None: the one the verb finds faster). ``prune_channels_``, ``factorize_``,
``search`` and the recipes read the same fields.

Example:
    >>> b = Budget(latency=0.5, runtime="onnxruntime", threads=2)
    >>> b.metric, b.fraction, b.runtime
    ('latency', 0.5, 'onnxruntime')
    >>> Budget.from_dict(b.to_dict()) == b
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from torchslim._config import ConfigDict
from torchslim._utils import is_int, is_number
from torchslim.errors import ConfigError

__all__ = ["MEMORY_FORMATS", "RUNTIMES", "Budget"]

#: The runtimes a latency budget may be measured in (the deploy runtimes of the export family).
RUNTIMES = ("eager", "compile", "onnxruntime", "xnnpack")
MEMORY_FORMATS = ("contiguous", "channels_last")


@dataclass(frozen=True)
class Budget(ConfigDict):
    """What the compressed model may cost, as a fraction of the original (e.g. ``macs=0.5``).

    Exactly one of ``macs``, ``params`` or ``latency`` (fractions in (0, 1]). ``runtime``,
    ``threads``, ``batch`` and ``memory_format`` say where a latency budget is measured (ignored
    for MACs and params).
    """

    macs: float | None = None
    params: float | None = None
    latency: float | None = None
    tolerance: float = 0.02
    runtime: str = "eager"
    threads: int | None = None
    batch: int | None = None
    memory_format: str | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("macs", self.macs), ("params", self.params), ("latency", self.latency)) if v is not None}
        if len(given) != 1:
            raise ConfigError(f"Budget needs exactly one of macs, params or latency; got {sorted(given) or 'none'}")
        (k, v), = given.items()
        if not is_number(v) or not 0 < v <= 1:
            raise ConfigError(f"Budget {k} must be a fraction in (0, 1] of the original; got {v!r}")
        if not is_number(self.tolerance) or not 0 < self.tolerance < 0.5:
            raise ConfigError(f"Budget tolerance must be in (0, 0.5); got {self.tolerance!r}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"Budget runtime must be one of {', '.join(RUNTIMES)}; got {self.runtime!r}")
        for name in ("threads", "batch"):
            n = getattr(self, name)
            if n is not None and (not is_int(n) or n < 1):
                raise ConfigError(f"Budget {name} must be an integer >= 1 (or None); got {n!r}")
        if self.memory_format is not None and self.memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"Budget memory_format must be one of {', '.join(MEMORY_FORMATS)} (or None); "
                              f"got {self.memory_format!r}")

    @property
    def metric(self) -> str:
        return "macs" if self.macs is not None else "params" if self.params is not None else "latency"

    @property
    def fraction(self) -> float:
        return float(getattr(self, self.metric))
