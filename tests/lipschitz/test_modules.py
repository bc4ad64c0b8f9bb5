"""Mean-only GroupNorm, scaled ReLU and variational dropout: definitions and Lipschitz constants."""

from __future__ import annotations

import pytest
import torch

from lipdeq.lipschitz import MeanOnlyGroupNorm, ScaledReLU, VariationalDropout2d


def projection_matrix(channels: int, groups: int, hw: int) -> torch.Tensor:
    """I - (block averaging): the orthogonal projection removing each group's mean, built explicitly."""
    n = channels * hw
    size = (channels // groups) * hw
    avg = torch.zeros(n, n, dtype=torch.float64)
    for g in range(groups):
        sl = slice(g * size, (g + 1) * size)
        avg[sl, sl] = 1.0 / size
    return torch.eye(n, dtype=torch.float64) - avg


def test_mean_only_groupnorm_is_the_orthogonal_projection(oracles):
    gn = MeanOnlyGroupNorm(2, 4, affine=False).double()
    dense = oracles.dense(gn, (1, 4, 3, 3))
    proj = projection_matrix(4, 2, 9)
    torch.testing.assert_close(dense, proj, rtol=0, atol=1e-12)
    torch.testing.assert_close(dense @ dense, dense, rtol=0, atol=1e-12)  # idempotent
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-12)  # symmetric: orthogonal projection
    assert oracles.norm(dense) == pytest.approx(1.0)
    assert gn.lipschitz_constant() == 1.0


def test_groupnorm_gamma_is_clamped_and_bound_holds(oracles):
    torch.manual_seed(0)
    gn = MeanOnlyGroupNorm(2, 4, affine=True, gamma_cap=1.0).double()
    with torch.no_grad():
        gn.weight.copy_(torch.tensor([3.0, -0.5, -2.0, 0.25]))
        gn.bias.copy_(torch.randn(4))
    assert gn.lipschitz_constant() == 1.0
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    xg = x.reshape(3, 2, -1)
    centred = (xg - xg.mean(-1, keepdim=True)).reshape(x.shape)
    expected = centred * torch.tensor([1.0, -0.5, -1.0, 0.25], dtype=torch.float64).view(1, 4, 1, 1) \
        + gn.bias.view(1, 4, 1, 1)
    torch.testing.assert_close(gn(x), expected)
    lin = oracles.dense(lambda z: gn(z) - gn.bias.view(1, 4, 1, 1), (1, 4, 3, 3))
    assert oracles.norm(lin) <= gn.lipschitz_constant() + 1e-12
    assert oracles.norm(lin) == pytest.approx(1.0)  # attained by a channel with |gamma| at the cap
    uncapped = MeanOnlyGroupNorm(2, 4, gamma_cap=None)
    with torch.no_grad():
        uncapped.weight.fill_(3.0)
    assert uncapped.lipschitz_constant() == 3.0
    with pytest.raises(ValueError, match="num_channels"):
        MeanOnlyGroupNorm(3, 4)


def test_scaled_relu():
    act = ScaledReLU(0.4)
    x = torch.tensor([-1.0, 0.0, 2.0])
    torch.testing.assert_close(act(x), torch.tensor([0.0, 0.0, 0.8]))
    assert act.lipschitz_constant() == pytest.approx(0.4)
    with pytest.raises(ValueError, match="slope"):
        ScaledReLU(float("nan"))


@pytest.mark.parametrize("rescale", [True, False])
def test_variational_dropout_mask_is_fixed_and_constants(rescale):
    p = 0.25
    drop = VariationalDropout2d(p, rescale=rescale)
    x = torch.ones(8, 16, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="reset_mask"):
        drop(x)
    drop.reset_mask(x, generator=torch.Generator().manual_seed(0))
    y1, y2 = drop(x), drop(x * 2.0)
    torch.testing.assert_close(y2, 2.0 * y1)  # same mask on every solver iteration
    keep = y1[:, :, :1, :1]
    assert torch.all(y1 == keep)  # constant over space: per-(sample, channel)
    scale = 1.0 / (1.0 - p) if rescale else 1.0
    assert set(torch.unique(keep).tolist()) <= {0.0, scale}
    assert 0 < (keep == 0).float().mean() < 0.6
    with pytest.raises(RuntimeError, match="no mask"):
        drop(torch.ones(4, 16, 4, 4, dtype=torch.float64))  # new batch shape without reset
    assert drop.lipschitz_constant(True) == pytest.approx(scale)
    drop.eval()
    drop.reset_mask(x)
    eval_factor = 1.0 if rescale else 1.0 - p
    torch.testing.assert_close(drop(x), eval_factor * x)
    assert drop.lipschitz_constant(False) == pytest.approx(eval_factor)
    assert drop.lipschitz_constant() == pytest.approx(eval_factor)
    # Expected training activation matches eval (both modes are unbiased in that sense).
    drop.train()
    drop.reset_mask(torch.ones(4000, 16, 1, 1), generator=torch.Generator().manual_seed(1))
    mean_train = drop(torch.ones(4000, 16, 1, 1)).mean().item()
    assert mean_train == pytest.approx(eval_factor, rel=0.02)


def test_dropout_p_zero_and_bad_p():
    drop = VariationalDropout2d(0.0, rescale=False)
    x = torch.randn(2, 3, 4, 4)
    drop.reset_mask(x)
    torch.testing.assert_close(drop(x), x)
    assert drop.lipschitz_constant(True) == 1.0
    with pytest.raises(ValueError, match="p must"):
        VariationalDropout2d(1.0, rescale=True)


def _two_pass(gn: MeanOnlyGroupNorm, x: torch.Tensor, input_scale: float, relu_slope: float | None) -> torch.Tensor:
    """The unfused definition: scale, subtract the group mean, affine map, then the scaled ReLU."""
    x = input_scale * x
    xg = x.reshape(x.shape[0], gn.num_groups, -1)
    y = (xg - xg.mean(-1, keepdim=True)).reshape(x.shape)
    if gn.weight is not None:
        view = (1, gn.num_channels) + (1,) * (x.dim() - 2)
        y = y * gn.clamped_weight().view(view) + gn.bias.view(view)
    return y if relu_slope is None else relu_slope * torch.relu(y)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("input_scale, relu_slope", [(1.0, None), (0.4, None), (1.0, 0.4), (0.7, -0.3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_groupnorm_matches_the_two_pass_definition(affine, input_scale, relu_slope, channels_last):
    """The one-pass norm (batch_norm kernel, or addcmul for channels-last) equals the unfused formula in
    value, in the gradients of input and parameters, and in second order (the Jacobian regulariser)."""
    gen = torch.Generator().manual_seed(3)
    gn = MeanOnlyGroupNorm(2, 4, affine=affine, gamma_cap=1.0).double()
    if affine:
        with torch.no_grad():
            gn.weight.copy_(torch.tensor([3.0, -0.5, -2.0, 0.25]))  # two entries clamped
            gn.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    x = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    fused, reference = gn(x, input_scale=input_scale, relu_slope=relu_slope), _two_pass(gn, x, input_scale, relu_slope)
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-14)
    w = torch.randn(fused.shape, generator=gen, dtype=torch.float64)
    params = [x, *gn.parameters()]
    g_fused = torch.autograd.grad((fused * w).sum(), params)
    g_ref = torch.autograd.grad((reference * w).sum(), params)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert torch.autograd.gradgradcheck(lambda t: gn(t, input_scale=input_scale, relu_slope=relu_slope),
                                        (x.detach().clone().requires_grad_(True),))


def test_scaled_relu_with_slope_one_is_relu():
    x = torch.tensor([-1.5, 0.0, 2.0])
    torch.testing.assert_close(ScaledReLU(1.0)(x), torch.relu(x), rtol=0, atol=0)
