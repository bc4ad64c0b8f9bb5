"""Operator norms of 2-D convolutions: FFT certificates and power-iteration estimates (docs/MATH.md section 5).

A zero-padded convolution (cross-correlation, as ``F.conv2d`` computes it) of a k x k kernel on an
n x n input with padding p reads, along each spatial axis, the input coordinates ``t`` in
``[-p, n + p - 1]`` (coordinates relative to the first input pixel; the ones outside ``[0, n)`` are
the zero padding). Place the input at offset 0 of a periodic grid of size N, zero elsewhere, and
read coordinate ``t`` at ``t mod N``. The periodic reading agrees with the zero-padded one for every
``t`` in that range if and only if no padding coordinate wraps onto an input pixel:
``t mod N`` must lie outside ``[0, n)`` for ``t`` in ``[-p, -1]`` and in ``[n, n + p - 1]``, i.e.

    N >= n + p.

Then the zero-padded convolution equals ``R o C_N o E``: an isometric embedding E (zero fill), the
circular convolution C_N on the N-grid, and a coordinate restriction R (norm <= 1), hence
``||conv|| <= ||C_N||``. We use ``N = n + 2p`` (the circular embedding of the padded input;
``n + 2p >= n + k - 1`` exactly when ``p >= (k - 1) / 2``, the usual "same" padding), which satisfies
``N >= n + p`` for every padding, rounded up to a multiple of the stride.

The circular convolution is diagonalised by the 2-D DFT (Sedghi, Gupta, Long, ICLR 2019): its
singular values are those of the c_out x c_in matrices ``K_hat(u, v) = sum_ab W[:, :, a, b]
exp(-2 pi i (a u / N_h + b v / N_w))`` over the N_h x N_w frequencies. For stride s (s_h, s_w),
the strided circular convolution is the stride-1 one followed by subsampling onto the coarse grid
M = N / s; in the (unitary) Fourier domain it maps, for each coarse frequency nu, the s_h*s_w fine
frequencies ``nu + M e`` that alias onto nu to one output frequency, through the polyphase block
``[K_hat(nu + M e)]_e / sqrt(s_h s_w)`` (c_out x (s_h s_w c_in)). Its norm is the max over nu of the
norms of these blocks: the exact norm of the strided circular convolution, and an upper bound of
the strided zero-padded one (which is a restriction of it, since the subsampled grid indices
``0, s, 2s, ...`` are exactly the stride-1 output positions the strided convolution keeps). It is
never larger than the stride-1 bound (each block is 1/sqrt(s_h s_w) times a concatenation of
s_h s_w matrices of norm <= the stride-1 bound).

Everything is computed in float64 (complex128); the only error is floating-point rounding of the
DFT and SVD, of relative order 1e-14.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipdeq.checks import check_int

__all__ = [
    "circular_conv_operator_norm",
    "circular_grid_size",
    "conv_adjoint",
    "conv_apply",
    "conv_module_operator_norm",
    "conv_operator_norm",
    "polyphase_dft_blocks",
    "power_iteration_conv_norm",
]

# Bytes of complex128 DFT blocks materialised at once.
_CHUNK_BYTES = 64 * 2**20


def _pair(value: int | tuple[int, int] | list[int], name: str, minimum: int) -> tuple[int, int]:
    """Return ``value`` as a pair of ints >= ``minimum``, raising a named error otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _check_weight(weight: Tensor, groups: int = 1) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"weight must have shape (c_out, c_in, kh, kw), got shape {tuple(weight.shape)}")
    if weight.is_complex():
        raise TypeError("weight must be real")
    if groups < 1 or weight.shape[0] % groups != 0:
        raise ValueError(f"groups={groups} must be >= 1 and divide c_out={weight.shape[0]}")


def _effective_kernel(kh: int, dilation: int) -> int:
    return dilation * (kh - 1) + 1


def _default_padding(weight: Tensor, dilation: tuple[int, int]) -> tuple[int, int]:
    """Default symmetric padding ``(k_eff - 1) // 2`` per axis ("same" for odd effective kernels)."""
    return (
        (_effective_kernel(weight.shape[-2], dilation[0]) - 1) // 2,
        (_effective_kernel(weight.shape[-1], dilation[1]) - 1) // 2,
    )


def _dilate(weight: Tensor, dilation: tuple[int, int]) -> Tensor:
    """Insert zeros so that the dilated kernel becomes a dense one of size d*(k-1)+1."""
    if dilation == (1, 1):
        return weight
    co, ci, kh, kw = weight.shape
    out = weight.new_zeros(co, ci, _effective_kernel(kh, dilation[0]), _effective_kernel(kw, dilation[1]))
    out[:, :, :: dilation[0], :: dilation[1]] = weight
    return out


def circular_grid_size(n: int, kernel: int, padding: int, stride: int = 1) -> int:
    """Period N of the circular convolution that the zero-padded one restricts (one axis).

    Returns ``n + 2 * padding`` (at least ``kernel``) rounded up to a multiple of ``stride``; this
    satisfies the restriction condition ``N >= n + padding`` (module docstring).
    """
    if n < 1 or kernel < 1 or padding < 0 or stride < 1:
        raise ValueError(
            f"need n >= 1, kernel >= 1, padding >= 0, stride >= 1; got n={n}, kernel={kernel}, "
            f"padding={padding}, stride={stride}"
        )
    if n + 2 * padding < kernel:
        raise ValueError(
            f"kernel {kernel} is larger than the padded input {n} + 2*{padding}: "
            "the convolution has no output"
        )
    grid = max(n + 2 * padding, kernel)
    return -(-grid // stride) * stride


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def polyphase_grid(
    kernel_size: tuple[int, int], grid_size: tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int]:
    """Grid actually used for the DFT blocks: ``grid_size``, or just ``stride`` for 1x1 kernels.

    A 1x1 circular convolution has norm ``||W||_2`` on every grid, so the smallest one is used.
    """
    if tuple(kernel_size) == (1, 1):
        return (stride[0], stride[1])
    return (grid_size[0], grid_size[1])


def polyphase_blocks_freq_first(
    weight: Tensor,
    grid_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    coarse_rows: Tensor | None = None,
) -> Tensor:
    """:func:`polyphase_dft_blocks` as one contiguous tensor of shape (G, R, L_w, co_g, s_h*s_w*ci_g).

    One GEMM of the outer product of the 1-D DFT phases (exact integer phases reduced mod N, computed in
    float64) with the flattened kernel, whose output is already in this order for stride 1 and one
    group (a permutation copy otherwise). Frequencies first, so that the per-frequency products of the
    cap's power iteration and the eigen-solvers are batched matrix products over contiguous blocks.
    """
    n_h, n_w = grid_size
    s_h, s_w = stride
    if n_h % s_h or n_w % s_w:
        raise ValueError(f"grid_size {grid_size} must be a multiple of stride {stride} on each axis")
    w = _dilate(weight, dilation)
    co, ci_g, kh, kw = w.shape
    if kh > n_h or kw > n_w:
        raise ValueError(f"kernel of size {(kh, kw)} does not fit on the grid {grid_size}")
    m_h, m_w = n_h // s_h, n_w // s_w
    dev = w.device
    if coarse_rows is None:
        coarse_rows = torch.arange(m_h, device=dev)
    nu_w = torch.arange(m_w // 2 + 1, device=dev)
    rows = coarse_rows[:, None] + m_h * torch.arange(s_h, device=dev)[None, :]  # (R, s_h): nu + M_h e_h
    cols = nu_w[:, None] + m_w * torch.arange(s_w, device=dev)[None, :]  # (L_w, s_w): nu_w + M_w e_w
    cdt = _complex_dtype(w.dtype)

    def phases(freq: Tensor, k: int, n: int) -> Tensor:  # (k, *freq.shape)
        prod = (torch.arange(k, device=dev).view(k, 1, 1) * freq[None]) % n
        ang = (-2.0 * math.pi / n) * prod.to(torch.float64)
        return torch.polar(torch.ones_like(ang), ang).to(cdt)

    e_h, e_w = phases(rows, kh, n_h), phases(cols, kw, n_w)  # (kh, R, s_h), (kw, L_w, s_w)
    r, lw = rows.shape[0], cols.shape[0]
    # (kh, kw, R, L_w, s_h, s_w) -> rows (R, L_w, s_h, s_w), columns the taps
    basis = (e_h[:, None, :, None, :, None] * e_w[None, :, None, :, None, :]).reshape(kh * kw, -1)
    k_hat = (basis.T @ w.reshape(co * ci_g, kh * kw).T.to(cdt)).view(r, lw, s_h, s_w, co, ci_g)
    k_hat = k_hat.permute(0, 1, 4, 2, 3, 5).reshape(r, lw, groups, co // groups, s_h * s_w * ci_g)
    return k_hat.permute(2, 0, 1, 3, 4).contiguous()


def polyphase_dft_blocks(
    weight: Tensor,
    grid_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    coarse_rows: Tensor | None = None,
) -> Tensor:
    """Polyphase DFT blocks of the strided circular convolution on ``grid_size`` (differentiable).

    Returns the complex tensor ``B`` of shape (R, M_w // 2 + 1, groups, c_out/groups,
    s_h*s_w*c_in/groups), R = len(coarse_rows) (default all M_h = N_h / s_h coarse rows), where
    ``B[nu]`` is ``[K_hat(nu + M e)]_e`` with e = (e_h, e_w) in row-major order and ``K_hat(u, v) =
    sum_ab W[:, :, a, b] exp(-2 pi i (a u / N_h + b v / N_w))``, so that the operator norm is
    ``max ||B[nu, g]||_2 / sqrt(s_h s_w)``. Only the coarse columns ``0 .. M_w // 2`` are formed:
    the kernel is real, so the block of ``-nu`` is the conjugate of the block of ``nu`` (same
    singular values). Precision: complex64 for float32 weights, complex128 for float64.
    """
    blocks = polyphase_blocks_freq_first(weight, grid_size, stride, dilation, groups, coarse_rows)
    return blocks.permute(1, 2, 0, 3, 4)


def circular_conv_operator_norm(
    weight: Tensor,
    grid_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> float:
    """Exact l2 operator norm of the circular convolution with ``weight`` on an N_h x N_w grid.

    With stride s the output is the stride-1 circular output subsampled at ``0, s, 2s, ...`` (each
    grid side must be a multiple of its stride); the norm is that of the polyphase DFT blocks
    (module docstring). Computed in float64 (chunked over frequencies to bound memory); returns a
    Python float.
    """
    _check_weight(weight, groups)
    grid = _pair(grid_size, "grid_size", 1)
    st = _pair(stride, "stride", 1)
    dil = _pair(dilation, "dilation", 1)
    if grid[0] % st[0] or grid[1] % st[1]:
        raise ValueError(f"grid_size {grid} must be a multiple of stride {st} on each axis")
    w = weight.detach().to(torch.float64)
    k_eff = (_effective_kernel(w.shape[-2], dil[0]), _effective_kernel(w.shape[-1], dil[1]))
    if k_eff[0] > grid[0] or k_eff[1] > grid[1]:
        raise ValueError(f"kernel of size {k_eff} does not fit on the grid {grid}")
    if w.numel() == 0:
        return 0.0
    grid = polyphase_grid(k_eff, grid, st)
    m_h, m_w = grid[0] // st[0], grid[1] // st[1]
    co, ci = w.shape[:2]
    per_row = st[0] * st[1] * (m_w // 2 + 1) * co * ci * 16
    chunk = max(1, _CHUNK_BYTES // max(per_row, 1))
    best = 0.0
    for start in range(0, m_h, chunk):
        rows = torch.arange(start, min(start + chunk, m_h), device=w.device)
        blocks = polyphase_dft_blocks(w, grid, st, dil, groups, rows)
        best = max(best, float(torch.linalg.matrix_norm(blocks, ord=2).max()))
    return best / math.sqrt(st[0] * st[1])


def _resolve_geometry(
    weight: Tensor,
    input_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | None,
    dilation: int | tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    size = _pair(input_size, "input_size", 1)
    st = _pair(stride, "stride", 1)
    dil = _pair(dilation, "dilation", 1)
    pad = _default_padding(weight, dil) if padding is None else _pair(padding, "padding", 0)
    return size, st, pad, dil


def conv_operator_norm(
    weight: Tensor,
    input_size: tuple[int, int],
    stride: int = 1,
    padding: int | None = None,
    *,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    grid_size: int | tuple[int, int] | None = None,
) -> float:
    """Certified upper bound of the l2 operator norm of a zero-padded 2-D convolution.

    ``weight`` has shape (c_out, c_in/groups, kh, kw) (no bias); the convolution acts on inputs of
    spatial size ``input_size`` with ``stride`` and symmetric zero ``padding`` (default
    ``(k_eff - 1) // 2``), exactly as ``F.conv2d``. The bound is the exact norm of the circular
    convolution of which the zero-padded one is a restriction (FFT method of Sedghi et al. 2019), on
    the grid ``N = n + 2p`` rounded up to a multiple of the stride, or on ``grid_size`` if given
    (which must satisfy ``N >= n + p`` and be a multiple of the stride). For stride > 1 it is the
    exact norm of the strided circular convolution (polyphase form), at most the stride-1 bound.
    For 1x1 kernels it is the matrix 2-norm of ``weight[:, :, 0, 0]``.
    """
    _check_weight(weight, groups)
    size, st, pad, dil = _resolve_geometry(weight, input_size, stride, padding, dilation)
    k_eff = (_effective_kernel(weight.shape[-2], dil[0]), _effective_kernel(weight.shape[-1], dil[1]))
    auto = tuple(circular_grid_size(size[i], k_eff[i], pad[i], st[i]) for i in range(2))
    if grid_size is None:
        grid = auto
    else:
        grid = _pair(grid_size, "grid_size", 1)
        for i in range(2):
            if grid[i] < size[i] + pad[i] or grid[i] < k_eff[i] or grid[i] % st[i]:
                raise ValueError(
                    f"grid_size {grid} is not a valid circular embedding for input {size}, padding {pad}, "
                    f"kernel {k_eff}, stride {st}: need N >= n + p, N >= kernel and N a multiple "
                    "of the stride"
                )
    return circular_conv_operator_norm(weight, grid, st, dil, groups)


def conv_module_operator_norm(conv: nn.Conv2d, input_size: tuple[int, int]) -> float:
    """:func:`conv_operator_norm` of an ``nn.Conv2d`` (its current, effective weight; bias ignored)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"only padding_mode='zeros' is supported, got {conv.padding_mode!r}")
    padding = conv_padding(conv)
    return conv_operator_norm(
        conv.weight.detach(), input_size, stride=conv.stride, padding=padding,
        dilation=conv.dilation, groups=conv.groups,
    )


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The symmetric zero padding of ``conv`` as a pair of ints ('valid' -> 0, 'same' for odd kernels)."""
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        k_eff = [_effective_kernel(conv.kernel_size[i], conv.dilation[i]) for i in range(2)]
        if pad == "same" and all(k % 2 == 1 for k in k_eff):
            return (k_eff[0] // 2, k_eff[1] // 2)
        raise ValueError(f"padding={pad!r} with effective kernel {k_eff} is not a symmetric zero padding")
    return (int(pad[0]), int(pad[1]))


def conv_apply(
    x: Tensor,
    weight: Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    circular: bool = False,
) -> Tensor:
    """Apply the convolution operator (no bias).

    ``circular=False``: zero-padded ``F.conv2d``. ``circular=True``: the circular convolution on the
    grid of ``x`` (each side a multiple of the stride), ``y[i] = sum_a W[a] x[(s i + d a) mod N]``,
    whose norm is :func:`circular_conv_operator_norm` (padding is then irrelevant: a shift).
    """
    if not circular:
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)
    kh = _effective_kernel(weight.shape[-2], dilation[0])
    kw = _effective_kernel(weight.shape[-1], dilation[1])
    xp = F.pad(x, (0, kw - 1, 0, kh - 1), mode="circular")
    return F.conv2d(xp, weight, None, stride, 0, dilation, groups)


def conv_adjoint(
    y: Tensor,
    weight: Tensor,
    input_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    circular: bool = False,
) -> Tensor:
    """Adjoint (transpose) of :func:`conv_apply` applied to ``y``, returning input-shaped tensors.

    Uses ``F.conv_transpose2d`` with the ``output_padding`` that restores ``input_size``; in the
    circular case the transpose lives on the padded grid and is folded back modulo N.
    """
    h, w = input_size
    kh = _effective_kernel(weight.shape[-2], dilation[0])
    kw = _effective_kernel(weight.shape[-1], dilation[1])
    if circular:
        full = (h + kh - 1, w + kw - 1)
        pad = (0, 0)
    else:
        full = (h, w)
        pad = padding
    out_pad = []
    for i, (n, k) in enumerate(zip(full, (kh, kw))):
        m = y.shape[-2 + i]
        base = (m - 1) * stride[i] - 2 * pad[i] + k
        op = n - base
        if not 0 <= op < max(stride[i], dilation[i]):
            raise ValueError(f"output of shape {tuple(y.shape)} does not match input size {input_size}")
        out_pad.append(op)
    z = F.conv_transpose2d(y, weight, None, stride, pad, tuple(out_pad), groups, dilation)
    if not circular:
        return z
    # Fold the (h + kh - 1, w + kw - 1) padded grid back onto the periodic (h, w) grid.
    zh = z[..., :h, :].clone()
    zh[..., : kh - 1, :] += z[..., h:, :]
    out = zh[..., :w].clone()
    out[..., : kw - 1] += zh[..., w:]
    return out


def power_iteration_conv_norm(
    weight: Tensor,
    input_size: tuple[int, int],
    stride: int = 1,
    padding: int | None = None,
    n_iter: int = 50,
    generator: torch.Generator | None = None,
    *,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    circular: bool = False,
) -> float:
    """Power-iteration estimate (a lower bound) of the zero-padded convolution's operator norm.

    Iterates ``v <- C^T C v / ||C^T C v||`` with ``F.conv2d`` / ``F.conv_transpose2d`` on a
    (1, c_in, H, W) vector (random start from ``generator``), in float64, and returns ``||C v||``
    for the final unit vector ``v``, which never exceeds the true norm. ``circular=True`` runs it on
    the circular operator of :func:`conv_operator_norm`'s grid instead.
    """
    _check_weight(weight, groups)
    check_int("n_iter", n_iter, minimum=0)
    size, st, pad, dil = _resolve_geometry(weight, input_size, stride, padding, dilation)
    w = weight.detach().to(torch.float64)
    if circular:
        k_eff = [_effective_kernel(w.shape[-2 + i], dil[i]) for i in range(2)]
        size = tuple(circular_grid_size(size[i], k_eff[i], pad[i], st[i]) for i in range(2))
    shape = (1, w.shape[1] * groups, size[0], size[1])
    with torch.no_grad():
        v = torch.randn(shape, generator=generator, dtype=torch.float64, device=w.device if generator is None
                        else generator.device)
        v = v.to(w.device)
        v = v / v.norm().clamp_min(1e-300)
        for _ in range(n_iter):
            u = conv_apply(v, w, st, pad, dil, groups, circular)
            v_new = conv_adjoint(u, w, size, st, pad, dil, groups, circular)
            nrm = v_new.norm()
            if nrm == 0:
                return 0.0
            v = v_new / nrm
        return float(conv_apply(v, w, st, pad, dil, groups, circular).norm())
