"""Property-based tests (hypothesis) of ``solve`` and ``fixed_point`` on random maps.

Oracles are independent of the solvers: dense float64 linear algebra (closed-form fixed points and
gradients) and a float64 Newton iteration for ``tanh(W z + c)``. Floating-point slack is derived, not
tuned: evaluating ``f`` in a precision with unit roundoff ``u`` perturbs it by at most
``eta = gamma_(D+2) (||W||_F ||z|| + ||c|| + ||f(z)||)`` (``gamma_n = n u / (1 - n u)``), which enters
the a-posteriori bound ``||f(z) - z*|| <= L/(1-L) ||f(z) - z|| + eta / (1-L)``.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lipdeq import fixed_point
from lipdeq.solvers import Status, solve

SETTINGS = settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
METHODS = ("anderson", "picard", "broyden")
DTYPES = (torch.float32, torch.float64)
F64 = torch.float64


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _gamma(n: int, dtype: torch.dtype) -> float:
    nu = n * _unit_roundoff(dtype)
    return nu / (1 - nu)


def _matrix_with_norm(d: int, norm: float, gen: torch.Generator) -> torch.Tensor:
    """A random float64 ``d x d`` matrix with spectral norm ``norm`` (exactly, up to rounding)."""
    a = torch.randn(d, d, generator=gen, dtype=F64)
    return a * (norm / torch.linalg.matrix_norm(a, ord=2))


def _rows_with_norms(b: int, d: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """``(b, d)`` random rows with norms drawn in ``[low, high]``."""
    v = torch.randn(b, d, generator=gen, dtype=F64)
    norms = low + (high - low) * torch.rand(b, 1, generator=gen, dtype=F64)
    return v / torch.linalg.vector_norm(v, dim=1, keepdim=True) * norms


def _picard_budget(stop_mode: str, tol: float, rho: float, r0: float) -> int:
    """Evaluations after which Picard provably meets ``tol`` from ``z0 = 0`` on a ``rho``-contraction.

    Evaluation ``k + 1`` sees the residual ``r_k <= rho^k r0``. ``abs``: ``r_k < tol``. ``cert``:
    ``rho / (1 - rho) r_k < tol``. ``rel``: ``||f(z_k)|| >= ||z*|| (1 - rho^(k+1))`` and
    ``r0 <= (1 + rho) ||z*||`` give ``rel_k <= rho^k (1 + rho) / (1 - rho^2) = rho^k / (1 - rho)``.
    """
    if stop_mode == "abs":
        target = tol / r0
    elif stop_mode == "cert":
        target = tol * (1 - rho) / (rho * r0)
    else:
        target = tol * (1 - rho)
    k = max(0, math.ceil(math.log(target) / math.log(rho)))
    return k + 1 + 2  # + the first evaluation + a margin of two


def _tol(stop_mode: str, dtype: torch.dtype) -> float:
    """Tolerances well above the rounding floor of each precision (see the module docstring)."""
    if dtype == torch.float32:
        # cert multiplies the residual (whose floor is ~ eta / (1 - L)) by L / (1 - L) <= 19
        return {"rel": 1e-4, "abs": 1e-3, "cert": 1e-2}[stop_mode]
    return {"rel": 1e-10, "abs": 1e-9, "cert": 1e-9}[stop_mode]


def _newton_tanh(W: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Float64 fixed points of ``z = tanh(W z + c)`` per sample (Newton from Picard warm start)."""
    z = torch.zeros_like(c)
    for _ in range(30):
        z = torch.tanh(z @ W.T + c)
    eye = torch.eye(W.shape[0], dtype=F64)
    for _ in range(30):
        t = torch.tanh(z @ W.T + c)
        jac = (1 - t**2)[:, :, None] * W[None] - eye  # d(f(z) - z)/dz per sample
        z = z - torch.linalg.solve(jac, (t - z)[:, :, None])[:, :, 0]
    assert float(torch.linalg.vector_norm(torch.tanh(z @ W.T + c) - z, dim=1).max()) < 1e-14
    return z


@st.composite
def contraction_problems(draw: st.DrawFn) -> dict:
    """A random contraction: linear ``A z + b`` or ``tanh(W z + c)`` with ``||A||, ||W|| = rho <= 0.95``."""
    return {
        "kind": draw(st.sampled_from(["linear", "tanh"])),
        "batch": draw(st.integers(1, 6)),
        "dim": draw(st.integers(1, 24)),
        "rho": draw(st.floats(0.05, 0.95)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "method": draw(st.sampled_from(METHODS)),
        "stop_mode": draw(st.sampled_from(["rel", "abs", "cert"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _build(p: dict):
    """The map in the solver's dtype, its exact float64 twin's fixed point, and the data of ``eta``."""
    gen = torch.Generator().manual_seed(p["seed"])
    B, D, dt = p["batch"], p["dim"], p["dtype"]
    W = _matrix_with_norm(D, p["rho"], gen).to(dt)
    c = _rows_with_norms(B, D, 0.1, 1.0, gen).to(dt)
    W64, c64 = W.to(F64), c.to(F64)  # exact casts: the oracle solves the map the solver sees
    # the rounded matrix may have a norm a hair above rho: certify with the exact float64 norm
    L = float(torch.linalg.matrix_norm(W64, ord=2)) * (1 + 1e-12)
    if p["kind"] == "linear":
        def f(z: torch.Tensor) -> torch.Tensor:
            return z @ W.T + c

        z_star = torch.linalg.solve(torch.eye(D, dtype=F64) - W64, c64.T).T
    else:
        def f(z: torch.Tensor) -> torch.Tensor:
            return torch.tanh(z @ W.T + c)

        z_star = _newton_tanh(W64, c64)
    w_fro = float(torch.linalg.matrix_norm(W64))
    return f, z_star, L, w_fro, c64


def _eta(dim: int, dtype: torch.dtype, w_fro: float, zb_norm: torch.Tensor, c_norm: torch.Tensor,
         fz_norm: torch.Tensor) -> torch.Tensor:
    """Per-sample bound on ``||fl(f(z)) - f(z)||`` (matvec, addition, tanh; see module docstring)."""
    return _gamma(dim + 2, dtype) * (w_fro * zb_norm + c_norm + fz_norm)


def _bound_with_rounding(p: dict, sol, L: float, w_fro: float, c64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bound, eta)``: the a-posteriori bound on ``||value - z*||`` including the rounding of ``f``.

    With ``v = fl(f(z_b))`` and reported residual ``r`` (computed with relative error ``<= (D+4) u``),
    ``||v - z*|| <= L/(1-L) r (1 + (D+4) u) + eta/(1-L)`` where ``||z_b|| <= ||v|| + r (1 + (D+4) u)``.
    """
    D, dt = p["dim"], p["dtype"]
    inflate = 1 + (D + 4) * _unit_roundoff(dt)
    r = sol.abs_residual.to(F64) * inflate
    v_norm = torch.linalg.vector_norm(sol.value.to(F64), dim=1)
    eta = _eta(D, dt, w_fro, v_norm + r, torch.linalg.vector_norm(c64, dim=1), v_norm)
    return sol.error_bound.to(F64) * inflate + eta / (1 - L), eta


@SETTINGS
@given(contraction_problems())
def test_contractions_converge_truthfully_with_valid_bounds(p: dict) -> None:
    """Every sample converges within the Picard a-priori budget (twice that for the accelerated
    methods), the reported residuals are those of a real iterate, and the certified bound holds."""
    f, z_star, L, w_fro, c64 = _build(p)
    B, D, dt = p["batch"], p["dim"], p["dtype"]
    tol, stop_mode = _tol(p["stop_mode"], dt), p["stop_mode"]
    r0 = float(torch.linalg.vector_norm(f(torch.zeros(B, D, dtype=dt)).to(F64), dim=1).max())
    budget = _picard_budget(stop_mode, tol, L, r0)
    if p["method"] != "picard":
        budget = 2 * budget
    z0 = torch.zeros(B, D, dtype=dt)
    sol = solve(f, z0, method=p["method"], tol=tol, stop_mode=stop_mode, max_iter=budget, lipschitz=L)

    assert sol.statuses() == [Status.CONVERGED] * B, (sol.statuses(), sol.abs_residual, budget)
    crit = {"abs": sol.abs_residual, "rel": sol.rel_residual, "cert": sol.error_bound}[stop_mode]
    assert bool((crit < tol).all())
    assert sol.value.dtype == dt and bool(torch.isfinite(sol.value).all())

    v = sol.value.to(F64)
    err = torch.linalg.vector_norm(v - z_star, dim=1)
    bound, eta = _bound_with_rounding(p, sol, L, w_fro, c64)
    assert bool((err <= bound).all()), (err, sol.error_bound, eta)
    inflate = 1 + (D + 4) * _unit_roundoff(dt)
    # reaching tol really means being close to z*: abs residual r < tol gives ||v - z*|| < L/(1-L) tol
    if stop_mode == "abs":
        assert bool((err <= L / (1 - L) * tol * inflate + eta / (1 - L)).all())
    # the reported residual belongs to the returned point: v - z_b has norm r, so
    # ||f(v) - v|| <= L r, plus the rounding of evaluating f(v)
    fv = f(sol.value).to(F64)
    res_v = torch.linalg.vector_norm(fv - v, dim=1)
    v_norm = torch.linalg.vector_norm(v, dim=1)
    eta_v = _eta(D, dt, w_fro, v_norm, torch.linalg.vector_norm(c64, dim=1), torch.linalg.vector_norm(fv, dim=1))
    assert bool((res_v <= L * sol.abs_residual.to(F64) * inflate + eta_v).all()), (res_v, sol.abs_residual)


@SETTINGS
@given(contraction_problems(), st.integers(1, 12))
def test_error_bound_holds_for_any_status(p: dict, max_iter: int) -> None:
    """With few iterations (MAX_ITER likely) the certified bound still never falls below the true error."""
    f, z_star, L, w_fro, c64 = _build(p)
    B, D, dt = p["batch"], p["dim"], p["dtype"]
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    z0 = torch.randn(B, D, generator=gen, dtype=F64).to(dt)  # away from z*
    sol = solve(f, z0, method=p["method"], tol=1e-12, stop_mode="abs", max_iter=max_iter, lipschitz=L)
    assert set(sol.statuses()) <= {Status.CONVERGED, Status.MAX_ITER}
    err = torch.linalg.vector_norm(sol.value.to(F64) - z_star, dim=1)
    bound, _ = _bound_with_rounding(p, sol, L, w_fro, c64)
    assert bool((err <= bound).all()), (err, sol.error_bound)


@st.composite
def expansive_problems(draw: st.DrawFn) -> dict:
    """Symmetric ``A = Q diag(lambda) Q^T`` with every ``|lambda_i|`` in [1.05, 3], ``b != 0``."""
    return {
        "batch": draw(st.integers(1, 6)),
        "dim": draw(st.integers(1, 12)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "method": draw(st.sampled_from(METHODS)),
        "stop_mode": draw(st.sampled_from(["rel", "abs"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _expansive(p: dict):
    gen = torch.Generator().manual_seed(p["seed"])
    B, D, dt = p["batch"], p["dim"], p["dtype"]
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=F64))
    lam = (1.05 + 1.95 * torch.rand(D, generator=gen, dtype=F64)) * torch.where(
        torch.rand(D, generator=gen, dtype=F64) < 0.5, -1.0, 1.0
    )
    A = ((q * lam) @ q.T).to(dt)
    b = _rows_with_norms(B, D, 0.5, 1.0, gen).to(dt)
    z0 = _rows_with_norms(B, D, 1.0, 2.0, gen).to(dt)
    A64, b64 = A.to(F64), b.to(F64)
    z_star = torch.linalg.solve(torch.eye(D, dtype=F64) - A64, b64.T).T
    return (lambda z: z @ A.T + b), A64, b64, z0, z_star


@SETTINGS
@given(expansive_problems())
def test_non_contractions_report_truthful_statuses(p: dict) -> None:
    """An expansive linear map has one fixed point, which Anderson/Broyden may legitimately find: any
    CONVERGED must then be true (criterion below tol, and the returned point really near z*)."""
    f, A64, b64, z0, z_star = _expansive(p)
    dt, D = p["dtype"], p["dim"]
    tol = _tol(p["stop_mode"], dt) * 10
    sol = solve(f, z0, method=p["method"], tol=tol, stop_mode=p["stop_mode"], max_iter=60)
    v = sol.value.to(F64)
    u = _unit_roundoff(dt)
    a_norm = float(torch.linalg.matrix_norm(A64, ord=2))
    inv_norm = float(torch.linalg.matrix_norm(torch.linalg.inv(torch.eye(D, dtype=F64) - A64), ord=2))
    a_fro = float(torch.linalg.matrix_norm(A64))
    crit = sol.abs_residual if p["stop_mode"] == "abs" else sol.rel_residual
    fv = f(sol.value).to(F64)
    for i, status in enumerate(sol.statuses()):
        assert status != Status.NON_FINITE
        if status == Status.CONVERGED:
            assert float(crit[i]) < tol
        if math.isfinite(float(sol.abs_residual[i])):
            # value = f(z_b) with ||f(z_b) - z_b|| = r: then ||f(v) - v|| <= ||A|| r and
            # ||v - z*|| <= ||A|| ||z_b - z*|| <= ||A|| ||(I - A)^-1|| r (plus rounding of f)
            r = float(sol.abs_residual[i]) * (1 + (D + 4) * u)
            v_norm = float(torch.linalg.vector_norm(v[i]))
            eta = _gamma(D + 2, dt) * (a_fro * (v_norm + r) + float(torch.linalg.vector_norm(b64[i])) + v_norm)
            res_v = float(torch.linalg.vector_norm(fv[i] - v[i]))
            assert res_v <= a_norm * r + 2 * eta * (1 + a_norm)
            err = float(torch.linalg.vector_norm(v[i] - z_star[i]))
            assert err <= a_norm * inv_norm * (r + eta) + eta


@SETTINGS
@given(expansive_problems())
def test_picard_on_uniformly_expansive_maps_diverges(p: dict) -> None:
    """With every |eigenvalue| >= 1.05 (A symmetric) Picard's residual grows by >= 1.05 per step, so it
    reports DIVERGED (factor 100 over its best) and never CONVERGED."""
    f, *_, z0, _ = _expansive(p)
    tol = _tol("abs", p["dtype"])
    sol = solve(f, z0, method="picard", tol=tol, stop_mode="abs", max_iter=120, divergence_factor=100.0)
    r0 = torch.linalg.vector_norm(f(z0) - z0, dim=1)
    assert bool((r0 > tol).all())  # generic: ||r0|| >= 0.05 ||z0 - z*|| with random z0 of norm >= 1
    assert sol.statuses() == [Status.DIVERGED] * p["batch"]
    assert bool((sol.nstep == 1).all())  # the best iterate is the first one: residuals only grow


@SETTINGS
@given(
    st.integers(1, 6), st.integers(1, 12), st.sampled_from(DTYPES), st.sampled_from(METHODS),
    st.integers(0, 2**31 - 1), st.integers(1, 80),
)
def test_maps_without_fixed_point_never_converge(B: int, D: int, dt: torch.dtype, method: str, seed: int,
                                                 max_iter: int) -> None:
    """``f(z) = z + c + 0.5 sin(z)`` with some ``|c_i| > 0.5 + delta`` has no fixed point: its residual is
    at least ``lower = sqrt(sum_i max(|c_i| - 0.5, 0)^2)`` everywhere: never CONVERGED under ``abs``, and
    the reported residual respects that bound up to the rounding of ``f`` at the returned point.
    Regression: Anderson and Broyden used to push ``|z|`` to ~1e8 (float32) / ~3e16 (float64), where
    ``fl(z + c + 0.5 sin z) == z`` and the residual reads 0; such a run-off is now DIVERGED."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(B, D, generator=gen, dtype=F64)
    c[:, 0] = torch.where(c[:, 0] < 0, -1.0, 1.0) * (0.6 + torch.rand(B, generator=gen, dtype=F64))
    c = c.to(dt)
    lower = torch.linalg.vector_norm((c.to(F64).abs() - 0.5).clamp_min(0), dim=1)
    z0 = torch.randn(B, D, generator=gen, dtype=F64).to(dt)
    tol = float(lower.min()) * 0.9

    def f(z: torch.Tensor) -> torch.Tensor:
        return z + c + 0.5 * torch.sin(z)

    sol = solve(f, z0, method=method, tol=tol, stop_mode="abs", max_iter=max_iter)
    assert set(sol.statuses()) <= {Status.MAX_ITER, Status.DIVERGED}
    # rounding of z + c + 0.5 sin(z) - z, componentwise <= 4 u (2 |z| + |c| + 1); ||z_b|| <= ||v|| + r
    v_norm = torch.linalg.vector_norm(sol.value.to(F64), dim=1)
    r = sol.abs_residual.to(F64)
    finite = torch.isfinite(r)
    zb = v_norm + torch.where(finite, r, 0.0)
    slack = 4 * _unit_roundoff(dt) * (2 * zb + torch.linalg.vector_norm(c.to(F64), dim=1) + D**0.5)
    assert bool((r[finite] >= (lower - slack)[finite]).all())
    assert Status.CONVERGED not in sol.statuses(), (sol.value, sol.abs_residual)


@st.composite
def linear_ift_problems(draw: st.DrawFn) -> dict:
    return {
        "batch": draw(st.integers(1, 6)),
        "dim": draw(st.integers(1, 10)),
        "n_in": draw(st.integers(1, 4)),
        "rho": draw(st.floats(0.05, 0.9)),
        "solver": draw(st.sampled_from(METHODS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@SETTINGS
@given(linear_ift_problems())
def test_ift_gradient_matches_closed_form(p: dict) -> None:
    """``z* = (I - A)^-1 U x``: the IFT gradients in A, U and x equal autograd through the dense solve."""
    gen = torch.Generator().manual_seed(p["seed"])
    B, D, n = p["batch"], p["dim"], p["n_in"]
    A = _matrix_with_norm(D, p["rho"], gen).requires_grad_()
    U = torch.randn(D, n, generator=gen, dtype=F64).requires_grad_()
    x = torch.randn(B, n, generator=gen, dtype=F64).requires_grad_()
    w = torch.randn(B, D, generator=gen, dtype=F64)
    exact = torch.linalg.solve(torch.eye(D, dtype=F64) - A, (x @ U.T).T).T
    expected = torch.autograd.grad((w * exact).sum(), (A, U, x))

    z, sol = fixed_point(lambda z: z @ A.T + x @ U.T, torch.zeros(B, D, dtype=F64), solver=p["solver"],
                         f_tol=1e-11, b_tol=1e-11, f_max_iter=600, b_max_iter=600, stop_mode="abs",
                         lipschitz=p["rho"] * (1 + 1e-9))
    got = torch.autograd.grad((w * z).sum(), (A, U, x))
    assert sol.all_converged and sol.backward is not None and sol.backward.all_converged
    # forward and adjoint errors are below rho/(1-rho) * 1e-11 <= 1e-10 per sample; the gradients
    # (products of O(10)-sized states and adjoints) inherit an error of order 1e-9
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-7)
