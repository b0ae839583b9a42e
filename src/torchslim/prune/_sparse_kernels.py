"""CSR inference for very sparse Linear layers (PyTorch's sparse CSR matmul).

On CPU, ``torch.sparse.mm`` with a CSR weight beats the dense GEMM only at high sparsity and
small batches; ``benchmarks/sparsity_vs_torch_prune.py`` measures where. This is an inference
conversion of a *copy* of the model: the converted model is not meant for ``ts.save`` (save the
finalized model, whose file is already compressed, and convert after loading).

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(8, 4)
    >>> with torch.no_grad():
    ...     lin.weight[:, :6] = 0
    >>> fast = CSRLinear.from_linear(lin)
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(fast(x), lin(x), atol=1e-6)
    True
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.prune.unstructured import valid_sparsity

__all__ = ["CSRLinear", "to_csr_inference"]


class CSRLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a sparse CSR tensor (inference only, no autograd)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            self.weight_csr = weight.detach().to_sparse_csr()
        self.bias = None if bias is None else bias.detach().clone()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> CSRLinear:
        return cls(linear.weight, linear.bias)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - move the CSR tensor with .to()/.cuda()
        self.weight_csr = fn(self.weight_csr)
        if self.bias is not None:
            self.bias = fn(self.bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight_csr, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight_csr.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def to_csr_inference(model: nn.Module, min_sparsity: float = 0.9, *, layers: Iterable[str] | None = None) -> nn.Module:
    """A copy of ``model`` whose Linear layers at least ``min_sparsity`` sparse use :class:`CSRLinear`
    (or exactly the Linear layers named in ``layers``: a latency-budget ``sparsify_`` plan's
    ``latency["csr_layers"]``, the ones measured faster as CSR).

    Raises:
        ConfigError: ``min_sparsity`` outside [0, 1], a name in ``layers`` that is no plain
            ``nn.Linear`` of the model, or the model still carries masks (``finalize_`` it first).
    """
    min_sparsity = valid_sparsity(min_sparsity, "min_sparsity")
    if any(hasattr(m, "parametrizations") for m in model.modules()):
        raise ConfigError("to_csr_inference needs plain weights: call finalize_(model) first")
    wanted = None if layers is None else set(layers)
    if wanted is not None:
        linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
        unknown = sorted(wanted - linears)
        if unknown:
            raise ConfigError(f"to_csr_inference: {', '.join(unknown[:3])} {'is' if len(unknown) == 1 else 'are'} no "
                              f"nn.Linear of the model; layers= takes Linear layer names")
    out = copy.deepcopy(model).eval()
    for name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if wanted is not None:
                if full in wanted:
                    setattr(module, child_name, CSRLinear.from_linear(child))
                continue
            sparsity = 1.0 - float(torch.count_nonzero(child.weight)) / child.weight.numel()
            if sparsity >= min_sparsity:
                setattr(module, child_name, CSRLinear.from_linear(child))
    return out
