"""Rotation of a decoder's residual stream (QuaRot-style), folded into the weights.

A Llama block reads the residual stream ``x`` through an RMSNorm into ``q/k/v`` and ``gate/up``,
and writes back through ``o_proj`` and ``down_proj``. For any orthogonal ``Q`` (``Q Q^T = I``)
the model computes exactly the same function with the stream rotated, ``x Q``, provided

1. every RMSNorm's scale is folded into the Linears that read its output (the norm of ``x Q``
   equals the norm of ``x``, but a per-channel scale does not commute with ``Q``): ``W <- W diag(g)``,
   ``g <- 1``; the final norm goes into ``lm_head``;
2. the embedding table becomes ``E Q``; every Linear reading the stream ``W <- W Q``; every Linear
   writing it ``W <- Q^T W`` (and its bias ``b <- Q^T b``).

Rotated weights have their outliers spread over all channels (a randomized Hadamard matrix
``Q = H diag(+-1) / sqrt(d)`` mixes every channel into every other with equal weight), so a
min-max int4 grid fits them better and activations lose their outlier channels (W8A8). The float
model's outputs are unchanged up to rounding (``rotate_`` checks none of this at run time; the
tests do).

The rotation is built for the hidden size ``d``: a Sylvester / Paley Hadamard matrix when ``d``
factors into 2, 12, 20 and 28-free Paley orders (SmolLM2's 576 = 12 x 12 x 4; Gemma's 640 = 20 x 32),
else a random orthogonal matrix (QR of a Gaussian). Tied embeddings are untied (``lm_head`` gets
its own copy; ``config.tie_word_embeddings`` becomes False), which ``ts.save`` / ``ts.load``
replay. Stock ``LlamaForCausalLM`` (and Mistral / Qwen2 with the same layout) stay stock modules.
Gemma-3 is refused: its post-attention / post-feed-forward norms scale the *output* of a block
before it is added to the stream, which a rotation of the stream cannot pass through.

Example:
    >>> from torchslim.quantize.rotate import hadamard
    >>> h = hadamard(12)
    >>> bool(((h @ h.T) == 12 * __import__("torch").eye(12, dtype=h.dtype)).all())
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from torchslim._modelinfo import model_info, record_plan, register_plan_kind
from torchslim.errors import ConfigError

__all__ = ["SUPPORTED", "hadamard", "random_hadamard", "rotate_", "replay_rotate"]

KIND = "rotate"
#: ``config.model_type`` of the decoders whose layout ``rotate_`` knows (pre-norm blocks, RMSNorm)
SUPPORTED = ("llama", "mistral", "qwen2")


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % k for k in range(2, int(math.isqrt(n)) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order ``q + 1`` for a prime ``q = 3 mod 4``."""
    residues = {(k * k) % q for k in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley_orders(limit: int) -> list[int]:
    return [q + 1 for q in range(3, limit) if q % 4 == 3 and _is_prime(q)]


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``), float64, or None when
    ``n`` is not a product of 2s and Paley orders (``q + 1``, ``q = 3 mod 4`` prime) this builds."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 2 == 0 and hadamard(n // 2) is not None:
        h = hadamard(n // 2)
        assert h is not None
        return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    for order in _paley_orders(n):
        if n % order == 0:
            rest = hadamard(n // order)
            if rest is not None:
                return torch.kron(_paley(order - 1), rest)
    return None


def random_hadamard(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """An orthogonal ``(n, n)`` float64 matrix: ``H diag(+-1) / sqrt(n)`` with random signs when a
    Hadamard matrix of order ``n`` is known, else a random orthogonal one; and which it is."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0), "random orthogonal"
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return h * signs.unsqueeze(0) / math.sqrt(n), "randomized Hadamard"


def _check(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    name = type(model).__name__
    if kind not in SUPPORTED or not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "layers"):
        raise ConfigError(f"rotate_ knows the pre-norm RMSNorm decoders ({', '.join(SUPPORTED)}: e.g. LlamaForCausalLM); "
                          f"got {name} (model_type={kind!r})"
                          + ("; Gemma-3's post-attention / post-feed-forward norms scale block outputs, which a "
                             "rotated residual stream cannot pass through" if kind and "gemma" in str(kind) else ""))
    from torchslim.quantize.weight_only import QuantizedLinear

    for n, m in model.named_modules():
        if "Norm" in type(m).__name__ and not type(m).__name__.endswith("RMSNorm"):
            raise ConfigError(f"rotate_ folds RMSNorm scales; {n} is a {type(m).__name__}")
        if isinstance(m, QuantizedLinear) or type(m).__name__.startswith("Quantized"):
            raise ConfigError(f"rotate_ works on the float model; {n} is already quantized (rotate first, then quantize)")
    info = model_info(model)
    if info is not None and any(p.get("kind") == KIND for p in info.plans):
        raise ConfigError("the model is already rotated")
    for n, m in model.named_modules():
        if "Norm" in type(m).__name__ and getattr(m, "bias", None) is not None:
            raise ConfigError(f"rotate_ folds RMSNorm scales; {n} has a bias (a LayerNorm)")
    return config


def _untie(model: nn.Module) -> bool:
    """Give ``lm_head`` its own weight if it shares the embedding table's; True if it did."""
    emb = model.get_input_embeddings()
    if model.lm_head.weight is not emb.weight:
        return False
    model.lm_head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * g.unsqueeze(0)).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


@torch.no_grad()
def _read(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.double() @ q).to(lin.weight.dtype))


@torch.no_grad()
def _write(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))


@torch.no_grad()
def rotate_(model: nn.Module, *, seed: int = 0) -> dict[str, Any]:
    """Rotate ``model``'s residual stream in place (see the module doc); return what was done.

    Args:
        model: a float ``LlamaForCausalLM`` (or Mistral / Qwen2) from transformers.
        seed: the random signs (or random orthogonal matrix).

    Returns:
        ``{"kind": "rotate", "matrix": "randomized Hadamard" | "random orthogonal", "size": d,
        "seed": seed, "untied": bool}``, also recorded on the model (``ts.save`` / ``ts.load``).

    Raises:
        ConfigError: another architecture (Gemma-3 named), an already quantized or rotated model.
            The model is unchanged then.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer; got {seed!r}")
    config = _check(model)
    body = model.model
    d = int(config.hidden_size)
    q, what = random_hadamard(d, seed)
    untied = _untie(model)
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fold_norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _read(lin, q)
        _write(attn.o_proj, q)
        _write(mlp.down_proj, q)
    _fold_norm(body.norm, [model.lm_head])
    _read(model.lm_head, q)
    emb = model.get_input_embeddings()
    emb.weight.copy_((emb.weight.double() @ q).to(emb.weight.dtype))
    plan = {"kind": KIND, "matrix": what, "size": d, "seed": seed, "untied": untied}
    record_plan(model, plan)
    return dict(plan)


def replay_rotate(model: nn.Module, plan: dict[str, Any]) -> None:
    """Re-create a rotated model's structure on a freshly built one: untie ``lm_head`` (the
    rotated weights and unit norm scales load afterwards)."""
    if plan.get("untied"):
        _untie(model)


register_plan_kind(KIND, replay_rotate)
