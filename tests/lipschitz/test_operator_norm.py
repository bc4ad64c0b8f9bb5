"""FFT operator-norm certificates against dense matrices of the actual convolutions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipdeq.lipschitz import (
    circular_conv_operator_norm,
    circular_grid_size,
    conv_module_operator_norm,
    conv_operator_norm,
    power_iteration_conv_norm,
)
from lipdeq.lipschitz.operator_norm import conv_adjoint, conv_apply

# (kernel, padding, stride, dilation, groups)
GEOMETRIES = [
    (1, 0, 1, 1, 1),
    (1, 0, 2, 1, 1),
    (3, 1, 1, 1, 1),
    (3, 1, 2, 1, 1),
    (3, 0, 1, 1, 1),
    (3, 2, 2, 1, 1),
    (5, 2, 1, 1, 1),
    (2, 0, 2, 1, 1),
    (3, 1, 3, 1, 1),
    (3, 2, 1, 2, 1),
    (3, 1, 2, 1, 2),
]


def circular_reference(x: torch.Tensor, w: torch.Tensor, stride: int, dilation: int = 1, groups: int = 1,
                       shift: int = 0) -> torch.Tensor:
    """Circular cross-correlation by its definition: y[t] = sum_a W[a] x[(s t + d a - shift) mod N]."""
    n_h, n_w = x.shape[-2:]
    co, ci_g, kh, kw = w.shape
    co_g = co // groups
    out = torch.zeros(x.shape[0], co, n_h, n_w, dtype=x.dtype)
    for g in range(groups):
        xg = x[:, g * ci_g : (g + 1) * ci_g]
        for a in range(kh):
            for b in range(kw):
                shifted = torch.roll(xg, shifts=(shift - dilation * a, shift - dilation * b), dims=(-2, -1))
                wab = w[g * co_g : (g + 1) * co_g, :, a, b]
                out[:, g * co_g : (g + 1) * co_g] += torch.einsum("oi,bihw->bohw", wab, shifted)
    return out[..., ::stride, ::stride]


@pytest.mark.parametrize("k,p,s,d,g", GEOMETRIES)
@pytest.mark.parametrize("n", [6, 7])
def test_fft_bound_dominates_dense_norm(k, p, s, d, g, n, oracles):
    torch.manual_seed(1000 * k + 100 * p + 10 * s + n + d + g)
    w = torch.randn(4, 4 // g, k, k, dtype=torch.float64)
    dense = oracles.dense(lambda x: F.conv2d(x, w, stride=s, padding=p, dilation=d, groups=g), (1, 4, n, n))
    exact = oracles.norm(dense)
    bound = conv_operator_norm(w, (n, n), stride=s, padding=p, dilation=d, groups=g)
    assert bound >= exact * (1 - 1e-12)
    # Stride > 1: the polyphase value never exceeds the stride-1 bound of the same kernel.
    assert bound <= conv_operator_norm(w, (n, n), stride=1, padding=p, dilation=d, groups=g) * (1 + 1e-12)


@pytest.mark.parametrize("k,p,s,d,g", [(1, 0, 2, 1, 1), (3, 1, 1, 1, 1), (3, 1, 2, 1, 1), (3, 2, 1, 2, 1),
                                       (3, 1, 2, 1, 2)])
def test_power_iteration_is_a_close_lower_bound(k, p, s, d, g, oracles):
    torch.manual_seed(10 * k + s)
    n = 7
    w = torch.randn(4, 4 // g, k, k, dtype=torch.float64)
    dense = oracles.dense(lambda x: F.conv2d(x, w, stride=s, padding=p, dilation=d, groups=g), (1, 4, n, n))
    exact = oracles.norm(dense)
    est = power_iteration_conv_norm(w, (n, n), stride=s, padding=p, n_iter=150, dilation=d, groups=g,
                                    generator=torch.Generator().manual_seed(0))
    assert exact * (1 - 1e-2) <= est <= exact * (1 + 1e-10)
    circ = power_iteration_conv_norm(w, (n, n), stride=s, padding=p, n_iter=150, dilation=d, groups=g,
                                     circular=True, generator=torch.Generator().manual_seed(0))
    assert circ <= conv_operator_norm(w, (n, n), stride=s, padding=p, dilation=d, groups=g) * (1 + 1e-10)


@pytest.mark.parametrize("k,s,d,g,grid", [(3, 1, 1, 1, 7), (3, 2, 1, 1, 8), (1, 2, 1, 1, 6), (5, 2, 1, 1, 8),
                                          (3, 3, 1, 1, 9), (2, 2, 1, 1, 6), (3, 1, 2, 2, 8), (3, 2, 1, 2, 6)])
def test_fft_value_equals_dense_norm_of_circular_convolution(k, s, d, g, grid, oracles):
    # The FFT formula and its normalisation (incl. the polyphase 1/sqrt(s_h s_w)) are exact for the
    # circular convolution, built here from its definition with torch.roll.
    torch.manual_seed(7 * k + s + grid)
    w = torch.randn(3 * g, 2, k, k, dtype=torch.float64)
    dense = oracles.dense(lambda x: circular_reference(x, w, s, d, g), (1, 2 * g, grid, grid))
    value = circular_conv_operator_norm(w, grid, stride=s, dilation=d, groups=g)
    assert abs(value - oracles.norm(dense)) <= 1e-10 * oracles.norm(dense)


@pytest.mark.parametrize("k,p,s", [(3, 1, 1), (3, 1, 2), (3, 2, 1), (5, 1, 2), (3, 0, 2)])
def test_zero_padded_conv_is_restriction_of_circular_iff_grid_at_least_n_plus_p(k, p, s):
    torch.manual_seed(3)
    n = 7
    w = torch.randn(2, 2, k, k, dtype=torch.float64)
    x = torch.randn(1, 2, n, n, dtype=torch.float64)
    ref = F.conv2d(x, w, stride=s, padding=p)
    m = ref.shape[-1]
    auto = circular_grid_size(n, k, p, s)
    for grid in sorted({auto, -(-(n + p) // s) * s}):
        xe = F.pad(x, (0, grid - n, 0, grid - n))
        circ = circular_reference(xe, w, s, shift=p)
        assert torch.allclose(circ[..., :m, :m], ref, atol=1e-12), grid
    if p > 0:
        grid = n + p - 1  # a padding coordinate wraps onto an input pixel: no longer a restriction
        xe = F.pad(x, (0, grid - n, 0, grid - n))
        circ = circular_reference(xe, w, 1, shift=p)
        ref1 = F.conv2d(x, w, padding=p)
        m1 = min(ref1.shape[-1], grid)
        assert not torch.allclose(circ[..., :m1, :m1], ref1[..., :m1, :m1], atol=1e-6)
        with pytest.raises(ValueError, match="grid_size"):
            conv_operator_norm(w, (n, n), stride=1, padding=p, grid_size=grid)


def test_minimal_valid_grid_still_gives_an_upper_bound(oracles):
    torch.manual_seed(4)
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    for n, p in [(6, 1), (5, 2), (6, 0)]:
        exact = oracles.norm(oracles.dense(lambda x, p=p: F.conv2d(x, w, padding=p), (1, 3, n, n)))
        assert conv_operator_norm(w, (n, n), padding=p, grid_size=n + p) >= exact * (1 - 1e-12)


def test_one_by_one_conv_is_matrix_two_norm():
    torch.manual_seed(5)
    w = torch.randn(5, 3, 1, 1, dtype=torch.float64)
    expected = np.linalg.norm(w[:, :, 0, 0].numpy(), ord=2)
    for s in (1, 2):
        assert conv_operator_norm(w, (6, 6), stride=s) == pytest.approx(expected, rel=1e-12)


def test_reshaped_kernel_norm_is_not_an_upper_bound(oracles):
    # docs/MATH.md section 5.4: ||W.reshape(c_out, -1)||_2 can be far below the operator norm.
    w = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    reshaped = float(torch.linalg.matrix_norm(w.reshape(1, -1), ord=2))  # = 3
    exact = oracles.norm(oracles.dense(lambda x: F.conv2d(x, w, padding=1), (1, 1, 8, 8)))
    assert reshaped == pytest.approx(3.0)
    assert exact > 2.5 * reshaped  # about 8.29: close to the 3x worst case
    assert conv_operator_norm(w, (8, 8)) >= exact


def test_polyphase_tightens_stride_two_bound(oracles):
    torch.manual_seed(6)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    s1 = conv_operator_norm(w, (8, 8), stride=1)
    s2 = conv_operator_norm(w, (8, 8), stride=2)
    exact = oracles.norm(oracles.dense(lambda x: F.conv2d(x, w, stride=2, padding=1), (1, 8, 8, 8)))
    assert exact <= s2 < 0.8 * s1


def test_float32_and_module_helper_agree_with_float64():
    torch.manual_seed(8)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)
    w64 = conv.weight.detach().double()
    ref = conv_operator_norm(w64, (9, 9), stride=2, padding=1)
    assert conv_operator_norm(conv.weight.detach(), (9, 9), stride=2, padding=1) == pytest.approx(ref, rel=1e-6)
    assert conv_module_operator_norm(conv, (9, 9)) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("s,p,n", [(1, 1, 7), (2, 1, 7), (2, 0, 8), (3, 1, 9)])
def test_conv_adjoint_is_transpose(circular, s, p, n):
    torch.manual_seed(9)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    if circular:
        n = -(-n // s) * s
    x = torch.randn(1, 2, n, n, dtype=torch.float64)
    y = conv_apply(x, w, (s, s), (p, p), circular=circular)
    u = torch.randn_like(y)
    lhs = (y * u).sum()
    rhs = (x * conv_adjoint(u, w, (n, n), (s, s), (p, p), circular=circular)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_named_errors():
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="weight"):
        conv_operator_norm(torch.randn(2, 3, 3), (8, 8))
    with pytest.raises(ValueError, match="input_size"):
        conv_operator_norm(w, (0, 8))
    with pytest.raises(ValueError, match="no output"):
        conv_operator_norm(w, (1, 1), padding=0)
    with pytest.raises(TypeError, match="stride"):
        conv_operator_norm(w, (8, 8), stride=1.5)
    with pytest.raises(ValueError, match="n_iter"):
        power_iteration_conv_norm(w, (8, 8), n_iter=-1)
