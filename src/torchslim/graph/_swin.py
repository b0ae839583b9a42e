"""torchvision's Swin window attention whose inner width no longer equals its input width.

``torchvision.models.swin_transformer.shifted_window_attention`` takes the head width from the
*input*: ``qkv.reshape(..., 3, num_heads, C // num_heads)`` with ``C = x.shape[-1]``, and scales the
queries by ``(C // num_heads) ** -0.5``. The residual width and the attention's inner width are
therefore tied by count, so neither can be pruned alone (the residual groups of a Swin were left
whole, and a pruned Swin kept ~70% of its MACs at ratio 0.5).

:class:`SlicedShiftedWindowAttention` (and its V2 twin) computes the same function with the head
width read from the ``qkv`` weight (``qkv.out_features // (3 * num_heads)``), the output width from
``proj``, and the query scale frozen at the original head width, so the residual stream, the
per-head channels and the MLP can all be pruned independently. Analysis traces models with the
sliced forward (:func:`sliced_swin`, restored afterwards); surgery switches the class of the same
module object for good (:func:`switch_swin_`) before it slices one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["sliced_swin", "switch_swin_", "swin_attention_types"]


def swin_attention_types() -> tuple[type, ...]:
    """torchvision's window-attention classes, 2-D (V1, V2) and 3-D (video Swin3D); empty when
    torchvision is not installed."""
    try:
        from torchvision.models import swin_transformer as sw
        from torchvision.models.video import swin_transformer as sw3
    except ImportError:  # pragma: no cover - torchvision is a core dependency
        return ()
    return (sw.ShiftedWindowAttention, sw.ShiftedWindowAttentionV2, sw3.ShiftedWindowAttention3d)


def _window_attention_3d(mod: Any, x: Tensor) -> Tensor:
    """torchvision's 3-D shifted-window attention on (B, T, H, W, C_in) -> (B, T, H, W, C_out), with
    the head width read from ``qkv`` and the output width from ``proj`` (as the 2-D one above)."""
    from torchvision.models.video import swin_transformer as sw3

    b, t, h, w, _ = x.shape
    window, shift = sw3._get_window_and_shift_size(list(mod.shift_size), [t, h, w], list(mod.window_size))
    position_bias = mod.get_relative_position_bias(window)
    pad = sw3._compute_pad_size_3d((t, h, w), (window[0], window[1], window[2]))
    x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    _, tp, hp, wp, c_in = x.shape
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
    grid = (tp // window[0], hp // window[1], wp // window[2])
    n_win, tokens = grid[0] * grid[1] * grid[2], window[0] * window[1] * window[2]
    x = x.view(b, grid[0], window[0], grid[1], window[1], grid[2], window[2], c_in)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * n_win, tokens, c_in)

    heads = mod.num_heads
    head_dim = mod.qkv.weight.shape[0] // (3 * heads)
    qkv = F.linear(x, mod.qkv.weight, mod.qkv.bias)
    q, k, v = qkv.reshape(b * n_win, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * mod.query_scale) @ k.transpose(-2, -1) + position_bias
    if shifted:
        mask = sw3._compute_attention_mask_3d(x, (tp, hp, wp), tuple(window), tuple(shift))
        attn = (attn.view(b, n_win, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=mod.attention_dropout, training=mod.training)
    x = (attn @ v).transpose(1, 2).reshape(b * n_win, tokens, heads * head_dim)
    x = F.dropout(F.linear(x, mod.proj.weight, mod.proj.bias), p=mod.dropout, training=mod.training)
    c_out = x.shape[-1]
    x = x.view(b, grid[0], grid[1], grid[2], window[0], window[1], window[2], c_out)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, c_out)
    if shifted:
        x = torch.roll(x, shifts=(shift[0], shift[1], shift[2]), dims=(1, 2, 3))
    return x[:, :t, :h, :w, :].contiguous()


def _window_attention(mod: Any, x: Tensor, position_bias: Tensor, logit_scale: Tensor | None) -> Tensor:
    """Shifted-window multi-head attention on ``x`` of shape (B, H, W, C_in) -> (B, H, W, C_out)."""
    b, h, w, _ = x.shape
    wh, ww = mod.window_size
    pad_r, pad_b = (ww - w % ww) % ww, (wh - h % wh) % wh
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, c_in = x.shape
    sh = 0 if wh >= ph else mod.shift_size[0]
    sw = 0 if ww >= pw else mod.shift_size[1]
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    n_win = (ph // wh) * (pw // ww)
    tokens = wh * ww
    x = x.view(b, ph // wh, wh, pw // ww, ww, c_in).permute(0, 1, 3, 2, 4, 5).reshape(b * n_win, tokens, c_in)

    heads = mod.num_heads
    head_dim = mod.qkv.weight.shape[0] // (3 * heads)
    v2_bias = logit_scale is not None and mod.qkv.bias is not None
    qkv = F.linear(x, mod.qkv.weight, None if v2_bias else mod.qkv.bias)
    q, k, v = qkv.reshape(b * n_win, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if v2_bias:
        # V2: the keys carry no bias. Added per part after the split (zeroing the middle third of
        # the bias by position would pin every channel of the projection in place)
        bq, _, bv = mod.qkv.bias.reshape(3, heads, 1, head_dim).unbind(0)
        q, v = q + bq, v + bv
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * mod.query_scale) @ k.transpose(-2, -1)
    attn = attn + position_bias
    if sh or sw:
        # windows that wrapped around after the roll: tokens from different regions must not attend
        region = x.new_zeros((ph, pw))
        count = 0
        for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
            for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
                region[hs, ws] = count
                count += 1
        region = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(n_win, tokens)
        differ = region.unsqueeze(1) - region.unsqueeze(2)
        mask = differ.masked_fill(differ != 0, -100.0).masked_fill(differ == 0, 0.0)
        attn = attn.view(b, n_win, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=mod.attention_dropout, training=mod.training)
    x = (attn @ v).transpose(1, 2).reshape(b * n_win, tokens, heads * head_dim)
    x = F.dropout(F.linear(x, mod.proj.weight, mod.proj.bias), p=mod.dropout, training=mod.training)
    c_out = x.shape[-1]
    x = x.view(b, ph // wh, pw // ww, wh, ww, c_out).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c_out)
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def _sliced_classes() -> dict[type, type]:
    types = swin_attention_types()
    if not types:
        return {}
    if not _CLASSES:
        v1, v2, v3 = types

        class SlicedShiftedWindowAttention(v1):  # type: ignore[misc, valid-type]
            """torchvision ``ShiftedWindowAttention`` valid for any residual / inner / head widths."""

            def forward(self, x: Tensor) -> Tensor:
                return _window_attention(self, x, self.get_relative_position_bias(), None)

        class SlicedShiftedWindowAttentionV2(v2):  # type: ignore[misc, valid-type]
            """torchvision ``ShiftedWindowAttentionV2`` valid for any residual / inner / head widths."""

            def forward(self, x: Tensor) -> Tensor:
                return _window_attention(self, x, self.get_relative_position_bias(), self.logit_scale)

        class SlicedShiftedWindowAttention3d(v3):  # type: ignore[misc, valid-type]
            """torchvision ``ShiftedWindowAttention3d`` (Swin3D) valid for any residual / inner / head widths."""

            def forward(self, x: Tensor) -> Tensor:
                return _window_attention_3d(self, x)

        sliced = (SlicedShiftedWindowAttention, SlicedShiftedWindowAttentionV2, SlicedShiftedWindowAttention3d)
        for cls in sliced:
            cls.__module__ = __name__
            globals()[cls.__name__] = cls
        _CLASSES.update(zip((v1, v2, v3), sliced))
    return _CLASSES


_CLASSES: dict[type, type] = {}


def _switch(mod: nn.Module, cls: type) -> None:
    # the query scale of the unpruned module, kept when the head width shrinks
    mod.query_scale = (mod.qkv.weight.shape[0] // (3 * mod.num_heads)) ** -0.5
    mod.__class__ = cls


def switch_swin_(model: nn.Module, only: set[str] | None = None) -> list[tuple[nn.Module, type]]:
    """Give every torchvision window-attention module of ``model`` (those named in ``only``, if
    given) the sliced forward, in place; returns ``(module, old class)`` pairs to undo it."""
    classes = _sliced_classes()
    done = []
    for name, mod in model.named_modules():
        cls = classes.get(type(mod))
        if cls is not None and (only is None or name in only):
            done.append((mod, type(mod)))
            _switch(mod, cls)
    return done


@contextmanager
def sliced_swin(model: nn.Module) -> Iterator[None]:
    """Trace-time view: window-attention modules run the sliced forward inside the block."""
    done = switch_swin_(model)
    try:
        yield
    finally:
        for mod, cls in done:
            mod.__class__ = cls
            mod.__dict__.pop("query_scale", None)
