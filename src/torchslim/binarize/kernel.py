"""Packed inference: the XNOR-popcount GEMM, and binary Linear / Conv2d built on it.

For two rows ``a, b`` of ``k`` entries in ``{-1, +1}`` packed one bit each (bit 1 = +1),
``a . b = k - 2 * popcount(a XOR b)``: a 64-entry dot product is one XOR and one popcount.
:func:`xnor_matmul` computes that for every pair of rows, exactly (an integer matrix).
Convolutions go through im2col: the input's signs are unfolded into patches and packed; zero
padding (which the float simulation feeds in as real zeros, not ±1) is handled exactly by a
validity mask per patch row, ``dot = valid - 2 * popcount((a XOR b) AND mask)``.

Two backends compute the same integers:

- ``"c"``: a small C kernel with hardware popcount and OpenMP over rows (``_xnor.c``, built by
  ``pip install``, or on first use when the install could not; see
  :mod:`torchslim.binarize._ckernel`; CPU only);
- ``"torch"``: vectorised torch bitwise ops with a SWAR popcount, chunked to bound memory;
  runs wherever torch does (CPU and CUDA).

``"auto"`` takes ``"c"`` for CPU tensors when it could be built, else ``"torch"``.

Example:
    >>> import torch
    >>> from torchslim.binarize.packing import pack_signs
    >>> a = torch.randint(0, 2, (3, 100)).float() * 2 - 1
    >>> b = torch.randint(0, 2, (5, 100)).float() * 2 - 1
    >>> out = xnor_matmul(pack_signs(a, 64), pack_signs(b, 64), k=100)
    >>> torch.equal(out.float(), a @ b.T)
    True
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from torchslim.binarize import _ckernel
from torchslim.binarize.packing import as_words64, pack_signs, packed_words
from torchslim.errors import ConfigError

__all__ = ["BACKENDS", "popcount", "pack_rows", "xnor_matmul", "binary_linear", "binary_conv2d", "resolve_backend", "c_kernel_status"]

BACKENDS = ("auto", "c", "torch")
_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101
_CHUNK = 1 << 16  # int64 elements per block of the torch backend (512 KiB: stays in cache)


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Bits set in each element of an int64 tensor (SWAR; overwrites and returns ``x``)."""
    if x.dtype != torch.int64:
        raise ConfigError(f"popcount needs int64 words; got {x.dtype}")
    t = (x >> 1).bitwise_and_(_M1)
    x.sub_(t)
    t = (x >> 2).bitwise_and_(_M2)
    x.bitwise_and_(_M2).add_(t)
    x.add_(x >> 4).bitwise_and_(_M4)
    return x.mul_(_H01).bitwise_right_shift_(56)


def c_kernel_status() -> dict[str, object]:
    """Whether the C backend is available here and which object runs.

    Keys: ``available``, ``source`` (``"installed"``: built by ``pip install``; ``"cache"``: built
    on first use), ``path``, ``error`` (why it is unavailable) and ``installed_error`` (why the
    installed object was not used).
    """
    return _ckernel.status()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run: ``"c"`` or ``"torch"``.

    Raises:
        ConfigError: unknown backend, or ``"c"`` asked for where it cannot run.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"kernel backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "torch":
        return "torch"
    ok = device.type == "cpu" and _ckernel.load() is not None
    if backend == "c" and not ok:
        why = "it runs on CPU tensors only" if device.type != "cpu" else _ckernel.status()["error"]
        raise ConfigError(f"the C XNOR kernel is not available ({why}); use backend='torch' or 'auto'")
    return "c" if ok else "torch"


def _xnor_torch(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None, valid: torch.Tensor | None, k: int) -> torch.Tensor:
    M, W = a.shape
    N = b.shape[0]
    out = torch.empty(M, N, dtype=torch.int32, device=a.device)
    rows = max(1, _CHUNK // max(N * W, 1))
    for i in range(0, M, rows):
        x = a[i : i + rows, None, :] ^ b[None, :, :]
        if mask is not None:
            x.bitwise_and_(mask[i : i + rows, None, :])
        ones = popcount(x).sum(dim=-1, dtype=torch.int32)
        kv = valid[i : i + rows, None] if valid is not None else k
        out[i : i + rows] = kv - 2 * ones
    return out


def xnor_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    threads: int | None = None,
) -> torch.Tensor:
    """``A @ B.T`` for ±1 matrices given packed: ``out[m, n] = sum_j A[m, j] * B[n, j]``.

    Args:
        a: ``(M, words)`` packed rows of A (int32 or int64 words, see :mod:`.packing`).
        b: ``(N, words)`` packed rows of B, same word size.
        k: entries per row (the packed length before padding).
        mask: optional ``(R, words)`` packed validity of A's entries (bit 0: the entry is a zero,
            e.g. convolution padding, and adds nothing); row ``m`` of A uses mask row ``m % R``
            (``R`` divides ``M``: one mask row per im2col position serves every image).
        backend: ``"auto"``, ``"c"`` or ``"torch"``.
        threads: OpenMP threads of the C backend (default ``torch.get_num_threads()``).

    Returns:
        An ``(M, N)`` int32 tensor, exact.

    Raises:
        ConfigError: shapes or dtypes that do not fit, or an unavailable backend.
    """
    if a.dim() != 2 or b.dim() != 2 or a.dtype != b.dtype or a.dtype not in (torch.int32, torch.int64):
        raise ConfigError(
            f"xnor_matmul needs two 2-D packed word tensors of one dtype (int32 or int64); "
            f"got {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}"
        )
    bits = 32 if a.dtype == torch.int32 else 64
    if a.shape[1] != b.shape[1] or a.shape[1] != packed_words(k, bits):
        raise ConfigError(
            f"{k} entries take {packed_words(k, bits)} {bits}-bit words per row; got {a.shape[1]} and {b.shape[1]}"
        )
    if mask is not None and (
        mask.dim() != 2 or mask.shape[1] != a.shape[1] or mask.dtype != a.dtype or mask.shape[0] < 1 or a.shape[0] % mask.shape[0]
    ):
        raise ConfigError(
            f"mask must be {a.dtype} words with {a.shape[1]} per row and a row count dividing {a.shape[0]}; "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    a64, b64 = as_words64(a), as_words64(b)
    m64 = as_words64(mask) if mask is not None else None
    valid = None
    if m64 is not None:
        valid = popcount(m64.clone()).sum(dim=1, dtype=torch.int32)
    if resolve_backend(backend, a.device) == "torch":
        if m64 is not None and m64.shape[0] != a64.shape[0]:
            reps = a64.shape[0] // m64.shape[0]
            m64, valid = m64.repeat(reps, 1), valid.repeat(reps)  # type: ignore[union-attr]
        return _xnor_torch(a64, b64, m64, valid, k)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32)
    _ckernel.xnor_gemm(a64, b64, m64, valid, k, out, threads or torch.get_num_threads())
    return out


def pack_rows(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """64-bit packed signs of the rows of a 2-D tensor (the C packer for float32 CPU input)."""
    if x.dtype == torch.float32 and resolve_backend(backend, x.device) == "c":
        return _ckernel.pack_f32(x.contiguous(), torch.get_num_threads())
    return pack_signs(x, 64)


def binary_linear(
    x: torch.Tensor,
    weight_words: torch.Tensor,
    in_features: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``sign(x) @ W.T`` for packed ±1 weights ``(out, words)``, as float (exact integers).

    Equals ``F.linear(sign(x), W)`` with ``sign(0) = +1``; scales and bias are the caller's.
    """
    lead = x.shape[:-1]
    a = pack_rows(x.reshape(-1, in_features), backend)
    out = xnor_matmul(a, as_words64(weight_words), in_features, backend=backend)
    return out.to(x.dtype).reshape(*lead, -1)


@functools.lru_cache(maxsize=64)
def _padding_mask(
    cg: int, h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], device: torch.device,
) -> torch.Tensor:
    """Packed validity of every im2col patch entry (``(L, words)``): 0 where it is padding."""
    ones = torch.ones(1, cg, h, w, dtype=torch.float32, device=device)
    valid = F.unfold(ones, kernel, dilation=dilation, padding=padding, stride=stride)[0].T  # (L, k)
    return pack_signs(valid - 0.5, 64)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def binary_conv2d(
    x: torch.Tensor,
    weight_words: torch.Tensor,
    weight_shape: Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """``conv2d(sign(x), W)`` (zero padding) for packed ±1 weights, by im2col + XNOR-popcount GEMM.

    Args:
        x: ``(N, C, H, W)`` real input; its signs are taken (``sign(0) = +1``).
        weight_words: ``(out, words)``: each filter's ``C/groups * kh * kw`` signs packed in
            ``(c, kh, kw)`` order (as :func:`~torchslim.binarize.packing.pack_signs` of
            ``W.reshape(out, -1)``).
        weight_shape: ``(out, C/groups, kh, kw)``.

    Returns:
        ``(N, out, H', W')`` float, exactly the float convolution of the ±1 tensors.
    """
    o, cg, kh, kw = (int(s) for s in weight_shape)
    n, c, h, w = x.shape
    if c != cg * groups:
        raise ConfigError(f"binary_conv2d: input has {c} channels; the weight expects {cg * groups} ({groups} groups)")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    og = o // groups
    k = cg * kh * kw
    w64 = as_words64(weight_words)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    mask = _padding_mask(cg, h, w, (kh, kw), stride, padding, dilation, x.device) if padding != (0, 0) else None
    outs = []
    for g in range(groups):
        xg = x[:, g * cg : (g + 1) * cg]
        cols = F.unfold(xg, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, k, L)
        a = pack_rows(cols.transpose(1, 2).reshape(-1, k), backend)
        outs.append(xnor_matmul(a, w64[g * og : (g + 1) * og], k, mask=mask, backend=backend))
    out = torch.cat(outs, dim=1) if groups > 1 else outs[0]  # (N * L, out)
    out = out.to(x.dtype).reshape(n, ho * wo, o).transpose(1, 2).reshape(n, o, ho, wo)
    # the memory format torch's own conv2d would give (later reductions then sum in the same order)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
