"""Dynamic int8 quantization of recurrent layers: ``nn.LSTM`` / ``nn.GRU`` with integer weights.

:class:`QuantizedRNN` replaces an ``nn.LSTM`` or ``nn.GRU`` (any ``num_layers``, ``bidirectional``,
``batch_first``, ``bias``, LSTM ``proj_size``). Every weight matrix of every layer and direction
(``weight_ih_l{k}[_reverse]``, ``weight_hh_...``, ``weight_hr_...``) is stored as integers with one
fp16 scale per output row (per gate unit: per-channel), the biases stay fp32 under their usual
names. Its state dict is what ``ts.save`` writes, so the weights take ~4x fewer bytes than fp32.

``forward`` dequantizes the weights and runs the same recurrence as PyTorch (same gate order,
same ``(output, (h_n, c_n))`` / ``(output, h_n)`` shapes and layout). With ``dynamic_act=True``
(what ``quantize_`` in ``mode="dynamic"`` builds) the activations that meet a weight matrix are
quantized at run time, per tensor, 8-bit asymmetric: each layer's input sequence once, and the
hidden state at every step, which are the numerics of a dynamic int8 LSTM / GRU.

Example:
    >>> import torch
    >>> from torchslim.quantize.dynamic_rnn import QuantizedRNN
    >>> from torchslim.quantize.primitives import QScheme, sqnr
    >>> lstm = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
    >>> q = QuantizedRNN.from_float(lstm, QScheme(bits=8, granularity="channel"), dynamic_act=True)
    >>> q.weight_ih_l1_reverse_int.dtype
    torch.int8
    >>> x = torch.randn(3, 5, 8)
    >>> (y, (h, c)), (yq, (hq, cq)) = lstm(x), q(x)
    >>> yq.shape == y.shape and hq.shape == h.shape and cq.shape == c.shape
    True
    >>> sqnr(y, yq) > 25
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchslim._utils import model_device
from torchslim.errors import ConfigError, InputShapeError
from torchslim.quantize.primitives import (
    QScheme,
    choose_qparams,
    dequantize,
    fake_quantize,
    minmax,
    quantize,
    view,
)

__all__ = ["RNN_TYPES", "QuantizedRNN", "check_rnn_scheme"]

RNN_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU)
_ACT = QScheme(bits=8, symmetric=False, signed=False)
_GATES = {"LSTM": 4, "GRU": 3}


def _weight_shapes(mode: str, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool,
                   proj_size: int) -> dict[str, tuple[int, int]]:
    """``{name: (rows, cols)}`` of every weight matrix, in PyTorch's naming."""
    g = _GATES[mode]
    h_out = proj_size or hidden_size
    dirs = 2 if bidirectional else 1
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(num_layers):
        in_l = input_size if layer == 0 else h_out * dirs
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            shapes["weight_ih" + sfx] = (g * hidden_size, in_l)
            shapes["weight_hh" + sfx] = (g * hidden_size, h_out)
            if proj_size:
                shapes["weight_hr" + sfx] = (proj_size, hidden_size)
    return shapes


def check_rnn_scheme(name: str, rnn: nn.Module, scheme: QScheme) -> None:
    """Refuse (before anything changes) a recurrent layer ``scheme`` cannot store.

    Raises:
        ConfigError: not an LSTM / GRU, or a group size that does not divide a weight's row length.
    """
    if not isinstance(rnn, RNN_TYPES):
        raise ConfigError(f"{name} is a {type(rnn).__name__}; dynamic recurrent quantization handles nn.LSTM and nn.GRU")
    if scheme.granularity == "group":
        for w, (_, cols) in _weight_shapes(rnn.mode, rnn.input_size, rnn.hidden_size, rnn.num_layers,
                                           rnn.bidirectional, getattr(rnn, "proj_size", 0)).items():
            if cols % scheme.group_size:
                raise ConfigError(
                    f"group_size={scheme.group_size} does not divide the row length {cols} of {name}.{w}; "
                    f"pick a divisor, granularity='channel', or skip={name!r}"
                )


def _int_dtype(scheme: QScheme) -> torch.dtype:
    if scheme.bits > 8:
        return torch.int32
    return torch.int8 if scheme.signed else torch.uint8


def _act_quant(x: torch.Tensor) -> torch.Tensor:
    lo, hi = minmax(x.detach(), _ACT)
    scale, zp = choose_qparams(lo, hi, _ACT)
    return fake_quantize(x, scale, zp, _ACT)


class QuantizedRNN(nn.Module):
    """An LSTM or GRU whose weight matrices are stored as integers (see module doc).

    Args:
        mode: ``"LSTM"`` or ``"GRU"``.
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size:
            as in ``nn.LSTM`` / ``nn.GRU`` (``proj_size`` is LSTM only).
        scheme: how the weights are quantized (per-channel int8 for dynamic mode).
        dynamic_act: quantize the activations per tensor at run time (8-bit asymmetric).
    """

    def __init__(
        self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
        batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
        scheme: QScheme | None = None, dynamic_act: bool = False,
    ) -> None:
        super().__init__()
        if mode not in _GATES:
            raise ConfigError(f"QuantizedRNN mode must be 'LSTM' or 'GRU'; got {mode!r}")
        if proj_size and mode != "LSTM":
            raise ConfigError(f"proj_size is an LSTM option; got proj_size={proj_size} for {mode}")
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        self.scheme = scheme or QScheme(bits=8, granularity="channel")
        self.dynamic_act = dynamic_act
        self._shapes = _weight_shapes(mode, input_size, hidden_size, num_layers, bidirectional, proj_size)
        dtype = _int_dtype(self.scheme)
        # fp16 scales (like QuantizedLinear) for 2..8 bits; a 16-bit step would be an fp16 subnormal
        sdtype = torch.float16 if self.scheme.bits <= 8 else torch.float32
        for name, (rows, cols) in self._shapes.items():
            vshape = tuple(view(torch.empty(rows, cols, device="meta"), self.scheme).shape)
            pshape = () if self.scheme.granularity == "tensor" else (*vshape[:-1], 1)
            self.register_buffer(name + "_int", torch.zeros(vshape, dtype=dtype))
            self.register_buffer(name + "_scale", torch.ones(pshape, dtype=sdtype))
            self.register_buffer(name + "_zero_point", torch.zeros(pshape if not self.scheme.symmetric else (0,), dtype=sdtype))
            if bias and not name.startswith("weight_hr"):
                self.register_parameter(name.replace("weight", "bias"), nn.Parameter(torch.zeros(rows)))

    @classmethod
    def empty_like(cls, rnn: nn.Module, scheme: QScheme, dynamic_act: bool = False) -> QuantizedRNN:
        """A zero-filled :class:`QuantizedRNN` with ``rnn``'s structure (its weights load afterwards)."""
        check_rnn_scheme(type(rnn).__name__, rnn, scheme)
        device = model_device(rnn)
        return cls(
            rnn.mode, rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bias, rnn.batch_first, rnn.dropout,
            rnn.bidirectional, getattr(rnn, "proj_size", 0), scheme, dynamic_act,
        ).to(device)

    @classmethod
    @torch.no_grad()
    def from_float(cls, rnn: nn.Module, scheme: QScheme, dynamic_act: bool = False) -> QuantizedRNN:
        """Round-to-nearest quantization of every weight matrix of ``rnn`` (min-max range per scale)."""
        q = cls.empty_like(rnn, scheme, dynamic_act)
        for name in q._shapes:
            w = getattr(rnn, name).detach().float()
            lo, hi = minmax(w, scheme)
            scale, zp = choose_qparams(lo, hi, scheme)
            stored = getattr(q, name + "_scale")
            scale = scale.to(stored.dtype).float()  # quantize against the scale actually stored
            getattr(q, name + "_int").copy_(quantize(w, scale, zp, scheme).to(getattr(q, name + "_int").dtype))
            stored.copy_(scale.reshape(stored.shape))
            if not scheme.symmetric:
                getattr(q, name + "_zero_point").copy_(zp.reshape(getattr(q, name + "_zero_point").shape))
            if q.bias and not name.startswith("weight_hr"):
                b = name.replace("weight", "bias")
                getattr(q, b).copy_(getattr(rnn, b).detach())
        return q

    @property
    def weight_names(self) -> list[str]:
        """Names of the quantized weight matrices (PyTorch's names, e.g. ``weight_hh_l1_reverse``)."""
        return list(self._shapes)

    def dequantized_weight(self, name: str) -> torch.Tensor:
        """The float matrix the integers of weight ``name`` stand for."""
        s = self.scheme
        scale = getattr(self, name + "_scale").float()
        zp = getattr(self, name + "_zero_point").float() if not s.symmetric else torch.zeros((), device=scale.device)
        return dequantize(getattr(self, name + "_int"), scale, zp, s, self._shapes[name])

    @torch.no_grad()
    def to_float(self) -> nn.Module:
        """An ``nn.LSTM`` / ``nn.GRU`` holding the dequantized weights (e.g. for ONNX export)."""
        kw: dict[str, Any] = {"proj_size": self.proj_size} if self.mode == "LSTM" else {}
        cls = nn.LSTM if self.mode == "LSTM" else nn.GRU
        device = getattr(self, self.weight_names[0] + "_scale").device
        rnn = cls(self.input_size, self.hidden_size, self.num_layers, bias=self.bias, batch_first=self.batch_first,
                  dropout=self.dropout, bidirectional=self.bidirectional, **kw).to(device)
        for name in self._shapes:
            getattr(rnn, name).copy_(self.dequantized_weight(name))
            if self.bias and not name.startswith("weight_hr"):
                b = name.replace("weight", "bias")
                getattr(rnn, b).copy_(getattr(self, b))
        return rnn.train(self.training)

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return _act_quant(x) if self.dynamic_act else x

    def _direction(self, x: torch.Tensor, sfx: str, h: torch.Tensor, c: torch.Tensor | None, reverse: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run one layer in one direction over ``x`` (T, B, in); return (outputs, h_T, c_T)."""
        w_ih = self.dequantized_weight("weight_ih" + sfx).to(x.dtype)
        w_hh = self.dequantized_weight("weight_hh" + sfx).to(x.dtype)
        w_hr = self.dequantized_weight("weight_hr" + sfx).to(x.dtype) if self.proj_size else None
        b_ih = getattr(self, "bias_ih" + sfx) if self.bias else None
        b_hh = getattr(self, "bias_hh" + sfx) if self.bias else None
        gi_all = F.linear(x, w_ih, b_ih)  # the input projection of every step at once
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        outs: list[torch.Tensor] = [x.new_empty(0)] * x.shape[0]
        for t in steps:
            gi = gi_all[t]
            gh = F.linear(self._q(h), w_hh, b_hh)
            if self.mode == "LSTM":
                i, f, g, o = (gi + gh).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                if w_hr is not None:
                    h = F.linear(self._q(h), w_hr)
            else:
                ir, iz, in_ = gi.chunk(3, dim=-1)
                hr, hz, hn = gh.chunk(3, dim=-1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                n = torch.tanh(in_ + r * hn)
                h = (1 - z) * n + z * h
            outs[t] = h
        return torch.stack(outs, 0), h, c

    def forward(self, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, Any]:
        if not isinstance(x, torch.Tensor):
            raise InputShapeError(f"QuantizedRNN takes a padded tensor input; got {type(x).__name__} (pad PackedSequence inputs)")
        if x.dim() not in (2, 3):
            raise InputShapeError(f"{self.mode} input must be 2-D (unbatched) or 3-D; got shape {tuple(x.shape)}")
        unbatched = x.dim() == 2
        dirs = 2 if self.bidirectional else 1
        h_out = self.proj_size or self.hidden_size
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        batch = x.shape[1]
        if hx is None:
            h0 = x.new_zeros(self.num_layers * dirs, batch, h_out)
            c0 = x.new_zeros(self.num_layers * dirs, batch, self.hidden_size) if self.mode == "LSTM" else None
        else:
            h0, c0 = hx if self.mode == "LSTM" else (hx, None)
            if unbatched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
        hn: list[torch.Tensor] = []
        cn: list[torch.Tensor] = []
        layer_in = x
        for layer in range(self.num_layers):
            xin = self._q(layer_in)
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                o, h, c = self._direction(xin, f"_l{layer}" + ("_reverse" if d else ""), h0[k],
                                          c0[k] if c0 is not None else None, reverse=bool(d))
                outs.append(o)
                hn.append(h)
                if c is not None:
                    cn.append(c)
            layer_in = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        out, h_n = layer_in, torch.stack(hn, 0)
        c_n = torch.stack(cn, 0) if self.mode == "LSTM" else None
        if unbatched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return (out, (h_n, c_n)) if self.mode == "LSTM" else (out, h_n)

    def extra_repr(self) -> str:
        s = self.scheme
        return (
            f"{self.mode}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
            + (", bidirectional" if self.bidirectional else "") + (", batch_first" if self.batch_first else "")
            + (f", proj_size={self.proj_size}" if self.proj_size else "")
            + f"), int{s.bits} {s.granularity}" + (", dynamic activations" if self.dynamic_act else "")
        )
