"""``binarize.summary``: packed bytes and the share of binary MACs, beside ``ts.profile`` (as Larq's
``summary`` reports them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from torchslim.binarize.layers import BINARY_TYPES

__all__ = ["BinaryLayerSummary", "BinarySummary", "summary"]


@dataclass
class BinaryLayerSummary:
    """One binary layer: its MACs by precision and its weight bytes packed vs fp32."""

    name: str
    type: str
    method: str
    params: int
    macs: int  # multiply-accumulates of the layer's binary product
    binary_macs: int  # of those, the ones with both operands binary (0 for BWN)
    packed_bytes: int  # sign words + scales as stored
    fp32_bytes: int  # the same weight as dense float32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BinarySummary:
    """The model's profile plus what binarization changed (see :func:`summary`)."""

    layers: list[BinaryLayerSummary]
    total_macs: int
    size_bytes: int | None
    profile: Any = field(repr=False, default=None)

    @property
    def binary_macs(self) -> int:
        """MACs with both operands binary (XNOR-popcount work)."""
        return sum(r.binary_macs for r in self.layers)

    @property
    def binary_weight_macs(self) -> int:
        """MACs with binary weights and real activations (BWN layers)."""
        return sum(r.macs - r.binary_macs for r in self.layers)

    @property
    def binary_mac_share(self) -> float:
        """Fraction of all the model's MACs that are binary (both operands)."""
        return self.binary_macs / self.total_macs if self.total_macs else 0.0

    @property
    def packed_bytes(self) -> int:
        return sum(r.packed_bytes for r in self.layers)

    @property
    def fp32_bytes(self) -> int:
        return sum(r.fp32_bytes for r in self.layers)

    @property
    def compression(self) -> float:
        """fp32 bytes / packed bytes of the binarized weights."""
        return self.fp32_bytes / self.packed_bytes if self.packed_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [r.to_dict() for r in self.layers],
            "total_macs": self.total_macs,
            "binary_macs": self.binary_macs,
            "binary_weight_macs": self.binary_weight_macs,
            "binary_mac_share": self.binary_mac_share,
            "packed_bytes": self.packed_bytes,
            "fp32_bytes": self.fp32_bytes,
            "compression": self.compression,
            "size_bytes": self.size_bytes,
        }

    def table(self) -> Any:
        """A rich table, one row per binary layer, totals in the title."""
        from rich.table import Table

        t = Table(
            title=(
                f"binary layers: {100 * self.binary_mac_share:.1f}% of {self.total_macs:,} MACs are binary; "
                f"weights {self.fp32_bytes:,} B fp32 -> {self.packed_bytes:,} B packed ({self.compression:.1f}x)"
            )
        )
        for col in ("layer", "type", "method", "params", "binary MACs", "packed B", "fp32 B", "ratio"):
            t.add_column(col, justify="left" if col in ("layer", "type", "method") else "right")
        for r in self.layers:
            t.add_row(
                r.name, r.type, r.method, f"{r.params:,}", f"{r.binary_macs:,}", f"{r.packed_bytes:,}",
                f"{r.fp32_bytes:,}", f"{r.fp32_bytes / max(r.packed_bytes, 1):.1f}x",
            )
        from torchslim._text import printable

        return printable(t)  # plain text under print(), the rich table on a console


def summary(model: nn.Module, inputs: Any = None, *, latency: bool = False) -> BinarySummary:
    """Profile ``model`` and account for its binary layers.

    Args:
        model: any model (binary layers found by type); not modified.
        inputs: example inputs (default: those ``ts.create_model`` attached).
        latency: also time the forward in the profile.

    Returns:
        A :class:`BinarySummary`: per binary layer the binary MACs and packed vs fp32 weight
        bytes, the binary share of all MACs, the profile (``.profile``) and the file size.

    Example:
        >>> import torch, torchslim as ts
        >>> from torchslim.binarize import BinarizeConfig, binarize_, summary
        >>> model = ts.create_model("zoo:lenet300")
        >>> _ = binarize_(model, BinarizeConfig(method="bnn"))
        >>> s = summary(model)
        >>> s.binary_macs, round(s.compression, 1)
        (30000, 30.0)
    """
    from torchslim.profile import profile

    prof = profile(model, inputs, latency=latency)
    by_name = {row.name: row for row in prof.layers}
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, BINARY_TYPES):
            continue
        row = by_name.get(name)
        out = math.prod(row.output_shape) if row is not None and row.output_shape else 0
        macs = out * layer.fan_in * max(row.calls if row is not None else 0, 1) if out else 0
        w = layer.weight
        rows.append(
            BinaryLayerSummary(
                name=name,
                type=type(layer).__name__,
                method=layer.method,
                params=sum(p.numel() for p in layer.parameters(recurse=False)),
                macs=macs,
                binary_macs=macs if layer.binary_activations else 0,
                packed_bytes=layer.packed_nbytes(),
                fp32_bytes=w.numel() * 4,
            )
        )
    return BinarySummary(rows, prof.macs, prof.size_bytes, prof)
