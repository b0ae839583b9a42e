"""``quantize_(model, QuantConfig(...), calibration=loader)``: one verb for every quantization mode.

Modes:

* ``"weight-only"``: Linear weights stored as int8 (per channel) or packed int4 (per group);
  activations stay float (:mod:`torchslim.quantize.weight_only`).
* ``"dynamic"``: int8 Linear weights, activations quantized per batch at run time; the real
  integer kernels come from ONNX Runtime (:func:`torchslim.export.export_integer_onnx`). ``nn.LSTM`` /
  ``nn.GRU`` layers get int8 weights too, their inputs and hidden states quantized at every step
  (:mod:`torchslim.quantize.dynamic_rnn`).
* ``"static"``: BN folded into convs, weights (per channel) and activations (per tensor,
  calibrated on ``calibration`` batches with the chosen observer); then every int8 layer becomes
  an integer module (:mod:`torchslim.quantize.int8`: int8 weights in the state dict, the
  decomposed quantization ops in its forward, oneDNN int8 kernels under
  :func:`torchslim.quantize.compile`). Layers of other bit widths stay fake-quantized.
* ``"qat"``: the static structure, with quantizers that keep learning while you train
  (:func:`qat_prepare_`), fake-quant until ``ts.finalize_`` turns the int8 layers into integer
  modules.

Every call is recorded as a ``"quantize"`` plan, so ``ts.save`` / ``ts.load`` round-trip it.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.quantize import QuantConfig, quantize_
    >>> model = ts.create_model("zoo:lenet300")
    >>> plan = quantize_(model, QuantConfig(mode="weight-only", bits=4, granularity="group", group_size=4))
    >>> plan.layers
    ['fc1', 'fc2', 'fc3']
    >>> QuantConfig.from_dict(plan.config.to_dict()) == plan.config
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim._config import ConfigDict
from torchslim._modelinfo import SKIP_THEM, refuse_applied, register_plan_kind
from torchslim._select import Selector, as_patterns, select_modules
from torchslim._utils import evaluating, model_device
from torchslim.data import batches_of
from torchslim.errors import ConfigError, InputShapeError
from torchslim.quantize import ptq
from torchslim.quantize.dynamic_rnn import RNN_TYPES, QuantizedRNN, check_rnn_scheme
from torchslim.quantize.fake_quant import FakeQuantize, LSQFakeQuantize
from torchslim.quantize.int8 import INT8_TYPES, empty_int8_, to_int8_
from torchslim.quantize.observers import OBSERVERS
from torchslim.quantize.primitives import GRANULARITIES, SCALE_RULES, QScheme, check_bits
from torchslim.quantize.weight_only import QuantizedLinear

__all__ = ["MODES", "QuantConfig", "QuantPlan", "quantize_", "replay_quantize"]

MODES = ("dynamic", "static", "weight-only", "qat")
#: what weight-only activations compute in (:attr:`QuantConfig.compute`)
COMPUTES = ("auto", "int8", "float")
KIND = "quantize"
INT8_ACTION = "int8"  # a record appended when QAT's int8 layers become integer modules (ts.finalize_)
# what quantize_ (and gptq_) cannot take from an earlier verb: a binary layer has no integer form
# (its int8 export would be a float conv's), and swapping or fake-quantizing it loses the binarization
CANNOT_TAKE = {"binarize": "a layer is binary or quantized, not both: " + SKIP_THEM}


@dataclass(frozen=True)
class QuantConfig(ConfigDict):
    """What :func:`quantize_` does.

    Attributes:
        mode: ``"dynamic"``, ``"static"``, ``"weight-only"`` or ``"qat"``.
        bits: weight bits (2..8, or 16 as a near-identity).
        act_bits: activation bits (static / qat).
        granularity: weights ``"channel"`` (default), ``"tensor"`` or ``"group"``.
        group_size: elements per group for ``granularity="group"``.
        symmetric: symmetric weights (activations are always asymmetric unsigned).
        observer: activation observer (``minmax``, ``moving_average``, ``percentile``, ``entropy``, ``mse``).
        weight_observer: weight observer (``minmax`` or ``mse``).
        calibration_batches: batches of ``calibration`` to observe (static).
        fold_bn: fold BatchNorm into the preceding conv (static / qat).
        lsq: ``None`` (observer + STE), ``"lsq"`` or ``"lsq+"`` learned step sizes (qat).
        modules: globs of layers to quantize (``None``: every Conv/Linear; Linear only for
            weight-only; Linear, LSTM and GRU for dynamic).
        skip: globs of layers to leave in float.
        layer_bits: per-layer weight bits overriding ``bits`` (mixed precision, see
            :func:`torchslim.quantize.mixed.allocate_bits`).
        bias_correction: after calibration, correct every quantized layer's bias by its mean
            output shift on the calibration batches (static; Nagel 2019, see
            :mod:`torchslim.quantize.bias_correction`).
        smoothquant_alpha: migrate activation outliers of Linear layers into their weights with
            this migration strength in [0, 1] (SmoothQuant; static, qat or dynamic, with
            calibration data, see :mod:`torchslim.quantize.smoothquant`); ``None``: off.
        smoothquant_min_gain: smooth a layer only if that divides its simulated int8 error on
            the first calibration batch by at least this much (each smoothed input costs one
            multiply at run time; 3 by default, about 5 dB; 0 smooths all).
        embeddings: weight-only mode: also store every selected ``nn.Embedding`` table as
            ``bits``-bit integers in groups of ``group_size`` along the hidden axis (symmetric;
            bits 4 or 8), shipped to ONNX Runtime as ``GatherBlockQuantized``; a transformer's
            word embeddings are often a third of its bytes or more.
        embedding_bits: bits of those tables (4 or 8) when they differ from ``bits`` (a decoder's
            body in int4 with int8 embeddings); ``None``: ``bits``.
        scale_rule: weight-only mode, symmetric weights of at most 4 bits (round to nearest,
            GPTQ, AWQ-GPTQ): ``"search"`` (default) picks each group's scale among ggml's Q4_0
            rule, clipped variants and their least-squares refits by the error weighted by the
            inputs' energy per column (:mod:`torchslim.quantize.scale_search`); ``"absmax"`` is
            the older ``max|w| / 7.5``. Other modes and widths use their observers / min-max.
        compute: weight-only mode: what the activations are when they meet the integer weights.
            ``"int8"``: rounded to int8 per block of ``group_size`` inputs at run time (symmetric,
            scale ``max|x| / 127``, ties to even; :func:`~torchslim.quantize.primitives.int8_blocks`),
            exactly what ONNX Runtime's ``MatMulNBits`` computes with at ``accuracy_level=4``, its
            fast integer CPU kernels, so the exported file computes what the torch model does;
            ``"float"``: float activations (``accuracy_level=0`` in ONNX); ``"auto"`` (default):
            ``"int8"`` for group-wise weights, else ``"float"``.
    """

    mode: str = "static"
    bits: int = 8
    act_bits: int = 8
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = True
    observer: str = "minmax"
    weight_observer: str = "minmax"
    calibration_batches: int = 16
    fold_bn: bool = True
    lsq: str | None = None
    modules: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    layer_bits: dict[str, int] | None = None
    bias_correction: bool = False
    smoothquant_alpha: float | None = None
    smoothquant_min_gain: float = 3.0
    embeddings: bool = False
    embedding_bits: int | None = None
    scale_rule: str = "search"
    compute: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"QuantConfig.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        check_bits(self.bits, "QuantConfig.bits")
        check_bits(self.act_bits, "QuantConfig.act_bits")
        if not isinstance(self.scale_rule, str) or self.scale_rule not in SCALE_RULES:
            raise ConfigError(f"QuantConfig.scale_rule must be one of {', '.join(SCALE_RULES)}; got {self.scale_rule!r}")
        if self.compute not in COMPUTES:
            raise ConfigError(f"QuantConfig.compute must be one of {', '.join(COMPUTES)}; got {self.compute!r}")
        if self.compute == "int8" and (self.mode != "weight-only" or self.granularity != "group"):
            raise ConfigError("QuantConfig.compute='int8' rounds activations per block of group_size inputs: it needs "
                              f"mode='weight-only' and granularity='group'; got mode={self.mode!r}, granularity={self.granularity!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"QuantConfig.granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"QuantConfig.group_size must be a positive integer; got {self.group_size!r}")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"QuantConfig.observer must be one of {', '.join(OBSERVERS)}; got {self.observer!r}")
        if self.weight_observer not in ("minmax", "mse"):
            raise ConfigError(f"QuantConfig.weight_observer must be 'minmax' or 'mse'; got {self.weight_observer!r}")
        if isinstance(self.calibration_batches, bool) or not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
            raise ConfigError(f"QuantConfig.calibration_batches must be a positive integer; got {self.calibration_batches!r}")
        if self.lsq not in (None, "lsq", "lsq+"):
            raise ConfigError(f"QuantConfig.lsq must be None, 'lsq' or 'lsq+'; got {self.lsq!r}")
        if self.lsq and self.mode != "qat":
            raise ConfigError(f"QuantConfig.lsq={self.lsq!r} needs mode='qat' (learned step sizes are trained); got mode={self.mode!r}")
        if self.mode in ("weight-only", "dynamic") and self.bits == 16:
            raise ConfigError(f"mode={self.mode!r} stores integer weights of 2..8 bits; got bits=16")
        if self.mode == "dynamic" and self.bits != 8:
            raise ConfigError(f"mode='dynamic' runs int8 kernels: bits must be 8; got {self.bits}")
        if self.layer_bits is not None:
            if not isinstance(self.layer_bits, dict) or not all(isinstance(k, str) for k in self.layer_bits):
                raise ConfigError(f"QuantConfig.layer_bits must map layer names to bits; got {self.layer_bits!r}")
            for k, b in self.layer_bits.items():
                check_bits(b, f"QuantConfig.layer_bits[{k!r}]")
                if self.mode in ("weight-only", "dynamic") and b > 8:
                    raise ConfigError(f"mode={self.mode!r} stores integer weights of 2..8 bits; got layer_bits[{k!r}]={b}")
        if not isinstance(self.bias_correction, bool):
            raise ConfigError(f"QuantConfig.bias_correction must be True or False; got {self.bias_correction!r}")
        if self.bias_correction and self.mode != "static":
            raise ConfigError(f"QuantConfig.bias_correction=True needs mode='static' (it uses the calibration batches); got mode={self.mode!r}")
        g = self.smoothquant_min_gain
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g < float("inf"):
            raise ConfigError(f"QuantConfig.smoothquant_min_gain must be a number >= 0 (3 default); got {g!r}")
        if not isinstance(self.embeddings, bool):
            raise ConfigError(f"QuantConfig.embeddings must be True or False; got {self.embeddings!r}")
        eb = self.embedding_bits
        if eb is not None and (isinstance(eb, bool) or eb not in (4, 8)):
            raise ConfigError(f"QuantConfig.embedding_bits must be None (= bits), 4 or 8; got {eb!r}")
        if self.embeddings and (self.mode != "weight-only" or self.table_bits not in (4, 8) or self.granularity != "group"):
            raise ConfigError(
                "QuantConfig.embeddings=True stores tables group-wise: it needs mode='weight-only', bits 4 or 8 "
                "(or embedding_bits 4 or 8) and "
                f"granularity='group'; got mode={self.mode!r}, bits={self.table_bits}, granularity={self.granularity!r}"
            )
        if self.smoothquant_alpha is not None:
            a = self.smoothquant_alpha
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
                raise ConfigError(f"QuantConfig.smoothquant_alpha must be None or a number in [0, 1] (0.5 is usual); got {a!r}")
            if self.mode not in ("static", "qat", "dynamic"):
                raise ConfigError(
                    f"QuantConfig.smoothquant_alpha needs mode='static', 'qat' or 'dynamic' (it scales activations); got mode={self.mode!r}"
                )
        object.__setattr__(self, "modules", as_patterns(self.modules, "QuantConfig.modules"))
        object.__setattr__(self, "skip", as_patterns(self.skip, "QuantConfig.skip", none_ok=False))

    @property
    def act_block(self) -> int:
        """Inputs per int8 activation block of the weight-only layers (0: float activations)."""
        on = self.mode == "weight-only" and self.granularity == "group" and self.compute in ("auto", "int8")
        return self.group_size if on else 0

    @property
    def table_bits(self) -> int:
        """Bits of the embedding tables (``embedding_bits``, else ``bits``)."""
        return self.embedding_bits if self.embedding_bits is not None else self.bits

    def weight_scheme(self, layer: str | None = None) -> QScheme:
        bits = self.layer_bits.get(layer, self.bits) if self.layer_bits and layer is not None else self.bits
        return QScheme(
            bits=bits, symmetric=self.symmetric, signed=self.symmetric, granularity=self.granularity,
            group_size=self.group_size, axis=0, scale_rule=self.scale_rule if self.mode == "weight-only" else "absmax",
        )

    def act_scheme(self) -> QScheme:
        return QScheme(bits=self.act_bits, symmetric=False, signed=False, granularity="tensor")


@dataclass
class QuantPlan:
    """What :func:`quantize_` did: the config, the quantized layers, the folded (conv, bn) pairs,
    the bias-corrected layers and those that got a new bias, the SmoothQuant layers with an input
    multiply (``smoothed``) and those whose division went into a norm (``{layer: norm}``), the
    layers that became integer modules (``integer``, static) and why the others stay fake-quant
    (``fake_quant``: ``{layer: reason}``). ``tied_heads`` (:func:`quantize_llm_`): output
    projections that multiply by a quantized token table (``{head: table}``), in :meth:`to_dict`
    only when there are some."""

    config: QuantConfig
    layers: list[str] = field(default_factory=list)
    folded: list[list[str]] = field(default_factory=list)
    calibration_batches: int = 0
    bias_corrected: list[str] = field(default_factory=list)
    bias_added: list[str] = field(default_factory=list)
    smoothed: list[str] = field(default_factory=list)
    smoothed_into_norm: dict[str, str] = field(default_factory=dict)
    embeddings: list[str] = field(default_factory=list)
    integer: list[str] = field(default_factory=list)
    fake_quant: dict[str, str] = field(default_factory=dict)
    tied_heads: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "layers": list(self.layers), "folded": [list(p) for p in self.folded],
            "calibration_batches": self.calibration_batches, "bias_corrected": list(self.bias_corrected),
            "bias_added": list(self.bias_added), "smoothed": list(self.smoothed),
            "smoothed_into_norm": dict(self.smoothed_into_norm), "embeddings": list(self.embeddings),
            "integer": list(self.integer), "fake_quant": dict(self.fake_quant),
            **({"tied_heads": dict(self.tied_heads)} if self.tied_heads else {}),
        }


def _first_batch(loader: Iterable[Any]) -> Any:
    for batch in loader:
        return batch[0] if isinstance(batch, (tuple, list)) else batch
    raise ConfigError("the calibration loader gave no batches; static quantization needs at least one")


def _check_calibration(model: nn.Module, loader: Iterable[Any] | None, required: bool) -> Any:
    """Run the float model on the first calibration batch (no change to the model) and return it."""
    if loader is None:
        if required:
            raise ConfigError("mode='static' needs calibration data: pass calibration=<DataLoader or list of batches>")
        return None
    x = _first_batch(loader)
    device = model_device(model)
    try:
        with evaluating(model), torch.no_grad():
            ptq._call(model, x.to(device) if isinstance(x, torch.Tensor) else x)
    except (RuntimeError, ValueError) as exc:
        raise InputShapeError(f"calibration batch of shape {tuple(getattr(x, 'shape', ()))} does not fit the model: {exc}") from exc
    return x


def _linear_layers(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    dyn = config.mode == "dynamic"
    layers = ptq.quantizable_layers(model, config.modules, config.skip, ptq.QUANTIZABLE + (RNN_TYPES if dyn else ()))
    linear = {n: m for n, m in layers.items() if isinstance(m, (nn.Linear, *(RNN_TYPES if dyn else ())))}
    if not linear:
        what = "Linear/LSTM/GRU" if dyn else "Linear"
        raise ConfigError(f"mode={config.mode!r} quantizes {what} layers; the selection has only {sorted(layers)} (no {what})")
    for n, m in linear.items():
        if isinstance(m, RNN_TYPES):
            check_rnn_scheme(n, m, config.weight_scheme(n))
    if config.granularity == "group":
        for n, m in linear.items():
            if isinstance(m, nn.Linear) and m.in_features % config.group_size:
                raise ConfigError(
                    f"group_size={config.group_size} does not divide {n}.in_features={m.in_features}; "
                    f"pick a divisor or skip={n!r}"
                )
    return linear


def _check_layer_bits(config: QuantConfig, layers: dict[str, nn.Module]) -> None:
    unknown = sorted(set(config.layer_bits or {}) - set(layers))
    if unknown:
        raise ConfigError(f"layer_bits names layers that are not quantized: {unknown}; quantized layers: {sorted(layers)}")


def _swap_linear(model: nn.Module, names: Iterable[str], config: QuantConfig, from_float: bool) -> None:
    dyn = config.mode == "dynamic"
    for n in names:
        scheme = config.weight_scheme(n)
        lin = model.get_submodule(n)
        if isinstance(lin, RNN_TYPES):
            rnn = QuantizedRNN.from_float(lin, scheme, dynamic_act=dyn) if from_float else QuantizedRNN.empty_like(lin, scheme, dyn)
            ptq._set(model, n, rnn)
            continue
        if from_float:
            new = QuantizedLinear.from_float(lin, scheme, dynamic_act=dyn)
        else:
            new = QuantizedLinear(lin.in_features, lin.out_features, lin.bias is not None, scheme, dyn).to(lin.weight.device)
        new.act_block = config.act_block
        ptq._set(model, n, new)


def embedding_tables(model: nn.Module, config: QuantConfig) -> dict[str, nn.Embedding]:
    """The ``nn.Embedding`` tables ``config`` stores as integers (none unless ``config.embeddings``).

    Raises:
        ConfigError: ``group_size`` does not divide a selected table's width.
    """
    if not config.embeddings:
        return {}
    selected = Selector(config.modules, config.skip)
    out = {}
    from torchslim.quantize.embedding import embedding_scale

    for n, m in model.named_modules():
        if not isinstance(m, nn.Embedding) or embedding_scale(m) is None or not selected(n):
            continue
        if m.embedding_dim % config.group_size:
            raise ConfigError(f"group_size={config.group_size} does not divide {n}.embedding_dim={m.embedding_dim}; pick a divisor or skip={n!r}")
        if m.max_norm is not None:
            raise ConfigError(f"{n} renormalises its rows (max_norm={m.max_norm}); an integer table cannot; skip={n!r}")
        out[n] = m
    return out


def swap_embeddings(model: nn.Module, names: Iterable[str], config: QuantConfig, from_float: bool) -> None:
    """Replace the named tables by :class:`~torchslim.quantize.embedding.QuantizedEmbedding` (from the
    float weights, or empty for ``ts.load`` to fill)."""
    from torchslim.quantize.embedding import QuantizedEmbedding, embedding_scale

    scheme = QScheme(bits=config.table_bits, granularity="group", group_size=config.group_size, symmetric=True)
    for n in names:
        emb = model.get_submodule(n)
        if from_float:
            new = QuantizedEmbedding.from_float(emb, scheme)
        else:
            new = QuantizedEmbedding(emb.num_embeddings, emb.embedding_dim, scheme, emb.padding_idx,
                                     embedding_scale(emb) or 1.0).to(emb.weight.device)
        ptq._set(model, n, new)


def _reattach_smoothing(model: nn.Module, names: Iterable[str], scales: dict[str, torch.Tensor]) -> None:
    """Give the integer layers that replaced smoothed Linears their input division back."""
    from torchslim.quantize.smoothquant import attach_smoothing_

    for n in names:
        attach_smoothing_(model.get_submodule(n), scales.get(n))


def _example(model: nn.Module, calib_x: Any) -> Any:
    from torchslim._modelinfo import example_inputs, model_info

    if calib_x is not None:
        return calib_x[:1] if isinstance(calib_x, torch.Tensor) else calib_x
    if model_info(model) is not None:
        return example_inputs(model)
    raise ConfigError("BN folding needs example inputs: pass calibration data or build the model with ts.create_model")


def quantize_(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    data: Any = None,
    calibration: Iterable[Any] | None = None,
    **overrides: Any,
) -> QuantPlan:
    """Quantize ``model`` in place as ``config`` says; return the :class:`QuantPlan`.

    Args:
        model: any module with Conv/Linear layers (built by ``ts.create_model`` to be savable).
        config: the :class:`QuantConfig` (default: static int8), or a dict of its fields.
        data: the batches (a ``DataBundle``: its train split; or any iterable of batches);
            ``calibration=`` is its old name, still accepted.
        calibration: batches (tensors or ``(x, y)`` tuples) for static calibration; for QAT they
            initialise the activation ranges.
        overrides: :class:`QuantConfig` fields to change: ``quantize_(model, bits=4)`` is
            ``quantize_(model, QuantConfig(bits=4))``; with ``config``, ``config.replace(bits=4)``.

    Raises:
        ConfigError: bad settings, nothing to quantize, no / empty calibration data for static,
            an already quantized model, selected layers that are binary (``binarize_``).
        InputShapeError: calibration batches that do not fit the model.
        Bad input leaves the model unchanged.
    """
    calibration = batches_of(data, calibration, where="quantize_")
    config = QuantConfig.build(config, **overrides)
    select_modules(model, config.modules, config.skip, kinds=None)  # a pattern that selects nothing: refused now
    if any(isinstance(m, (QuantizedLinear, QuantizedRNN, FakeQuantize, LSQFakeQuantize, *INT8_TYPES)) for m in model.modules()):
        raise ConfigError("the model is already quantized; quantize the float model once")
    plan = QuantPlan(config)
    if config.mode in ("weight-only", "dynamic"):
        layers = _linear_layers(model, config)
        refuse_applied(model, layers, "quantize_", CANNOT_TAKE)
        _check_layer_bits(config, layers)
        tables = embedding_tables(model, config)
        _check_calibration(model, calibration, required=False)
        if config.smoothquant_alpha is not None:
            if calibration is None:
                raise ConfigError("QuantConfig.smoothquant_alpha needs calibration data (input ranges): pass calibration=<batches>")
            from torchslim.quantize.smoothquant import smooth_linears_

            plan.smoothed, plan.smoothed_into_norm = smooth_linears_(
                model, {n: model.get_submodule(n) for n in layers}, calibration, config.calibration_batches,
                float(config.smoothquant_alpha),
                min_gain=float(config.smoothquant_min_gain),
            )
        scales = {n: model.get_submodule(n).smooth_scale for n in plan.smoothed}
        _swap_linear(model, layers, config, from_float=True)
        _reattach_smoothing(model, plan.smoothed, scales)
        swap_embeddings(model, tables, config, from_float=True)
        plan.layers = list(layers)
        plan.embeddings = list(tables)
    else:
        selected = ptq.quantizable_layers(model, config.modules, config.skip)
        refuse_applied(model, selected, "quantize_", CANNOT_TAKE)
        _check_layer_bits(config, selected)
        if config.granularity == "group":
            raise ConfigError("granularity='group' is for weight-only mode; static / qat use 'channel' or 'tensor'")
        calib_x = _check_calibration(model, calibration, required=config.mode == "static")
        if config.smoothquant_alpha is not None and calibration is None:
            raise ConfigError("QuantConfig.smoothquant_alpha needs calibration data (input ranges): pass calibration=<batches>")
        if config.fold_bn:
            plan.folded = [list(p) for p in ptq.fold_batchnorm_(model, _example(model, calib_x))]
        layers = ptq.quantizable_layers(model, config.modules, config.skip)
        if config.smoothquant_alpha is not None:
            from torchslim.quantize.smoothquant import smooth_linears_

            plan.smoothed, plan.smoothed_into_norm = smooth_linears_(
                model, layers, calibration, config.calibration_batches, float(config.smoothquant_alpha),
                min_gain=float(config.smoothquant_min_gain),
            )
        ptq.attach_quantizers_(
            layers, {n: config.weight_scheme(n) for n in layers}, config.act_scheme(), weight_observer=config.weight_observer,
            act_observer=config.observer, lsq=config.lsq,
        )
        plan.layers = list(layers)
        if calibration is not None and not config.lsq:
            plan.calibration_batches = ptq.calibrate_(model, calibration, config.calibration_batches)
            if config.bias_correction:
                from torchslim.quantize.bias_correction import bias_correct_

                plan.bias_corrected, plan.bias_added = bias_correct_(model, layers, calibration, config.calibration_batches)
            if config.mode == "static":  # calibrated: the int8 layers become integer modules
                plan.integer, plan.fake_quant = to_int8_(model, layers)
        if config.mode == "qat":
            from torchslim.quantize.qat import set_qat_mode_

            set_qat_mode_(model, True, observed=calibration is not None)
        del selected
    from torchslim._modelinfo import record_plan

    record_plan(model, {"kind": KIND, **plan.to_dict()})
    return plan


def replay_quantize(model: nn.Module, plan: dict[str, Any]) -> None:
    """Re-create a saved quantization's structure on a freshly built model (weights load after)."""
    if plan.get("action") == INT8_ACTION:  # QAT finalized: its int8 layers became integer modules
        empty_int8_(model, plan.get("integer", []))
        return
    config = QuantConfig.from_dict({"compute": "float", **plan["config"]})  # saved before compute existed: float
    if config.mode in ("weight-only", "dynamic"):
        _swap_linear(model, plan["layers"], config, from_float=False)
        _reattach_smoothing(model, plan.get("smoothed", []), {})
        swap_embeddings(model, plan.get("embeddings", []), config, from_float=False)
        if plan.get("tied_heads"):
            from torchslim.quantize.llm import tie_heads

            tie_heads(model, plan["tied_heads"], act_blocks=plan.get("tied_head_act_blocks", {}))  # absent: float inputs
        return
    ptq.apply_fold(model, plan.get("folded", []))
    layers = {n: model.get_submodule(n) for n in plan["layers"]}
    if plan.get("smoothed"):
        from torchslim.quantize.smoothquant import attach_smoothing_

        for n in plan["smoothed"]:
            attach_smoothing_(model.get_submodule(n))
    ptq.attach_quantizers_(
        layers, {n: config.weight_scheme(n) for n in layers}, config.act_scheme(), weight_observer=config.weight_observer,
        act_observer=config.observer, lsq=config.lsq,
    )
    if plan.get("bias_added"):
        from torchslim.quantize.bias_correction import add_missing_biases_

        add_missing_biases_(model, plan["bias_added"])
    empty_int8_(model, plan.get("integer", []))


register_plan_kind(KIND, replay_quantize)
