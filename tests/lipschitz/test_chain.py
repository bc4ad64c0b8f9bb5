"""Tightened chain bounds (docs/MATH.md section 10) against dense operators and worst activation patterns."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipdeq.lipschitz import (
    LipschitzSequential,
    MeanOnlyGroupNorm,
    ScaledReLU,
    VariationalDropout2d,
    conv_operator_norm,
    lipschitz_bound,
)


def dense(op, shape: tuple[int, ...]) -> torch.Tensor:
    """Matrix (out x in) of a linear, batch-wise ``op`` on single inputs of ``shape``."""
    n = math.prod(shape)
    with torch.no_grad():
        return op(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, -1).T


def norm(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, ord=2))


def gn(groups: int, channels: int, low: float = -1.0, high: float = 1.0, affine: bool = True) -> MeanOnlyGroupNorm:
    g = MeanOnlyGroupNorm(groups, channels, affine=affine, gamma_cap=None).double()
    if affine:
        with torch.no_grad():
            g.weight.uniform_(low, high)
            g.bias.zero_()  # linear maps: the dense matrices below are the operators
    return g


def worst_pattern(a: torch.Tensor, b: torch.Tensor, lo: float, hi: float, seed: int, restarts: int = 3) -> float:
    """Lower bound of ``max ||A diag(d) B||`` over d in [lo, hi]^m: the norm is convex in d, so the
    maximum is at a vertex; greedy coordinate flips from random vertices."""
    g = torch.Generator().manual_seed(seed)
    m = b.shape[0]
    best = 0.0
    for _ in range(restarts):
        d = torch.where(torch.rand(m, generator=g, dtype=torch.float64) > 0.5, hi, lo).to(torch.float64)
        cur = norm(a @ (d[:, None] * b))
        improved = True
        while improved:
            improved = False
            for k in torch.randperm(m, generator=g).tolist():
                d[k] = lo + hi - d[k]
                value = norm(a @ (d[:, None] * b))
                if value > cur * (1 + 1e-12):
                    cur, improved = value, True
                else:
                    d[k] = lo + hi - d[k]
        best = max(best, cur)
    return best


@pytest.mark.parametrize("k,stride,n,positive", [(3, 1, 6, False), (3, 2, 6, False), (3, 1, 5, True),
                                                 (3, 2, 7, True), (1, 1, 4, True), (1, 1, 1, True)])
def test_conv_then_mean_subtraction(k, stride, n, positive):
    torch.manual_seed(10 * k + n)
    conv = nn.Conv2d(3, 4, k, stride=stride, padding=k // 2, bias=False).double()
    if positive:  # the zero frequency dominates: the mean subtraction removes the largest direction
        with torch.no_grad():
            conv.weight.abs_()
    seq = LipschitzSequential(conv, gn(2, 4, affine=False)).eval()
    bound = lipschitz_bound(seq, (n, n)).value
    plain = conv_operator_norm(conv.weight, (n, n), stride=stride)
    exact = norm(dense(seq, (3, n, n)))
    assert exact <= bound * (1 + 1e-12) and bound <= plain * (1 + 1e-12)
    if k == 1:
        assert bound == pytest.approx(exact, rel=1e-10)  # pointwise: the bound is the exact norm
    elif positive:
        assert bound < 0.9 * plain


def test_gain_is_folded_into_the_next_conv_across_elementwise_and_spatial_maps():
    torch.manual_seed(1)
    g = gn(2, 4, 0.1, 1.0)
    conv = nn.Conv2d(4, 3, 3, padding=1, bias=False).double()
    seq = LipschitzSequential(g, ScaledReLU(0.5), VariationalDropout2d(0.2, rescale=False),
                              nn.Upsample(scale_factor=2), conv).eval()
    cert = lipschitz_bound(seq, (3, 3))
    folded = conv_operator_norm(conv.weight * g.weight.detach()[None, :, None, None], (6, 6))
    assert cert.value == pytest.approx(0.5 * 0.8 * 2.0 * folded, rel=1e-12)
    plain = lipschitz_bound(seq, (3, 3), tighten=False).value
    assert plain == pytest.approx(0.5 * 0.8 * 2.0 * conv_operator_norm(conv.weight, (6, 6)) * g.lipschitz_constant())
    assert cert.value < plain
    # the Jacobian at any activation pattern: conv . U . (0.8 D) . Gamma . P with D in {0, 0.5}
    lin = dense(lambda x: conv(nn.functional.interpolate(g(x), scale_factor=2)), (4, 3, 3))
    mask = dense(lambda x: nn.functional.interpolate(x, scale_factor=2), (4, 3, 3))
    for seed in range(5):
        d = 0.5 * 0.8 * (torch.rand(4 * 36, generator=torch.Generator().manual_seed(seed)) > 0.5).double()
        jac = dense(conv, (4, 6, 6)) @ (d[:, None] * (mask @ dense(g, (4, 3, 3))))
        assert norm(jac) <= cert.value * (1 + 1e-12)
    assert norm(lin) * 0.4 <= cert.value * (1 + 1e-12)


def test_gain_does_not_cross_a_mean_subtraction_or_a_linear_layer():
    torch.manual_seed(2)
    g1 = gn(1, 4, 0.1, 1.0)
    conv = nn.Conv2d(4, 4, 1, bias=False).double()
    seq = LipschitzSequential(g1, gn(2, 4, affine=False), conv).eval()  # Gamma P2 does not commute
    cert = lipschitz_bound(seq, (3, 3))
    assert cert.value == pytest.approx(g1.lipschitz_constant() * conv_operator_norm(conv.weight, (3, 3)), rel=1e-12)
    assert cert.parts["0.gain"] == g1.lipschitz_constant()  # a factor of its own
    assert norm(dense(seq, (4, 3, 3))) <= cert.value * (1 + 1e-12)


CASES = [  # (k1, k2, n, mean1, mean2, activation, adjoint)
    (3, 3, 4, True, True, ScaledReLU(0.5), False),
    (3, 3, 4, True, True, ScaledReLU(0.5), True),
    (3, 3, 3, False, True, ScaledReLU(0.7), False),
    (3, 3, 3, False, False, ScaledReLU(0.7), True),
    (1, 3, 4, True, False, nn.LeakyReLU(0.3), False),
    (3, 1, 2, True, True, nn.ReLU(), False),
    (3, 3, 1, True, True, ScaledReLU(0.5), False),
]


@pytest.mark.parametrize("k1,k2,n,mean1,mean2,act,adjoint", CASES)
def test_pair_bound_dominates_the_worst_activation_pattern(k1, k2, n, mean1, mean2, act, adjoint):
    torch.manual_seed(100 * k1 + 10 * k2 + n)
    c1 = nn.Conv2d(3, 4, k1, padding=k1 // 2, bias=False).double()
    c2 = nn.Conv2d(4, 3, k2, padding=k2 // 2, bias=False).double()
    g1, g2 = gn(2, 4), gn(1, 3)
    if adjoint:  # C2 = C1^T: aligned directions, where the pair bound must not undercut the product
        with torch.no_grad():
            c2.weight.copy_(c1.weight.flip(-1, -2).transpose(0, 1))
            g1.weight.fill_(1.0)
    drop = VariationalDropout2d(0.25, rescale=False)
    mods = [c1, *([g1] if mean1 else []), act, drop, c2, *([g2] if mean2 else [])]
    seq = LipschitzSequential(*mods).eval()
    cert = lipschitz_bound(seq, (n, n))
    plain = lipschitz_bound(seq, (n, n), tighten=False).value
    assert cert.value <= plain * (1 + 1e-12)
    lo, hi = (0.3 * 0.75, 0.75) if isinstance(act, nn.LeakyReLU) else (0.0, getattr(act, "slope", 1.0) * 0.75)
    b = dense(lambda x: g1(c1(x)) if mean1 else c1(x), (3, n, n))
    a = dense(lambda x: g2(c2(x)) if mean2 else c2(x), (4, n, n))
    assert worst_pattern(a, b, lo, hi, seed=n) <= cert.value * (1 + 1e-12)


def test_pair_needs_stride_one_and_matching_grids():
    torch.manual_seed(3)
    c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    c2 = nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False).double()
    seq = LipschitzSequential(c1, ScaledReLU(0.5), c2).eval()
    cert = lipschitz_bound(seq, (6, 6))
    expected = conv_operator_norm(c1.weight, (6, 6)) * 0.5 * conv_operator_norm(c2.weight, (6, 6), stride=2)
    assert cert.value == pytest.approx(expected, rel=1e-12)  # no pair: the separate factors
