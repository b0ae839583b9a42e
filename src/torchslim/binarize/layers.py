"""Binary Linear and Conv2d layers: BNN, XNOR-Net, Bi-Real Net and binary-weight networks.

Each layer keeps a real-valued *latent* weight (the same ``Parameter`` as the layer it replaces,
so optimizers keep working) and computes, with ``sign(0) = +1``::

    y = op(binarize(x), sign(W)) * scale  [* K]  + bias  [+ shortcut(x)]

- ``"bnn"`` (Hubara et al. 2016): signs of weights and activations, both trained with the
  clipped straight-through estimator (gradient passed where ``|.| <= 1``). ``scale`` is the
  constant ``1 / sqrt(fan_in)``: a following BatchNorm absorbs it, and it keeps models without
  BatchNorm trainable.
- ``"xnor"`` (Rastegari et al. 2016): ``scale`` is ``alpha``, the mean ``|W|`` of each output
  channel (gradients flow through it); with ``scale_activations=True`` also ``K``, the mean
  ``|x|`` of each input patch (Linear: of each row).
- ``"bireal"`` (Liu et al. 2018): ``alpha`` as XNOR-Net, the activation sign trained with the
  piecewise-polynomial approximation ``ApproxSign`` (gradient ``2 - 2|x|`` on ``|x| < 1``), and a
  real-valued shortcut around every binary layer. When the layer changes the shape, the
  shortcut is parameter-free: average pooling to the output's spatial size, then channels
  repeated (more outputs) or averaged in groups (fewer).
- ``"bwn"`` (binary-weight networks, Rastegari et al. 2016): ``alpha * sign(W)`` with real
  activations.

The product ``op(binarize(x), sign(W))`` has ±1 operands, so in float it is an exact integer:
:mod:`~torchslim.binarize.kernel` computes the same integer with XNOR and popcount on packed
bits. Set ``layer.backend`` to ``"auto"``, ``"c"`` or ``"torch"`` to use it in inference (eval
mode under ``no_grad``); the default ``"float"`` is the float simulation. Outputs are identical.
``"fastest"`` times both routes (float op vs packed kernel, interleaved, median) the first time the layer sees an input
shape and keeps the faster one for that shape: small layers, where im2col and packing cost more
than the popcounts save, stay on the float op.

Storage: the state dict (hence ``ts.save``'s file and the profiler's ``size_bytes``) holds
``weight::signs`` (one bit per weight, 32 or 64 to a word) and, for scaled methods,
``weight::scale`` (one float per output channel), never the latent weight. Loading gives the
weight ``sign * scale``, which has the same signs and (computed in float64, exactly) the same
``alpha``, so a reloaded model computes exactly the same outputs; the latent magnitudes, which
only matter to further training, are not kept. Training checkpoints (``ts.fit(...,
checkpoint_dir=...)``) do keep the latent weight, so a resumed run is bit-identical.

Example:
    >>> import torch
    >>> layer = BinaryLinear.from_float(torch.nn.Linear(64, 8), "xnor")
    >>> sorted(layer.state_dict())
    ['bias', 'weight::scale', 'weight::signs']
    >>> layer.state_dict()["weight::signs"].shape
    torch.Size([8, 2])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._registry import register_method
from torchslim.binarize import kernel as _kernel
from torchslim.binarize.packing import as_words64, check_packed, pack_signs, unpack_signs, word_dtype
from torchslim.errors import CheckpointError, ConfigError
from torchslim.profile.latency import measure_pair
from torchslim.train.checkpoint import training_state_active

__all__ = [
    "METHODS",
    "ACTIVATION_METHODS",
    "INFERENCE_BACKENDS",
    "sign",
    "ste_sign",
    "approx_sign",
    "channel_scale",
    "BinaryLinear",
    "BinaryConv2d",
    "BINARY_TYPES",
    "MethodInfo",
]

METHODS = ("bnn", "xnor", "bireal", "bwn")
ACTIVATION_METHODS = ("bnn", "xnor", "bireal")  # methods that binarize activations too
INFERENCE_BACKENDS = ("float", "auto", "c", "torch", "fastest")
_ROUTE_RUNS = 5  # timed runs of each route when "fastest" meets a new input shape
SEP = "::"


def sign(x: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``x >= 0``, else ``-1`` (no gradient)."""
    return (x >= 0).to(x.dtype) * 2 - 1


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class _ApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (2 - 2 * x.abs()).clamp_(min=0)


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` whose gradient is the clipped straight-through estimator ``1{|x| <= 1}``.

    Example:
        >>> x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
        >>> ste_sign(x).sum().backward()
        >>> x.grad.tolist()
        [0.0, 1.0, 1.0, 1.0, 0.0]
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return sign(x)  # plain ops: same values, and TorchScript / ONNX can trace them
    return _SignSTE.apply(x)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with Bi-Real Net's ApproxSign gradient ``max(0, 2 - 2|x|)``.

    Example:
        >>> x = torch.tensor([-2.0, -0.5, 0.0, 0.5], requires_grad=True)
        >>> approx_sign(x).sum().backward()
        >>> x.grad.tolist()
        [0.0, 1.0, 2.0, 1.0]
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return sign(x)
    return _ApproxSign.apply(x)


def channel_scale(weight: torch.Tensor) -> torch.Tensor:
    """XNOR-Net's ``alpha``: mean ``|W|`` per output channel (differentiable).

    Computed in float64: for a weight that is already ``±a`` per channel the mean is exactly
    ``a``, which makes packed storage round-trip bit-exactly.
    """
    flat = weight.reshape(weight.shape[0], -1)
    return flat.to(torch.float64).abs().mean(dim=1).to(weight.dtype)


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"binarization method must be one of {', '.join(METHODS)}; got {method!r}")
    return method


class _BinaryLayer:
    """What BinaryLinear and BinaryConv2d share (a mixin in front of the torch layer class)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    training: bool

    def _setup(self, method: str, scale_activations: bool, shortcut: bool | None, word_bits: int) -> None:
        self.method = _check_method(method)
        if scale_activations and method != "xnor":
            raise ConfigError(f"scale_activations is an XNOR-Net option; method {method!r} does not take it")
        word_dtype(word_bits)
        self.scale_activations = bool(scale_activations)
        self.shortcut = (method == "bireal") if shortcut is None else bool(shortcut)
        self.word_bits = int(word_bits)
        self.backend = "float"
        self.routes: dict[tuple[Any, ...], str] = {}  # "fastest": input shape ... -> "packed" or "float"
        self._weight_cache: dict[str, tuple[Any, torch.Tensor]] = {}

    # ----------------------------------------------------------------- what the layer computes
    @property
    def torchslim_precision(self) -> tuple[int, int]:
        """(weight bits, activation bits): the profiler groups MACs by it (``macs_by_precision``)."""
        return (1, 1 if self.binary_activations else 32)

    @property
    def binary_activations(self) -> bool:
        """Whether the inputs are binarized (all methods but ``"bwn"``)."""
        return self.method in ACTIVATION_METHODS

    @property
    def fan_in(self) -> int:
        """Entries per output channel (``in_features``, or ``C/groups * kh * kw``)."""
        return self.weight[0].numel()

    def _cached(self, name: str, fn: Any) -> torch.Tensor:
        # without autograd, weight-only results are cached until the weight changes in place or is replaced
        if torch.is_grad_enabled():
            return fn()
        w = self.weight
        key = (w._version, w.data_ptr(), w.device, w.dtype)
        hit = self._weight_cache.get(name)
        if hit is None or hit[0] != key:
            hit = (key, fn())
            self._weight_cache[name] = hit
        return hit[1]

    def weight_scale(self) -> torch.Tensor:
        """The per-output-channel factor: ``alpha`` (xnor, bireal, bwn) or ``1/sqrt(fan_in)`` (bnn)."""
        return self._cached("scale", self._weight_scale)

    def _weight_scale(self) -> torch.Tensor:
        if self.method == "bnn":
            w = self.weight
            return torch.full((w.shape[0],), self.fan_in**-0.5, dtype=w.dtype, device=w.device)
        return channel_scale(self.weight)

    def binary_weight(self) -> torch.Tensor:
        """``sign(W)`` (±1, same shape), differentiable through the clipped STE."""
        return self._cached("sign", lambda: ste_sign(self.weight))

    def binarize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``sign(x)`` (STE, or ApproxSign for Bi-Real); ``x`` itself for ``"bwn"``."""
        if not self.binary_activations:
            return x
        return approx_sign(x) if self.method == "bireal" else ste_sign(x)

    def _channel_view(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _activation_scale(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _shortcut(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _binary_op(self, xb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _kernel_op(self, x: torch.Tensor, words: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def _finish(self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        y = y * self._channel_view(scale)
        if self.scale_activations:
            y = y * self._activation_scale(x)
        if self.bias is not None:
            y = y + self._channel_view(self.bias)
        if self.shortcut:
            y = y + self._shortcut(x, y)
        return y

    @property
    def _kernel_backend(self) -> str:
        return "auto" if self.backend == "fastest" else self.backend

    def _float_product(self, x: torch.Tensor) -> torch.Tensor:
        return self._binary_op(self.binarize_input(x), self.binary_weight())

    def _fastest_product(self, x: torch.Tensor) -> torch.Tensor | None:
        """The ±1 product by the route measured fastest for this input (``None``: the float op)."""
        key = (tuple(x.shape), x.dtype, x.device, x.is_contiguous(), torch.get_num_threads())
        route = self.routes.get(key)
        if route == "float":
            return None
        if route == "packed":
            return self._kernel_op(x, self.packed_words64())
        y = self._kernel_op(x, self.packed_words64())  # first run: also packs and caches the weight
        if y is None:
            self.routes[key] = "float"
            return None
        self._float_product(x)  # warm-up
        packed, dense = measure_pair(lambda: self._kernel_op(x, self.packed_words64()), lambda: self._float_product(x),
                                     runs=_ROUTE_RUNS, warmup=0, sync=x.device, runtimes=("packed", "float"))
        self.routes[key] = "packed" if packed.median_ms < dense.median_ms else "float"
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend != "float" and self.binary_activations and not self.training and not torch.is_grad_enabled():
            if self.backend == "fastest":
                y = self._fastest_product(x)
            else:
                y = self._kernel_op(x, self.packed_words64())
            if y is not None:
                return self._finish(x, y, self.weight_scale())
        return self._finish(x, self._float_product(x), self.weight_scale())

    # ----------------------------------------------------------------- packed weights
    def packed_signs(self, word_bits: int | None = None) -> torch.Tensor:
        """``(out, words)`` packed signs of the weight (``word_bits`` defaults to the layer's)."""
        w = self.weight.detach()
        return pack_signs(w.reshape(w.shape[0], -1), word_bits or self.word_bits)

    def packed_words64(self) -> torch.Tensor:
        """The 64-bit packed signs the kernel uses, cached until the weight changes."""
        return self._cached("words64", lambda: as_words64(self.packed_signs(64)))

    def packed_nbytes(self) -> int:
        """Bytes of the packed weight as stored: sign words plus scales (not the bias)."""
        words = self.packed_signs()
        scale = 0 if self.method == "bnn" else self.weight.shape[0] * self.weight.element_size()
        return words.numel() * words.element_size() + scale

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        key = prefix + "weight"
        if key not in destination or training_state_active():
            return  # a training checkpoint keeps the latent weight: resuming must be bit-identical
        w = destination.pop(key).detach()
        destination[key + SEP + "signs"] = pack_signs(w.reshape(w.shape[0], -1), self.word_bits)
        if self.method != "bnn":
            destination[key + SEP + "scale"] = channel_scale(w)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "weight"
        skey = key + SEP + "signs"
        if skey in state_dict:
            state_dict[key] = self._decode(key, state_dict.pop(skey), state_dict.pop(key + SEP + "scale", None))
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]

    def _decode(self, key: str, words: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        rows, k = self.weight.shape[0], self.fan_in
        check_packed(words, rows, k, self.word_bits, what=f"{key}{SEP}signs")
        w = unpack_signs(words, k, self.weight.dtype).reshape(self.weight.shape)
        if self.method == "bnn":
            return w
        if scale is None or tuple(scale.shape) != (rows,):
            got = "nothing" if scale is None else f"shape {tuple(scale.shape)}"
            raise CheckpointError(f"{key}{SEP}scale should hold {rows} per-channel scales for method {self.method!r}; got {got}")
        return w * scale.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))

    def _binary_repr(self) -> str:
        extra = f"method={self.method!r}"
        if self.scale_activations:
            extra += ", scale_activations=True"
        if self.shortcut:
            extra += ", shortcut=True"
        if self.backend != "float":
            extra += f", backend={self.backend!r}"
        return extra


def _match_channels(x: torch.Tensor, out: int, dim: int) -> torch.Tensor:
    """Parameter-free map of ``x``'s size along ``dim`` to ``out``: repeat entries or average groups."""
    size = x.shape[dim]
    if size == out:
        return x
    if out > size:
        idx = torch.arange(out, device=x.device) * size // out
        return x.index_select(dim, idx)
    moved = x.movedim(dim, -1)
    pooled = F.adaptive_avg_pool1d(moved.reshape(-1, 1, size), out).reshape(*moved.shape[:-1], out)
    return pooled.movedim(-1, dim)


class BinaryLinear(_BinaryLayer, nn.Linear):
    """``nn.Linear`` with binary weights (and activations, but for ``"bwn"``); see the module doc.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        method: ``"bnn"``, ``"xnor"``, ``"bireal"`` or ``"bwn"``.
        scale_activations: XNOR-Net's per-row activation scale (``"xnor"`` only).
        shortcut: real-valued shortcut (default: on for ``"bireal"`` only).
        word_bits: bits per stored word, 32 or 64.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        method: str = "xnor",
        scale_activations: bool = False,
        shortcut: bool | None = None,
        word_bits: int = 32,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(method, scale_activations, shortcut, word_bits)

    @classmethod
    def from_float(cls, linear: nn.Linear, method: str, **options: Any) -> BinaryLinear:
        """A binary layer sharing ``linear``'s ``weight`` and ``bias`` Parameters."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, method=method, device="meta", **options)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def _channel_view(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def _activation_scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs().mean(dim=-1, keepdim=True)

    def _shortcut(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _match_channels(x, y.shape[-1], -1)

    def _binary_op(self, xb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        return F.linear(xb, wb)

    def _kernel_op(self, x: torch.Tensor, words: torch.Tensor) -> torch.Tensor | None:
        return _kernel.binary_linear(x, words, self.in_features, backend=self._kernel_backend)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._binary_repr()}"


class BinaryConv2d(_BinaryLayer, nn.Conv2d):
    """``nn.Conv2d`` with binary weights (and activations, but for ``"bwn"``); see the module doc.

    Takes ``nn.Conv2d``'s arguments (zero padding only) and the options of :class:`BinaryLinear`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        method: str = "xnor",
        scale_activations: bool = False,
        shortcut: bool | None = None,
        word_bits: int = 32,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device=device, dtype=dtype
        )
        self._setup(method, scale_activations, shortcut, word_bits)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, method: str, **options: Any) -> BinaryConv2d:
        """A binary layer sharing ``conv``'s ``weight`` and ``bias`` Parameters.

        Raises:
            ConfigError: a padding mode other than zeros (it has no binary form here).
        """
        if conv.padding_mode != "zeros":
            raise ConfigError(f"binary convolutions support zero padding only; got padding_mode={conv.padding_mode!r}")
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, method=method, device="meta", **options,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def _channel_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, 1, 1)

    def _int_padding(self) -> tuple[int, int] | None:
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return (0, 0)
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if any(t % 2 for t in total):
                return None  # asymmetric 'same' padding: the float path handles it
            return (total[0] // 2, total[1] // 2)
        return (int(self.padding[0]), int(self.padding[1]))

    def _activation_scale(self, x: torch.Tensor) -> torch.Tensor:
        a = x.abs().mean(dim=1, keepdim=True)
        kh, kw = self.kernel_size
        box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=x.dtype, device=x.device)
        return F.conv2d(a, box, None, self.stride, self.padding, self.dilation)

    def _shortcut(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != y.shape[-2:]:
            x = F.adaptive_avg_pool2d(x, y.shape[-2:])
        return _match_channels(x, y.shape[1], 1)

    def _binary_op(self, xb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(xb, wb, None)

    def _kernel_op(self, x: torch.Tensor, words: torch.Tensor) -> torch.Tensor | None:
        padding = self._int_padding()
        if padding is None or x.dim() != 4:
            return None
        return _kernel.binary_conv2d(
            x, words, self.weight.shape, stride=self.stride, padding=padding, dilation=self.dilation,
            groups=self.groups, backend=self._kernel_backend,
        )

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._binary_repr()}"


BINARY_TYPES: tuple[type[nn.Module], ...] = (BinaryLinear, BinaryConv2d)


@dataclass(frozen=True)
class MethodInfo:
    """A binarization method as listed by ``ts.list_methods("binarize")``."""

    name: str
    weights: str
    activations: str
    paper: str


for _info, _desc in (
    (MethodInfo("bnn", "sign (clipped STE)", "sign (clipped STE)", "Hubara et al. 2016, Binarized Neural Networks"),
     "BNN: binary weights and activations, clipped straight-through estimator"),
    (MethodInfo("xnor", "alpha * sign, alpha per output channel", "sign (optional scale K)", "Rastegari et al. 2016, XNOR-Net"),
     "XNOR-Net: per-channel weight scale alpha, optional activation scale K"),
    (MethodInfo("bireal", "alpha * sign", "sign (ApproxSign gradient) + real shortcut", "Liu et al. 2018, Bi-Real Net"),
     "Bi-Real Net: real-valued shortcuts and the ApproxSign gradient"),
    (MethodInfo("bwn", "alpha * sign", "real", "Rastegari et al. 2016, XNOR-Net (BWN)"),
     "BWN: binary weights only, real activations"),
):
    register_method("binarize.method", _info.name, description=_desc)(_info)
