"""``nn.MultiheadAttention`` whose inner width no longer equals its embedding width.

PyTorch's attention (both the fused ``_native_multi_head_attention`` fast path and
``F.multi_head_attention_forward``) assumes ``num_heads * head_dim == embed_dim == query width``.
Once heads or the residual width are pruned independently that no longer holds, so surgery
switches the module's class (the same object stays in place) to :class:`SlicedMultiheadAttention`,
which computes the same function for any widths, and switches it back when the widths agree
again. Its ``_qkv_same_embed_dim`` reads False so ``nn.TransformerEncoderLayer`` / ``Encoder``
never hand its tensors to the fused kernels, which would reject the shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SlicedMultiheadAttention", "sync_mha"]


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class SlicedMultiheadAttention(nn.MultiheadAttention):
    """Multi-head attention with ``num_heads * head_dim`` inner channels and any input/output width.

    Never constructed directly: surgery assigns this class to a pruned ``nn.MultiheadAttention``.
    Parameters keep their names (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
    ``out_proj``), so state dicts stay compatible with the original module's layout.
    """

    @property  # type: ignore[override]
    def _qkv_same_embed_dim(self) -> bool:  # keeps the fused encoder-layer kernels away
        return False

    @_qkv_same_embed_dim.setter
    def _qkv_same_embed_dim(self, value: bool) -> None:
        self.__dict__["_packed_qkv"] = bool(value)

    def _weights(self) -> tuple[Tensor, Tensor, Tensor, list[Tensor | None]]:
        inner = self.num_heads * self.head_dim
        if self.in_proj_weight is not None:
            wq, wk, wv = self.in_proj_weight.split(inner, dim=0)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b = self.in_proj_bias
        biases: list[Tensor | None] = list(b.split(inner)) if b is not None else [None, None, None]
        return wq, wk, wv, biases

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same contract as :meth:`torch.nn.MultiheadAttention.forward`."""
        if self.bias_k is not None or self.add_zero_attn:
            raise NotImplementedError("pruned attention with bias_k/bias_v or add_zero_attn is not supported")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        wq, wk, wv, (bq, bk, bv) = self._weights()
        bsz, tgt, _ = query.shape
        src = key.shape[1]
        h, hd = self.num_heads, self.head_dim
        q = F.linear(query, wq, bq).view(bsz, tgt, h, hd).transpose(1, 2)
        k = F.linear(key, wk, bk).view(bsz, src, h, hd).transpose(1, 2)
        v = F.linear(value, wv, bv).view(bsz, src, h, hd).transpose(1, 2)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (B * heads, L, S)
            mask = mask.view(bsz, h, tgt, src)
        kpm = _additive(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.view(bsz, 1, 1, src)
            mask = kpm if mask is None else mask + kpm
        causal = bool(is_causal and mask is None)
        p = self.dropout if self.training else 0.0
        weights = None
        if not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        else:
            scores = (q * hd**-0.5) @ k.transpose(-2, -1)
            if causal:
                scores = scores.masked_fill(torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            if mask is not None:
                scores = scores + mask
            attn = scores.softmax(dim=-1)
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if p:
                attn = F.dropout(attn, p=p)
            out = attn @ v
        out = F.linear(out.transpose(1, 2).reshape(bsz, tgt, h * hd), self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights


def sync_mha(module: nn.MultiheadAttention) -> None:
    """Set widths and head count of an attention module from its (sliced) tensors; pick its class.

    ``head_dim`` is never pruned, so ``num_heads = inner width // head_dim``. The module becomes a
    :class:`SlicedMultiheadAttention` when its widths no longer satisfy PyTorch's own attention,
    and a plain ``nn.MultiheadAttention`` again when they do.
    """
    packed = module.in_proj_weight is not None
    if packed:
        inner, embed = module.in_proj_weight.shape[0] // 3, module.in_proj_weight.shape[1]
        kdim = vdim = embed
    else:
        inner, embed = module.q_proj_weight.shape
        kdim, vdim = module.k_proj_weight.shape[1], module.v_proj_weight.shape[1]
    out = module.out_proj.weight.shape[0]
    module.num_heads = inner // module.head_dim
    module.embed_dim, module.kdim, module.vdim = embed, kdim, vdim
    plain = inner == embed == out and packed == (kdim == embed and vdim == embed)
    if plain and type(module) is SlicedMultiheadAttention:
        packed_flag = module.__dict__.pop("_packed_qkv", packed)
        module.__class__ = nn.MultiheadAttention
        module._qkv_same_embed_dim = packed_flag
    elif not plain and type(module) is nn.MultiheadAttention:
        module.__dict__["_packed_qkv"] = module.__dict__.get("_qkv_same_embed_dim", packed)
        module.__class__ = SlicedMultiheadAttention
