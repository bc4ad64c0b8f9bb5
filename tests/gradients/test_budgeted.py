"""Certified budgets (lipdeq.gradients.budgeted): a-priori counts, and bounds that hold against exact oracles.

The oracles are independent of the iteration: the fixed point by a long float64 Picard run to
round-off, the adjoint ``(I - J^T)^-1 g`` by a dense linear solve, float64 throughout.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lipdeq import fixed_point
from lipdeq.gradients.budgeted import apriori_steps
from lipdeq.solvers import SolverWarning, Status

B, D = 6, 30
EPS = torch.finfo(torch.float64).eps


@pytest.mark.parametrize("L, ratio", [(0.5, 1e-3), (0.02, 9.9e-4), (0.9, 1e-6), (0.3, 0.3), (0.3, 0.31), (0.7, 2.0)])
def test_apriori_steps_is_the_smallest_count(L, ratio):
    k = apriori_steps(L, ratio)
    assert L**k <= ratio
    assert k == 0 or L ** (k - 1) > ratio


def test_apriori_steps_of_zero_constant():
    assert apriori_steps(0.0, 1e-9) == 1


def _contraction(L: float, seed: int):
    """f(z) = tanh(W z + U x) with ||W||_2 = L exactly, so Lip(f) <= L (tanh' in (0, 1])."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    W = W * (L / torch.linalg.matrix_norm(W, ord=2))
    U = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    x = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(B, D, generator=g, dtype=torch.float64)
    return W, U, x, c


def _oracles(W, U, x, c, z_start):
    """z* (Picard to round-off), and per sample the exact adjoint w = (I - J^T)^-1 c at z*."""
    with torch.no_grad():
        z = z_start.clone()
        for _ in range(5000):
            z_new = torch.tanh(z @ W.T + x @ U.T)
            if torch.equal(z_new, z):
                break
            z = z_new
        s = 1.0 - torch.tanh(z @ W.T + x @ U.T) ** 2
        eye = torch.eye(D, dtype=torch.float64)
        w = torch.stack([torch.linalg.solve(eye - (s[b, :, None] * W).T, c[b]) for b in range(B)])
    return z, w, s


@pytest.mark.parametrize("L", [0.02, 0.3, 0.8])
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_budgeted_ift_bounds_hold_on_every_sample(L, stop_mode):
    W, U, x, c = _contraction(L, seed=int(L * 100))
    f = lambda z: torch.tanh(z @ W.T + x @ U.T)  # noqa: E731
    z, sol = fixed_point(f, torch.zeros(B, D, dtype=torch.float64), lipschitz=L, budget="certified",
                         f_tol=1e-10, b_tol=1e-2, f_max_iter=200, b_max_iter=200, stop_mode=stop_mode)
    (z * c).sum().backward()
    z_star, w_star, s = _oracles(W, U, x, c, z.detach())
    # forward: the bound holds per sample (rounding of the oracle itself: a few ulps of ||z*||)
    err = (z.detach() - z_star).norm(dim=1)
    slack = 16 * EPS * z_star.norm(dim=1)
    assert bool((err <= sol.error_bound + slack).all()), (err, sol.error_bound)
    assert sol.all_converged and sol.extra_f_evals == 0
    assert int(sol.nstep[0]) == sol.n_f_evals  # the last evaluation carried the graph: no re-evaluation
    # backward: w, and the gradient it gives for x = U^T diag(s) w (its error <= ||U|| ||dw||)
    bwd = sol.backward
    assert bwd is not None and bool(bwd.converged.all())
    w_err = (bwd.value - w_star).norm(dim=1)
    w_slack = 16 * EPS * bwd.n_f_evals * w_star.norm(dim=1) + 4 * sol.error_bound * w_star.norm(dim=1)
    assert bool((w_err <= bwd.error_bound + w_slack).all()), (w_err, bwd.error_bound)
    grad_exact = (s * w_star) @ U
    u_norm = float(torch.linalg.matrix_norm(U, ord=2))
    g_err = (x.grad - grad_exact).norm(dim=1)
    assert bool((g_err <= u_norm * (bwd.error_bound + w_slack) + w_slack).all())
    # the certified tolerance is met: relative to ||w|| (rel) or absolute
    scale = w_star.norm(dim=1) if stop_mode == "rel" else torch.ones(B, dtype=torch.float64)
    assert bool((bwd.error_bound <= 1e-2 * scale * (1 + 1e-9)).all())


def test_budgeted_counts_follow_the_certificate():
    """Relative tolerances from z0 = 0: K and k are the closed-form counts, whatever the data."""
    L = 0.3
    W, U, x, c = _contraction(L, seed=3)
    f = lambda z: torch.tanh(z @ W.T + x @ U.T)  # noqa: E731
    z, sol = fixed_point(f, torch.zeros(B, D, dtype=torch.float64), lipschitz=L, budget="certified",
                         f_tol=1e-3, b_tol=1e-3)
    (z * c).sum().backward()
    K = apriori_steps(L, 1e-3 * (1 - L) / (1 + L))
    k = apriori_steps(L, 1e-3 * (1 - L) / (1 + L)) - 1
    assert sol.n_f_evals <= K  # a-posteriori early stops can only shorten it
    assert sol.backward.n_f_evals == k


def test_jfb_reports_a_certified_gradient_error():
    L = 0.4
    W, U, x, c = _contraction(L, seed=5)
    f = lambda z: torch.tanh(z @ W.T + x @ U.T)  # noqa: E731
    for budget in ("certified", "residual"):
        x.grad = None
        z, sol = fixed_point(f, torch.zeros(B, D, dtype=torch.float64), lipschitz=L, budget=budget,
                             backward="jfb", f_tol=1e-12, f_max_iter=200, stop_mode="abs")
        (z * c).sum().backward()
        _, w_star, _ = _oracles(W, U, x, c, z.detach())
        bwd = sol.backward
        assert bwd is not None and bwd.n_f_evals == 0
        true_err = (w_star - c).norm(dim=1)  # JFB uses w = g
        assert bool((true_err <= bwd.error_bound).all())
        assert torch.allclose(bwd.error_bound, L / (1 - L) * c.norm(dim=1))
        assert bool((true_err > 0.05 * bwd.error_bound).all())  # the bound is not vacuous here


def test_certified_budget_without_a_contraction_falls_back_with_a_warning():
    W, U, x, c = _contraction(0.5, seed=1)
    f = lambda z: torch.tanh(z @ W.T + x @ U.T)  # noqa: E731
    for lip in (None, 1.0, math.inf):
        with pytest.warns(SolverWarning, match="budget='certified' needs a Lipschitz constant below 1"):
            z, sol = fixed_point(f, torch.zeros(B, D, dtype=torch.float64), lipschitz=lip, budget="certified")
        assert sol.method == "anderson" and sol.extra_f_evals == 1 and sol.error_bound is None
        assert sol.all_converged


def test_certified_budget_refuses_phantom_and_unknown_budgets():
    f = lambda z: 0.5 * z  # noqa: E731
    with pytest.raises(ValueError, match="phantom"):
        fixed_point(f, torch.ones(2, 3), lipschitz=0.5, budget="certified", backward="phantom")
    with pytest.raises(ValueError, match="unknown budget"):
        fixed_point(f, torch.ones(2, 3), lipschitz=0.5, budget="apriori")


def test_non_finite_sample_is_reported_and_the_rest_certified():
    W, U, x, c = _contraction(0.3, seed=2)
    x_bad = x.detach().clone()
    x_bad[2, 0] = float("nan")

    def f(z):
        return torch.tanh(z @ W.T + x_bad @ U.T)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        z, sol = fixed_point(f, torch.zeros(B, D, dtype=torch.float64), lipschitz=0.3, budget="certified")
    assert sol.statuses()[2] == Status.NON_FINITE
    assert math.isinf(float(sol.error_bound[2]))
    others = [b for b in range(B) if b != 2]
    assert all(sol.statuses()[b] == Status.CONVERGED for b in others)
    assert bool(torch.isfinite(z[others]).all())


def test_max_iter_cuts_the_count_and_says_so():
    W, U, x, c = _contraction(0.9, seed=4)
    f = lambda z: torch.tanh(z @ W.T + x @ U.T)  # noqa: E731
    with torch.no_grad():
        _, sol = fixed_point(f, torch.zeros(B, D, dtype=torch.float64), lipschitz=0.9, budget="certified",
                             f_tol=1e-12, f_max_iter=3)
    assert sol.n_f_evals == 3
    z_star, _, _ = _oracles(W, U, x, c, sol.value)
    err = (sol.value - z_star).norm(dim=1)
    assert bool((err <= sol.error_bound).all())
    tol = 1e-12 * z_star.norm(dim=1)
    assert [s == Status.CONVERGED for s in sol.statuses()] == (sol.error_bound <= tol).tolist()
