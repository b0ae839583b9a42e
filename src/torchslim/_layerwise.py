"""Layer-by-layer post-training compression: calibration statistics of every ``nn.Linear`` input.

Wanda, SparseGPT and GPTQ all compress one Linear at a time from ``H = X^T X``, the Gram matrix
of the layer's calibration inputs (Wanda needs only its diagonal, ``||X_j||^2``, which is also
collected for convolutions: ``X_j`` is input channel ``j`` over every position). Done
*sequentially*, as the papers do, each layer sees the inputs produced by the layers already
compressed before it, so errors do not compound unseen. :func:`run_layerwise` does this for any
model, without knowing its block structure:

1. one forward pass records the order in which the selected Linears run and which of them read
   the very same input tensor (``query``/``key``/``value`` of an attention block form one group);
2. for each group, in order, the calibration batches run forward until the group's input is seen
   (a hook stops the pass there), ``H`` is accumulated, and ``process(name, module, stats)`` edits
   the group's layers before the next group is measured.

The second-order math SparseGPT (a family of ``prune``) and GPTQ (of ``quantize``) share lives
here too: :meth:`LayerStats.hessian` and :func:`inverse_hessian_factor`.

A calibration *batch* is a tensor (one positional input), an ``(inputs, targets)`` pair (the
targets are ignored), a dict of keyword inputs (e.g. a tokenizer's output) or an
:class:`~torchslim.graph.inputs.Inputs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchslim._select import select_modules
from torchslim._utils import evaluating, model_device
from torchslim.errors import ConfigError
from torchslim.graph.inputs import Inputs

__all__ = ["LayerStats", "inverse_hessian_factor", "linear_layers", "materialize_batches", "obs_sweep", "run_layerwise"]


@dataclass
class LayerStats:
    """Calibration statistics of one layer's input.

    Attributes:
        xtx: ``sum_n x_n x_n^T`` over every input row (tokens, samples), ``(in, in)``, float32
            (``None`` when only the diagonal was asked for).
        sq: ``sum_n x_n^2`` per input feature (the diagonal), ``(in,)``.
        rows: the number of input rows ``n``.
    """

    xtx: torch.Tensor | None
    sq: torch.Tensor
    rows: int

    def hessian(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``2 X^T X / n``, the Hessian of the layer-wise squared error (SparseGPT / GPTQ).

        A layer the calibration data never reached (``rows == 0``) gets the identity, which makes
        SparseGPT fall back to magnitude and GPTQ to rounding to nearest.
        """
        if self.xtx is None:
            raise ConfigError("these statistics were collected without the full X^T X")
        if self.rows == 0:
            return torch.eye(self.xtx.shape[0], device=device if device is not None else self.xtx.device)
        h = self.xtx * (2.0 / self.rows)
        return h if device is None else h.to(device)


def inverse_hessian_factor(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, in float64 for stability.

    Input features that never fired (zero diagonal) get a diagonal of 1 so ``H`` stays invertible.
    Used by SparseGPT and GPTQ to spread one column's error over the columns not yet visited.

    Raises:
        ConfigError: ``H`` is not positive definite even after dampening it 10^5 times more.

    Example:
        >>> f = inverse_hessian_factor(torch.eye(2) * 4, damp=0.0)
        >>> [round(v, 3) for v in torch.diag(f).tolist()]
        [0.5, 0.5]
    """
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    lam = damp * torch.mean(torch.diag(h))
    idx = torch.arange(h.shape[0], device=h.device)
    for attempt in range(6):
        try:
            hd = h.clone()
            hd[idx, idx] += lam * (10**attempt) if lam > 0 else 1e-8 * (10**attempt)
            chol = torch.linalg.cholesky(hd)
            inv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inv, upper=True)
        except RuntimeError:  # not positive definite: dampen more
            continue
    raise ConfigError("SparseGPT/GPTQ: the calibration Hessian is not positive definite even with strong dampening")


Replace = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def obs_sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    replace: Replace,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    on_block: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The Optimal-Brain-Surgeon column sweep that GPTQ and SparseGPT share (Frantar & Alistarh).

    The columns of ``weight`` ``(out, in)`` are visited left to right in lazy blocks of
    ``blocksize``. ``replace(j, i, w1, h1, rest)`` returns the value column ``j`` (column ``i`` of
    the block ``w1``, already corrected for the error of the columns before it) takes: quantized,
    or with pruned entries zeroed; ``rest`` is the columns after the block (corrected once the
    block ends), for a quantization group longer than the block. That column's error, scaled by the inverse Hessian's diagonal,
    is spread over the block's later columns at once and over the rest of the matrix once per
    block. ``on_block(i1, i2, w1, h1)`` runs before each block (SparseGPT picks its mask there).
    Input features that never fired (a zero on the Hessian's diagonal) start at zero.

    Returns:
        The new weight, float64, every column replaced.

    Example:
        >>> w = torch.tensor([[1.0, 2.0]])
        >>> obs_sweep(w, torch.eye(2), lambda j, i, w1, h1, rest: torch.round(w1[:, i]), damp=0.0).tolist()
        [[1.0, 2.0]]
    """
    w = weight.detach().double().clone()
    hinv = inverse_hessian_factor(hessian, damp)
    w[:, torch.diag(hessian) == 0] = 0
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        if on_block is not None:
            on_block(i1, i2, w1, h1)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = replace(i1 + i, i, w1, h1, w[:, i2:])
            q1[:, i] = q
            e = (col - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _in_features(module: nn.Module) -> int:
    return module.in_channels if isinstance(module, _CONVS) else module.in_features


def _feature_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as ``(rows, features)``: features last for a Linear, channels for a conv."""
    if isinstance(module, _CONVS):
        x = x.movedim(1, -1)
    return x.detach().reshape(-1, x.shape[-1]).float()


def linear_layers(
    model: nn.Module, modules: Sequence[str] | str | None = None, skip: Sequence[str] | str | None = ()
) -> dict[str, nn.Linear]:
    """Name -> ``nn.Linear`` for the layers ``modules`` selects (all by default), minus ``skip``.

    Patterns are those of :func:`torchslim._select.select_modules`: exact names, globs or
    ``re:`` regexes; a container's name selects the Linears inside it.

    Raises:
        ConfigError: a pattern that selects no module of the model (with the nearest name), or an
            empty selection (the message lists the model's Linear layers). The model is untouched.
    """
    names = select_modules(model, modules, skip, kinds=(nn.Linear,))
    if not names:
        from torchslim._modelinfo import integer_layers_note

        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ConfigError(
            f"modules={modules!r} skip={skip!r} selects no nn.Linear; "
            f"the model's are: {', '.join(linears[:20]) or 'none'}{integer_layers_note(model, 'this method')}"
        )
    return {n: model.get_submodule(n) for n in names}


def _as_call(batch: Any) -> Inputs:
    if isinstance(batch, Inputs):
        return batch
    if isinstance(batch, torch.Tensor):
        return Inputs((batch,))
    if isinstance(batch, dict):
        return Inputs((), dict(batch))
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return _as_call(batch[0])
    if isinstance(batch, (tuple, list)) and batch:
        return Inputs(tuple(batch))
    raise ConfigError(
        f"a calibration batch must be a tensor, an (inputs, targets) pair, a dict of keyword inputs or Inputs; "
        f"got {type(batch).__name__}"
    )


def materialize_batches(calibration: Iterable[Any] | None, max_batches: int, method: str) -> list[Inputs]:
    """The first ``max_batches`` calibration batches as :class:`Inputs`.

    Raises:
        ConfigError: no calibration given, or it yields no batch.
    """
    if calibration is None:
        raise ConfigError(f"{method} needs calibration data: pass calibration= batches of model inputs (e.g. tokenized sentences)")
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ConfigError(f"calibration_batches must be a positive integer; got {max_batches!r}")
    if isinstance(calibration, (torch.Tensor, dict, Inputs)):
        calibration = [calibration]
    out = []
    for batch in calibration:
        if len(out) >= max_batches:
            break
        out.append(_as_call(batch))
    if not out:
        raise ConfigError(f"{method} got no calibration batches (the calibration data is empty)")
    return out


class _Stop(Exception):
    pass


def _run(model: nn.Module, batch: Inputs) -> None:
    b = batch.to(model_device(model))
    try:
        model(*b.args, **b.kwargs)
    except _Stop:
        pass


def _groups(model: nn.Module, layers: dict[str, nn.Module], first: Inputs) -> tuple[list[list[str]], set[str]]:
    """Linears in execution order, grouped by shared input tensor; plus those called more than once."""
    order: list[str] = []
    inputs: list[torch.Tensor] = []
    calls: dict[str, int] = {}
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
                inputs.append(args[0])

        return hook

    for n, m in layers.items():
        handles.append(m.register_forward_pre_hook(hook_for(n)))
    try:
        with torch.no_grad():
            _run(model, first)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for i, n in enumerate(order):
        if groups and inputs[order.index(groups[-1][0])] is inputs[i]:
            groups[-1].append(n)
        else:
            groups.append([n])
    unused = sorted(set(layers) - set(order))
    groups.extend([n] for n in unused)  # never called: statistics stay empty
    return groups, {n for n, c in calls.items() if c > 1}


def run_layerwise(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list[Inputs],
    process: Callable[[str, nn.Linear, LayerStats], None],
    *,
    full: bool = True,
    sequential: bool = True,
) -> list[str]:
    """Collect input statistics for each layer and call ``process`` on it, in execution order.

    Args:
        model: run in eval mode under ``no_grad`` (its training flag is restored).
        layers: the Linears to process (see :func:`linear_layers`).
        batches: calibration batches (see :func:`materialize_batches`).
        process: ``process(name, module, stats)`` edits the layer in place.
        full: collect the full ``X^T X`` (SparseGPT, GPTQ); else only its diagonal (Wanda;
            convolutions may then be among ``layers``: their statistics are per input channel).
        sequential: measure each group after the earlier groups were processed (the papers'
            setting); ``False`` measures every layer once on the unmodified model (faster).

    Returns:
        The layer names in the order they were processed.
    """
    convs = [n for n, m in layers.items() if isinstance(m, _CONVS)]
    if full and convs:
        raise ConfigError(f"the full X^T X is collected for Linear layers only; {convs[0]} is a convolution")
    done: list[str] = []
    with evaluating(model):
        groups, repeated = _groups(model, layers, batches[0])
        plan = groups if sequential else [[n for g in groups for n in g]]
        for group in plan:
            stats = _collect(model, {n: layers[n] for n in group}, batches, full, stop=sequential and not (set(group) & repeated))
            for n in group:
                process(n, layers[n], stats[n])
                done.append(n)
    return done


def _collect(model: nn.Module, layers: dict[str, nn.Module], batches: list[Inputs], full: bool, stop: bool) -> dict[str, LayerStats]:
    acc: dict[str, list[Any]] = {n: [None, None, 0] for n in layers}
    last = list(layers)[-1]
    handles = []
    shared: list[Any] = [None, None, None, None]  # the last input seen and its (rows, sq, xtx): q/k/v read one tensor

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if shared[0] is args[0] and not isinstance(module, _CONVS):
                x, sq, xtx = shared[1], shared[2], shared[3]
            else:
                x = _feature_rows(module, args[0])
                sq = (x * x).sum(dim=0)
                xtx = x.T @ x if full else None
                if not isinstance(module, _CONVS):
                    shared[:] = [args[0], x, sq, xtx]
            a = acc[name]
            a[1] = sq if a[1] is None else a[1] + sq
            if full:
                a[0] = xtx if a[0] is None else a[0] + xtx
            a[2] += x.shape[0]
            if stop and name == last:
                raise _Stop

        return hook

    for n, m in layers.items():
        handles.append(m.register_forward_pre_hook(hook_for(n)))
    try:
        with torch.no_grad():
            for b in batches:
                _run(model, b)
    finally:
        for h in handles:
            h.remove()
        shared[:] = [None, None, None, None]
    out = {}
    for n, m in layers.items():
        xtx, sq, rows = acc[n]
        k = _in_features(m)
        w = m.weight
        if sq is None:
            sq = torch.zeros(k, device=w.device)
            xtx = torch.zeros(k, k, device=w.device) if full else None
        out[n] = LayerStats(xtx, sq, rows)
    return out
