"""Jacobian diagnostics against dense Jacobians."""

from __future__ import annotations

import pytest
import torch

from lipdeq.gradients import jacobian_frobenius_penalty, jacobian_spectral_norm


def _per_sample_map(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    return (lambda z: torch.tanh(z @ W.T + x)), torch.randn(3, 5, generator=gen, dtype=torch.float64)


def _sample_jacobian(f, z: torch.Tensor, b: int) -> torch.Tensor:
    """Dense Jacobian of sample b's output with respect to sample b's state."""
    idx = torch.tensor([b])
    return torch.autograd.functional.jacobian(lambda v: f(z.detach().index_copy(0, idx, v[None]))[b], z.detach()[b])


def test_spectral_norm_matches_dense_jacobian_per_sample():
    f, z = _per_sample_map()
    est = jacobian_spectral_norm(f, z, n_iter=200, generator=torch.Generator().manual_seed(1))
    for b in range(z.shape[0]):
        exact = torch.linalg.matrix_norm(_sample_jacobian(f, z, b), ord=2)
        torch.testing.assert_close(est[b], exact, rtol=1e-8, atol=0)


def test_hutchinson_is_unbiased_for_frobenius_norm():
    f, z = _per_sample_map(2)
    z = z.requires_grad_()
    out = f(z)
    exact = sum(_sample_jacobian(f, z, b).pow(2).sum() for b in range(z.shape[0])) / z.numel()
    est = jacobian_frobenius_penalty(out, z, n_samples=4000, create_graph=False,
                                     generator=torch.Generator().manual_seed(0))
    # Monte-Carlo: 4000 probes give a relative standard error of a few percent here.
    assert abs(float(est) - float(exact)) < 0.05 * float(exact)


def test_penalty_is_differentiable_in_parameters():
    W = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    pen = jacobian_frobenius_penalty(torch.tanh(z @ W.T), z)
    (g,) = torch.autograd.grad(pen, W)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_iter"):
        jacobian_spectral_norm(lambda z: z, torch.zeros(1, 2), n_iter=0)
    with pytest.raises(ValueError, match="does not require grad"):
        jacobian_frobenius_penalty(torch.zeros(2), torch.zeros(2))
