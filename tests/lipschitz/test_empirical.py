"""Empirical Lipschitz estimates against closed forms (float64)."""

from __future__ import annotations

import pytest
import torch

from lipdeq.lipschitz.empirical import EmpiricalLipschitz, empirical_lipschitz, jacobian_norm, pair_ascent


def _linear(seed: int = 0, n: int = 12, m: int = 9) -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g, dtype=torch.float64)
    return a, float(torch.linalg.matrix_norm(a, ord=2))


@pytest.mark.parametrize("jvp", ["autograd", "finite_difference"])
def test_jacobian_norm_of_a_linear_map_is_its_spectral_norm(jvp: str) -> None:
    a, sigma = _linear()
    x = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    est = jacobian_norm(lambda z: z @ a.T, x, iters=200, jvp=jvp, generator=torch.Generator().manual_seed(2))
    assert est.shape == (4,)
    assert torch.all(est <= sigma * (1 + 1e-9))
    assert torch.allclose(est, torch.full_like(est, sigma), rtol=1e-6)


def test_jacobian_norm_is_per_sample() -> None:
    # sample b is scaled by (b + 1): a batch-separable map whose Jacobian norms differ per sample
    a, sigma = _linear()
    scale = torch.arange(1, 4, dtype=torch.float64).view(3, 1)
    x = torch.randn(3, 12, dtype=torch.float64)
    est = jacobian_norm(lambda z: scale * (z @ a.T), x, iters=200, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(est, sigma * scale.flatten(), rtol=1e-6)


def test_jacobian_norm_of_tanh_at_a_point() -> None:
    # J = diag(1 - tanh(Ax)^2) A at x: its norm computed densely is the oracle
    a, _ = _linear(3)
    x = torch.randn(1, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    d = 1 - torch.tanh(x @ a.T).pow(2)
    exact = float(torch.linalg.matrix_norm(d.view(-1, 1) * a, ord=2))
    est = jacobian_norm(lambda z: torch.tanh(z @ a.T), x, iters=300, generator=torch.Generator().manual_seed(0))
    assert abs(float(est) - exact) <= 1e-7 * exact


def test_pair_ascent_never_exceeds_the_lipschitz_constant_and_finds_it_for_relu() -> None:
    # Lip of relu(Ax) is ||A|| (attained where all units are active); pairs only give lower bounds
    a, sigma = _linear(5)
    f = lambda z: torch.relu(z @ a.T)  # noqa: E731
    x = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    start = x + 0.01 * torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    r0 = (f(x) - f(start)).norm(dim=1) / (x - start).norm(dim=1)
    r = pair_ascent(f, x, start, steps=100)
    assert torch.all(r <= sigma * (1 + 1e-12))
    assert torch.all(r >= r0 - 1e-15)  # the best ratio seen includes the start
    assert float(r.max()) > 0.5 * sigma


def test_empirical_lipschitz_reports_the_max_of_its_methods() -> None:
    a, sigma = _linear(8)
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(1)
    est = empirical_lipschitz(lambda z: z @ a.T, x, iters=100, ascent_steps=20, generator=g)
    assert isinstance(est, EmpiricalLipschitz)
    assert est.value == max(est.jacobian_data, est.jacobian_random, est.pairs)
    assert est.value <= sigma * (1 + 1e-9)
    assert abs(est.jacobian_data - sigma) <= 1e-6 * sigma
    assert set(est.to_dict()) == {"value", "jacobian_data", "jacobian_random", "pairs"}


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="x must be a batch tensor"):
        jacobian_norm(lambda z: z, torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        jacobian_norm(lambda z: z, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="jvp must be"):
        jacobian_norm(lambda z: z, torch.ones(2, 3), jvp="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="b must have the shape"):
        pair_ascent(lambda z: z, torch.ones(2, 3), torch.ones(2, 4))
