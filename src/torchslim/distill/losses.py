"""Distillation losses: tensor functions first, then the registered loss modules built on them.

Every loss module takes the student's and the teacher's logits, the hard labels (``-1`` for
unlabeled samples) and the tapped features paired student -> teacher, and returns one scalar.
Modules that need learned adapters (FitNets regressors, TinyBERT's ``W_h``) build them in
:meth:`DistillLoss.setup` from one probe batch, before training starts, so the optimizer sees them.

Example:
    >>> import torch
    >>> s, t = torch.randn(4, 10), torch.randn(4, 10)
    >>> y = torch.tensor([0, 1, 2, 3])
    >>> float(kd_loss(t, t, y, temperature=4.0, alpha=1.0))  # a student equal to its teacher
    0.0
    >>> loss = KDLoss(temperature=4.0, alpha=0.9)
    >>> loss(s, t, y).shape
    torch.Size([])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._registry import register_method
from torchslim.errors import ConfigError

__all__ = [
    "kd_loss",
    "vocab_kl_loss",
    "attention_map",
    "at_loss",
    "hint_loss",
    "make_adapter",
    "DistillLoss",
    "KDLoss",
    "HintLoss",
    "ATLoss",
    "TinyBERTLoss",
]

Pairs = Sequence[tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- tensor functions


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Hinton et al. (2015): ``alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(s, y)``.

    The soft term is scaled by ``T^2`` so its gradients keep their size as ``T`` changes. The
    hard term uses the labeled rows only (``targets >= 0``) and is dropped when there are none.
    """
    t = float(temperature)
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits.detach() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    if alpha >= 1.0 or targets is None:
        return soft
    labeled = targets >= 0
    if not bool(labeled.any()):
        return soft
    hard = F.cross_entropy(student_logits[labeled], targets[labeled])
    return alpha * soft + (1.0 - alpha) * hard


class _VocabKL(torch.autograd.Function):
    """``T^2 KL(softmax(t / T) || softmax(s / T))`` averaged over rows, with its gradient made in
    the forward pass, a block of rows at a time (see :func:`vocab_kl_loss`)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temperature: float, rows: int) -> torch.Tensor:  # type: ignore[override]
        n, temp = s.shape[0], float(temperature)
        grad = torch.empty(s.shape, dtype=torch.float32, device=s.device)
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        for i in range(0, n, rows):
            log_q = torch.log_softmax(s[i:i + rows].float() / temp, dim=-1)
            log_p = torch.log_softmax(t[i:i + rows].float() / temp, dim=-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum(dtype=torch.float64)
            grad[i:i + rows] = log_q.exp_().sub_(p)  # d KL / d (s / T) = q - p
        ctx.save_for_backward(grad)
        ctx.scale = temp / n  # T^2 / n, times the 1 / T of s / T
        ctx.dtype = s.dtype
        return (total * (temp * temp / n)).float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * (grad_out * ctx.scale)).to(ctx.dtype), None, None, None


def vocab_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  rows: int = 16) -> torch.Tensor:
    """``T^2 KL(p_t^T || p_s^T)`` per row of ``(N, vocab)`` logits, averaged over the rows: the soft
    term of :func:`kd_loss` (``alpha=1``), equal to it in value and gradient, for large vocabularies.

    Both softmaxes, the loss and the gradient (``T (q - p) / N``) are made in one pass over
    ``rows`` rows at a time, which stay in cache, in float32 whatever the logits' dtype (the
    sum in float64); autograd's chain through ``log_softmax`` and ``kl_div`` reads and writes
    each ``N x vocab`` tensor several times. On 1,024 x 49,152 logits (SmolLM2's vocabulary, 2
    cores) it takes 0.33 s with its backward pass against 0.85 s. The teacher gets no gradient.

    Example:
        >>> s, t = torch.randn(6, 50, requires_grad=True), torch.randn(6, 50)
        >>> ref = kd_loss(s, t, None, temperature=2.0, alpha=1.0)
        >>> got = vocab_kl_loss(s, t, temperature=2.0, rows=4)
        >>> bool(torch.allclose(got, ref))
        True
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ConfigError(f"vocab_kl_loss takes two (N, vocab) logits of one shape; got {tuple(student_logits.shape)} "
                          f"and {tuple(teacher_logits.shape)}")
    return _VocabKL.apply(student_logits, teacher_logits.detach(), float(temperature), max(1, int(rows)))


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis (2017): ``mean_c |A_c|^p`` over channels, flattened and L2-normalised.

    Takes feature maps ``(N, C, H, W)`` or token features ``(N, T, C)``; returns ``(N, H*W)`` or ``(N, T)``.
    """
    if features.dim() == 4:
        q = features.abs().pow(p).mean(dim=1)
    elif features.dim() == 3:
        q = features.abs().pow(p).mean(dim=2)
    else:
        raise ConfigError(
            f"attention transfer needs feature maps (N, C, H, W) or token features (N, T, C); got shape {tuple(features.shape)}"
        )
    return F.normalize(q.flatten(1), dim=1)


def _same_size(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps to the spatial size of the smaller one."""
    if s.dim() != 4 or s.shape[2:] == t.shape[2:]:
        return s, t
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    return F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared distance between normalised attention maps (spatial sizes pooled to match)."""
    s, t = _same_size(student, teacher.detach())
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


def hint_loss(adapted_student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al. 2015): MSE between adapted student features and teacher features."""
    s, t = _same_size(adapted_student, teacher.detach())
    return F.mse_loss(s, t)


def make_adapter(student: torch.Size, teacher: torch.Size) -> nn.Module:
    """A learned map from student to teacher width: 1x1 conv for maps, linear otherwise.

    Identity when the widths (dim 1 for maps, the last dim otherwise) already agree.

    Raises:
        ConfigError: The features differ in rank (a map against a vector).
    """
    if len(student) != len(teacher):
        raise ConfigError(
            f"cannot match student features of shape {tuple(student)} to teacher features of shape "
            f"{tuple(teacher)}: pick taps of the same kind (both feature maps or both vectors)"
        )
    if len(student) == 4:
        cs, ct = student[1], teacher[1]
        return nn.Identity() if cs == ct else nn.Conv2d(cs, ct, kernel_size=1, bias=False)
    cs, ct = student[-1], teacher[-1]
    return nn.Identity() if cs == ct else nn.Linear(cs, ct, bias=False)


# --------------------------------------------------------------------------- loss modules


def _check_pairs(pairs: Pairs, expected: int, what: str) -> None:
    if len(pairs) != expected:
        raise ConfigError(f"{what} got {len(pairs)} feature pair(s) but was set up for {expected}")


class DistillLoss(nn.Module):
    """Base of the distillation losses: the Hinton KD term plus optional feature terms.

    Args:
        temperature: Softmax temperature ``T`` of the KD term (> 0).
        alpha: Weight of the soft KD term; ``1 - alpha`` weighs the hard-label loss.
        feature_weight: Weight of the feature term (``None``: the loss's own default).

    Attributes:
        feature_kind: What :func:`~torchslim.distill.mapping.auto_taps` should look for
            (``None`` when the loss needs no features).
        adapters: Learned adapters, one per feature pair (built by :meth:`setup`).
    """

    feature_kind: str | None = None
    default_feature_weight = 0.0

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, feature_weight: float | None = None):
        super().__init__()
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.feature_weight = float(self.default_feature_weight if feature_weight is None else feature_weight)
        self.adapters = nn.ModuleList()

    def setup(self, pairs: Pairs, attention_pairs: Pairs = ()) -> None:
        """Build the adapters from one probe batch of paired features (shapes only are used)."""

    def soft(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, targets, self.temperature, self.alpha)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor | None = None,
        pairs: Pairs = (),
        attention_pairs: Pairs = (),
    ) -> torch.Tensor:
        return self.soft(student_logits, teacher_logits, targets)


@register_method("distill.loss", "kd", description="Hinton KD: T^2 KL of softened logits + (1-alpha) CE")
class KDLoss(DistillLoss):
    """Hinton, Vinyals & Dean (2015), Distilling the Knowledge in a Neural Network."""


@register_method("distill.loss", "hint", description="FitNets hints: KD + MSE of adapted features (1x1 conv / linear)")
class HintLoss(DistillLoss):
    """Romero et al. (2015), FitNets: KD plus ``feature_weight`` x the mean hint MSE over the taps.

    The student's tapped features pass through a learned 1x1 conv (feature maps) or linear
    (vectors) when its width differs from the teacher's; spatial sizes are pooled to match.
    """

    feature_kind = "features"
    default_feature_weight = 1.0

    def setup(self, pairs: Pairs, attention_pairs: Pairs = ()) -> None:
        self.adapters = nn.ModuleList(make_adapter(s.shape, t.shape) for s, t in pairs)

    def forward(self, student_logits, teacher_logits, targets=None, pairs=(), attention_pairs=()):
        _check_pairs(pairs, len(self.adapters), "hint loss")
        loss = self.soft(student_logits, teacher_logits, targets)
        if pairs and self.feature_weight:
            hints = [hint_loss(adapter(s), t) for adapter, (s, t) in zip(self.adapters, pairs)]
            loss = loss + self.feature_weight * torch.stack(hints).mean()
        return loss


@register_method("distill.loss", "at", description="attention transfer: KD + beta/2 x distance of normalised attention maps")
class ATLoss(DistillLoss):
    """Zagoruyko & Komodakis (2017), Paying More Attention to Attention.

    KD plus ``feature_weight / 2`` x the sum over tap pairs of the mean squared distance of the
    normalised maps ``mean_c A_c^2`` (the paper's ``beta = 1000``). No learned parameters.
    """

    feature_kind = "maps"
    default_feature_weight = 1000.0

    def setup(self, pairs: Pairs, attention_pairs: Pairs = ()) -> None:
        for s, t in pairs:
            attention_map(s)
            attention_map(t)  # fail early on vectors

    def forward(self, student_logits, teacher_logits, targets=None, pairs=(), attention_pairs=()):
        loss = self.soft(student_logits, teacher_logits, targets)
        if pairs and self.feature_weight:
            loss = loss + self.feature_weight / 2 * sum(at_loss(s, t) for s, t in pairs)
        return loss


@register_method("distill.loss", "tinybert", description="TinyBERT: MSE of hidden states (W_h adapters) + attention maps + KD")
class TinyBERTLoss(DistillLoss):
    """Jiao et al. (2020), TinyBERT: transformer-layer distillation plus prediction-layer KD.

    ``feature_weight`` x (sum of ``MSE(h_s W_h, h_t)`` over hidden-state pairs + sum of
    ``MSE(A_s, A_t)`` over attention-map pairs) + the KD term. Attention maps ``(N, heads, T, T)``
    are compared head by head, or averaged over heads when the head counts differ.
    """

    feature_kind = "layers"
    default_feature_weight = 1.0

    def setup(self, pairs: Pairs, attention_pairs: Pairs = ()) -> None:
        self.adapters = nn.ModuleList(make_adapter(s.shape, t.shape) for s, t in pairs)
        for s, t in attention_pairs:
            if s.dim() != t.dim() or s.shape[-2:] != t.shape[-2:]:
                raise ConfigError(
                    f"TinyBERT attention maps must agree in sequence length; got student {tuple(s.shape)} "
                    f"and teacher {tuple(t.shape)}"
                )

    def forward(self, student_logits, teacher_logits, targets=None, pairs=(), attention_pairs=()):
        _check_pairs(pairs, len(self.adapters), "TinyBERT loss")
        loss = self.soft(student_logits, teacher_logits, targets)
        if not self.feature_weight:
            return loss
        terms = [F.mse_loss(adapter(s), t.detach()) for adapter, (s, t) in zip(self.adapters, pairs)]
        for s, t in attention_pairs:
            if s.dim() == 4 and s.shape[1] != t.shape[1]:
                s, t = s.mean(dim=1), t.mean(dim=1)
            terms.append(F.mse_loss(s, t.detach()))
        if terms:
            loss = loss + self.feature_weight * torch.stack(terms).sum()
        return loss
