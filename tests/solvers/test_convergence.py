"""Every method reaches the fixed point of linear and nonlinear contractions, checked against closed
forms and an independent Newton solve; certificates and the Picard a-priori bound hold."""

from __future__ import annotations

import math

import pytest
import torch

from lipdeq.solvers import Status, solve

METHODS = ["picard", "anderson", "broyden"]
f64 = torch.float64


def linear_problem(B: int, D: int, L: float, seed: int, orthogonal: bool = False):
    """f(z) = A_b z + b_b with ||A_b||_2 = L exactly, and z* = (I - A)^-1 b in closed form."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, D, D, generator=g, dtype=f64)
    if orthogonal:
        A = L * torch.linalg.qr(M).Q
    else:
        A = L * M / torch.linalg.matrix_norm(M, ord=2)[:, None, None]
    b = torch.randn(B, D, generator=g, dtype=f64)
    z_star = torch.linalg.solve(torch.eye(D, dtype=f64) - A, b)

    def f(z: torch.Tensor) -> torch.Tensor:
        return (A @ z.unsqueeze(-1)).squeeze(-1) + b

    return f, z_star


def tanh_problem(B: int, D: int, L: float, seed: int):
    """f(z) = tanh(W z + U x_b) with ||W||_2 = L (so Lip(f) <= L), and a Newton reference solution."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=f64)
    W = L * W / torch.linalg.matrix_norm(W, ord=2)
    inj = torch.randn(B, D, generator=g, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + inj)

    z = torch.zeros(B, D, dtype=f64)  # Newton on F(z) = f(z) - z, dense per-sample Jacobians
    for _ in range(50):
        fz = f(z)
        J = (1 - fz**2)[:, :, None] * W - torch.eye(D, dtype=f64)
        z = z - torch.linalg.solve(J, (fz - z).unsqueeze(-1)).squeeze(-1)
    assert float((f(z) - z).norm(dim=1).max()) < 1e-14
    return f, z


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("L", [0.5, 0.9])
def test_linear_contraction_reaches_closed_form(method: str, L: float) -> None:
    f, z_star = linear_problem(B=4, D=12, L=L, seed=1)
    tol = 1e-9
    sol = solve(f, torch.zeros(4, 12, dtype=f64), method=method, tol=tol, stop_mode="abs", max_iter=400)
    assert sol.all_converged
    assert bool((sol.abs_residual < tol).all())
    # value = f(z_b) with ||f(z_b) - z_b|| < tol, so ||value - z*|| <= L/(1-L) * tol.
    err = (sol.value - z_star).norm(dim=1)
    assert bool((err <= L / (1 - L) * tol).all()), err
    # the reported residuals are those of z_b, the iterate whose image is value
    assert sol.value.shape == (4, 12) and sol.n_f_evals == int(sol.nstep.max())


def test_anderson_terminates_like_gmres_on_linear_maps() -> None:
    """With memory >= D, Anderson on an affine map is GMRES: at most D + 1 steps (catches history bugs)."""
    D = 6
    f, z_star = linear_problem(B=3, D=D, L=0.95, seed=2)
    sol = solve(f, torch.zeros(3, D, dtype=f64), "anderson", tol=1e-10, stop_mode="abs", max_iter=50,
                m=10, lam=1e-14)
    assert sol.all_converged
    assert int(sol.nstep.max()) <= D + 2
    assert float((sol.value - z_star).norm(dim=1).max()) < 1e-8


def _anderson_reference(f_one, x0: list[float], m: int, lam: float, beta: float, steps: int) -> list[list[float]]:
    """Type-II Anderson on one sample in plain Python floats, straight from the module's formula: the
    points at which it evaluates f. ``alpha = H^-1 1 / 1^T H^-1 1``, ``H = G G^T + lam diag(G G^T)``."""
    xs, fs, points = [], [], []
    x = list(x0)
    for _ in range(steps):
        points.append(x)
        fx = f_one(x)
        xs, fs = (xs + [x])[-m:], (fs + [fx])[-m:]
        gs = [[a - b for a, b in zip(fi, xi)] for fi, xi in zip(fs, xs)]
        n = len(gs)
        H = [[sum(a * b for a, b in zip(gi, gk)) for gk in gs] for gi in gs]
        for i in range(n):
            H[i][i] *= 1.0 + lam
        # Gauss-Jordan on [H | 1]
        aug = [row[:] + [1.0] for row in H]
        for c in range(n):
            p = max(range(c, n), key=lambda r: abs(aug[r][c]))
            aug[c], aug[p] = aug[p], aug[c]
            for r in range(n):
                if r != c:
                    q = aug[r][c] / aug[c][c]
                    aug[r] = [a - q * b for a, b in zip(aug[r], aug[c])]
        w = [aug[i][n] / aug[i][i] for i in range(n)]
        alpha = [wi / sum(w) for wi in w]
        x = [sum(alpha[i] * (xs[i][d] + beta * gs[i][d]) for i in range(n)) for d in range(len(x0))]
    return points


@pytest.mark.parametrize("beta", [1.0, 0.7])
def test_anderson_iterates_match_a_plain_reference(beta: float) -> None:
    """Oracle for the history and the mixing: every point at which the solver evaluates f equals that
    of a scalar re-implementation of the formula (float64, past the memory so the ring wraps)."""
    B, D, m, steps = 3, 5, 3, 9
    g = torch.Generator().manual_seed(4)
    W = 0.8 * torch.linalg.qr(torch.randn(D, D, generator=g, dtype=f64)).Q
    b = torch.randn(B, D, generator=g, dtype=f64)
    seen: list[torch.Tensor] = []

    def f(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.clone())
        return torch.tanh(z @ W.T + b)

    solve(f, torch.zeros(B, D, dtype=f64), "anderson", tol=1e-300, stop_mode="abs", max_iter=steps, m=m,
          lam=1e-4, beta=beta)
    assert len(seen) == steps
    for s in range(B):
        def f_one(x: list[float], s: int = s) -> list[float]:
            return torch.tanh(torch.tensor(x, dtype=f64) @ W.T + b[s]).tolist()

        ref = torch.tensor(_anderson_reference(f_one, [0.0] * D, m, 1e-4, beta, steps), dtype=f64)
        torch.testing.assert_close(torch.stack([z[s] for z in seen]), ref, rtol=1e-9, atol=1e-12)


def test_broyden_terminates_on_linear_maps() -> None:
    """Good Broyden solves a D-dimensional linear system in at most 2D steps (Gay, 1979)."""
    D = 6
    f, z_star = linear_problem(B=3, D=D, L=0.95, seed=3)
    sol = solve(f, torch.zeros(3, D, dtype=f64), "broyden", tol=1e-10, stop_mode="abs", max_iter=50)
    assert sol.all_converged
    assert int(sol.nstep.max()) <= 2 * D + 2
    assert float((sol.value - z_star).norm(dim=1).max()) < 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_nonlinear_contraction_matches_newton(method: str) -> None:
    L, tol = 0.8, 1e-10
    f, z_ref = tanh_problem(B=5, D=16, L=L, seed=4)
    sol = solve(f, torch.zeros(5, 16, dtype=f64), method=method, tol=tol, stop_mode="abs", max_iter=300)
    assert sol.all_converged
    err = (sol.value - z_ref).norm(dim=1)
    assert bool((err <= L / (1 - L) * tol + 1e-14).all()), err  # + the reference's own residual


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("L", [0.3, 0.7, 0.95])
def test_error_bound_is_never_below_true_error(method: str, L: float) -> None:
    """The certificate holds per sample, at every stopping point (several max_iter) and for (B,) tensors."""
    f, z_star = linear_problem(B=6, D=10, L=L, seed=5, orthogonal=True)
    # tol far above float64 rounding, which neither the certificate nor the closed form can resolve
    Ls = torch.full((6,), L, dtype=f64)
    for max_iter in (1, 2, 5, 40):
        for lip in (L, Ls):
            sol = solve(f, torch.zeros(6, 10, dtype=f64), method, tol=1e-8, max_iter=max_iter, lipschitz=lip)
            err = (sol.value - z_star).norm(dim=1)
            assert sol.error_bound is not None
            assert bool((err <= sol.error_bound).all()), (max_iter, err, sol.error_bound)
            torch.testing.assert_close(sol.error_bound, L / (1 - L) * sol.abs_residual, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_cert_stop_mode_certifies_tol(method: str) -> None:
    L, tol = 0.9, 1e-6
    f, z_star = linear_problem(B=4, D=10, L=L, seed=6)
    z0 = torch.zeros(4, 10, dtype=f64)
    sol = solve(f, z0, method, tol=tol, stop_mode="cert", lipschitz=L, max_iter=500)
    assert sol.all_converged and bool((sol.error_bound < tol).all())
    assert bool(((sol.value - z_star).norm(dim=1) < tol).all())


@pytest.mark.parametrize("L", [0.5, 0.9, 0.99])
def test_picard_respects_a_priori_iteration_bound(L: float) -> None:
    """||z_n - z*|| <= L^n/(1-L) ||z1 - z0||, and the a-posteriori bound of z_n (= value at nstep n) is
    at most that, so cert-mode Picard stops by the smallest n with L^n/(1-L) ||z1 - z0|| < tol."""
    tol = 1e-6
    f, z_star = linear_problem(B=4, D=10, L=L, seed=7, orthogonal=True)
    z0 = torch.zeros(4, 10, dtype=f64)
    d0 = (f(z0) - z0).norm(dim=1)
    sol = solve(f, z0, "picard", tol=tol, stop_mode="cert", lipschitz=L, max_iter=5000)
    assert sol.all_converged
    bound = torch.floor(torch.log(tol * (1 - L) / d0) / math.log(L)) + 1
    assert bool((sol.nstep <= bound).all()), (sol.nstep, bound)
    # the bound is not vacuous: an orthogonal A contracts every direction by exactly L
    assert bool((sol.nstep >= 0.5 * bound).all())
    assert bool(((sol.value - z_star).norm(dim=1) < tol).all())


def test_picard_value_is_the_nstep_th_iterate_and_tau_damps() -> None:
    f, _ = linear_problem(B=2, D=5, L=0.5, seed=8)
    z = torch.zeros(2, 5, dtype=f64)
    for _ in range(3):
        z = f(z)
    sol = solve(f, torch.zeros(2, 5, dtype=f64), "picard", tol=1e-30, max_iter=3)
    assert sol.nstep.tolist() == [3, 3] and sol.statuses() == [Status.MAX_ITER] * 2
    torch.testing.assert_close(sol.value, z, rtol=0, atol=0)
    # tau = 0.5: z1 = 0.5 z0 + 0.5 f(z0), value = f(z1)
    z0 = torch.zeros(2, 5, dtype=f64)
    sol = solve(f, z0, "picard", tol=1e-30, max_iter=2, tau=0.5)
    torch.testing.assert_close(sol.value, f(0.5 * z0 + 0.5 * f(z0)))


def test_float32_image_shaped_state_and_trace() -> None:
    g = torch.Generator().manual_seed(9)
    W = 0.5 * torch.randn(3, 3, 3, 3, generator=g) / 9
    x = torch.randn(2, 3, 8, 8, generator=g)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.nn.functional.conv2d(z, W, padding=1) + x)

    sol = solve(f, torch.zeros(2, 3, 8, 8), tol=1e-5, max_iter=50, return_trace=True)
    assert sol.value.shape == (2, 3, 8, 8) and sol.value.dtype == torch.float32
    assert sol.all_converged
    assert sol.abs_trace.shape == (sol.n_f_evals, 2) and sol.rel_trace.shape == (sol.n_f_evals, 2)
    rel = (f(sol.value) - sol.value).flatten(1).norm(dim=1) / f(sol.value).flatten(1).norm(dim=1)
    assert bool((rel < 1e-5).all())
