"""FFT bounds of short linear chains: a convolution followed by a mean subtraction, and a pair of
convolutions around an elementwise map (docs/MATH.md sections 10.3 and 10.4).

Both rest on the circular embedding of section 5.1 (a zero-padded convolution on an n x n input is
``R C_N E``: embed, circular convolution on the N-grid, restrict to the output window) and on one
more fact about the mean subtraction P of a mean-only GroupNorm (per sample and group, over the
group's channels and the output window): ``||P R v|| <= ||P_N v||`` for every grid vector v, where
``P_N`` subtracts the group means over the whole grid. (``||P y||`` is the distance of y to the
group-constant images of the window; the grid means, restricted to the window, are such a
constant, and ``R`` does not increase norms.) ``P_N C_N`` is diagonal in frequency like ``C_N``,
with the zero-frequency block ``(I - G) K_hat(0)`` (G: the channel-group averaging matrix), so its
norm is computable exactly; it bounds ``||P C||`` from above, never above ``||C_N||``.

Everything is float64 / complex128, chunked over frequency rows; only groups=1 convolutions are
handled here (the callers fall back to the plain operator norm otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lipdeq.lipschitz.operator_norm import _effective_kernel, circular_grid_size, polyphase_blocks_freq_first

__all__ = ["PairNorms", "conv_mean_norms", "conv_output_size", "conv_pair_norms", "group_centering"]

_CHUNK_BYTES = 64 * 2**20


def group_centering(channels: int, groups: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> Tensor:
    """``I - G``: the c x c matrix that subtracts from each channel the mean of its group."""
    if groups < 1 or channels % groups:
        raise ValueError(f"groups={groups} must divide channels={channels}")
    cg = channels // groups
    g = torch.block_diag(*[torch.full((cg, cg), 1.0 / cg, dtype=dtype, device=device)] * groups)
    return torch.eye(channels, dtype=dtype, device=device) - g


def conv_output_size(n: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a zero-padded convolution along one axis (as ``F.conv2d``)."""
    return (n + 2 * padding - _effective_kernel(kernel, dilation)) // stride + 1


def _norms(blocks: Tensor) -> Tensor:
    """Largest singular value of each block of a (..., m, k) tensor: the square root of the largest
    eigenvalue of the smaller Gram matrix (about twice as fast as an SVD, same float64 accuracy for
    the largest singular value, ~1e-15 relative)."""
    m, k = blocks.shape[-2:]
    if k <= m:
        gram = torch.einsum("...ki,...kj->...ij", blocks.conj(), blocks)
    else:
        gram = torch.einsum("...ik,...jk->...ij", blocks, blocks.conj())
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0).sqrt()


def _blocks(weight: Tensor, grid: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
            rows: Tensor) -> Tensor:
    """Polyphase DFT blocks (R, L_w, c_out, s_h s_w c_in) of a groups=1 kernel for coarse ``rows``."""
    return polyphase_blocks_freq_first(weight, grid, stride, dilation, 1, rows)[0]


def _chunks(m_h: int, bytes_per_row: int, device: torch.device):
    step = max(1, _CHUNK_BYTES // max(bytes_per_row, 1))
    for start in range(0, m_h, step):
        yield torch.arange(start, min(start + step, m_h), device=device)


def conv_mean_norms(
    weight: Tensor,
    input_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mean_groups: int,
) -> tuple[float, float]:
    """``(bound of ||P C||, bound of ||C||)`` for a groups=1 zero-padded convolution C followed by
    the mean subtraction P of a GroupNorm with ``mean_groups`` groups over C's output channels.

    The first is ``max(||(I - G) B(0)||, max_{nu != 0} ||B(nu)||) / sqrt(s_h s_w)`` on the grid of
    :func:`lipdeq.lipschitz.circular_grid_size` (polyphase blocks B, section 5.3), the second the
    plain FFT certificate on the same grid; both from one pass. A 1x1 kernel without padding is a
    pointwise map: ``||(I - G) K||`` if the output is a single pixel, else ``||K||`` for both.
    """
    w = weight.detach().to(torch.float64)
    co = w.shape[0]
    center = group_centering(co, mean_groups, device=w.device)
    if w.shape[-2:] == (1, 1) and padding == (0, 0):
        k = w[:, :, 0, 0]
        plain = float(_norms(k))
        pixels = math.prod(conv_output_size(input_size[i], 1, stride[i], 0) for i in range(2))
        return (float(_norms(center @ k)) if pixels == 1 else plain), plain
    k_eff = [_effective_kernel(w.shape[-2 + i], dilation[i]) for i in range(2)]
    grid = tuple(circular_grid_size(input_size[i], k_eff[i], padding[i], stride[i]) for i in range(2))
    m_h, m_w = grid[0] // stride[0], grid[1] // stride[1]
    per_row = (m_w // 2 + 1) * co * w.shape[1] * stride[0] * stride[1] * 16
    with_mean, plain = 0.0, 0.0
    for rows in _chunks(m_h, per_row, w.device):
        b = _blocks(w, grid, stride, dilation, rows)
        n = _norms(b)
        plain = max(plain, float(n.max()))
        if int(rows[0]) == 0:
            n[0, 0] = _norms(center.to(b.dtype) @ b[0, 0])
        with_mean = max(with_mean, float(n.max()))
    scale = math.sqrt(stride[0] * stride[1])
    return with_mean / scale, plain / scale


@dataclass(frozen=True)
class PairNorms:
    """The FFT figures of a pair ``A S Q B`` (docs/MATH.md section 10.4), all upper bounds.

    ``b``: ``||B||`` (with the first mean removed when there is one), ``b_plain``: ``||C1||``;
    ``a``: ``||A||`` (A: the second conv, with the second mean removed when there is one),
    ``a_plain``: ``||C2||``; ``a_mean``: ``||A P_N||`` (first mean on A's input); ``x``:
    ``||A P_N B||`` (``||A B||`` without a first mean), the norm of the linear chain per frequency.
    """

    b: float
    b_plain: float
    a: float
    a_plain: float
    a_mean: float
    x: float


def conv_pair_norms(
    w1: Tensor,
    w2: Tensor,
    input_size: tuple[int, int],
    padding1: tuple[int, int],
    padding2: tuple[int, int],
    dilation1: tuple[int, int],
    dilation2: tuple[int, int],
    mean1: int | None,
    mean2: int | None,
) -> PairNorms:
    """:class:`PairNorms` of two stride-1, groups=1 zero-padded convolutions ``C2 . C1`` (C1 on
    ``input_size``, C2 on C1's output), with optional mean subtractions after each (``mean1`` /
    ``mean2``: their numbers of groups), on one circular grid that both embed into."""
    w1 = w1.detach().to(torch.float64)
    w2 = w2.detach().to(torch.float64).to(w1.device)
    c_mid, c_out = w1.shape[0], w2.shape[0]
    k1 = [_effective_kernel(w1.shape[-2 + i], dilation1[i]) for i in range(2)]
    k2 = [_effective_kernel(w2.shape[-2 + i], dilation2[i]) for i in range(2)]
    mid = [conv_output_size(input_size[i], w1.shape[-2 + i], 1, padding1[i], dilation1[i]) for i in range(2)]
    # any N >= n + p (and >= the kernel) embeds a conv: take one that embeds both
    grid = tuple(max(circular_grid_size(input_size[i], k1[i], padding1[i]),
                     circular_grid_size(mid[i], k2[i], padding2[i])) for i in range(2))
    dev = w1.device
    c1 = group_centering(c_mid, mean1, device=dev) if mean1 else None
    c2 = group_centering(c_out, mean2, device=dev) if mean2 else None
    per_row = (grid[1] // 2 + 1) * 16 * (c_mid * w1.shape[1] + c_out * c_mid + c_out * w1.shape[1])
    best = dict(b=0.0, b_plain=0.0, a=0.0, a_mean=0.0, a_plain=0.0, x=0.0)
    for rows in _chunks(grid[0], per_row, dev):
        kb = _blocks(w1, grid, (1, 1), dilation1, rows)  # (R, Lw, c_mid, c_in)
        ka = _blocks(w2, grid, (1, 1), dilation2, rows)  # (R, Lw, c_out, c_mid)
        nb, na, nx = _norms(kb), _norms(ka), _norms(ka @ kb)
        best["b_plain"] = max(best["b_plain"], float(nb.max()))
        best["a_plain"] = max(best["a_plain"], float(na.max()))
        if int(rows[0]) == 0:  # the zero frequency: the group means removed (only this block changes)
            b0, a0 = kb[0, 0], ka[0, 0]
            if c1 is not None:
                b0 = c1.to(b0.dtype) @ b0
            if c2 is not None:
                a0 = c2.to(a0.dtype) @ a0
            am0 = a0 @ c1.to(a0.dtype) if c1 is not None else a0  # A P_N: P_N acts on A's input
            na_mean = na.clone()
            nb[0, 0], na[0, 0], na_mean[0, 0], nx[0, 0] = _norms(b0), _norms(a0), _norms(am0), _norms(am0 @ b0)
        else:
            na_mean = na
        for key, value in (("b", nb), ("a", na), ("a_mean", na_mean), ("x", nx)):
            best[key] = max(best[key], float(value.max()))
    return PairNorms(**best)
