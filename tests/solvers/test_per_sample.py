"""Per-sample semantics: independent stopping, frozen stopped samples, NaN isolation, divergence."""

from __future__ import annotations

import pytest
import torch

from lipdeq.solvers import Status, solve

METHODS = ["picard", "anderson", "broyden"]
f64 = torch.float64


def scaled_linear(scales: list[float], D: int = 8, seed: int = 0):
    """Sample b maps z -> scales[b] Q_b z + c_b (Q_b orthogonal): it contracts at rate scales[b]."""
    g = torch.Generator().manual_seed(seed)
    B = len(scales)
    Q = torch.linalg.qr(torch.randn(B, D, D, generator=g, dtype=f64)).Q
    A = torch.tensor(scales, dtype=f64)[:, None, None] * Q
    c = torch.randn(B, D, generator=g, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return (A @ z.unsqueeze(-1)).squeeze(-1) + c

    return f


@pytest.mark.parametrize("method", METHODS)
def test_easy_sample_stops_early_and_stays_frozen(method: str) -> None:
    f = scaled_linear([0.05, 0.9])
    z0 = torch.zeros(2, 8, dtype=f64)
    sol = solve(f, z0, method, tol=1e-10, stop_mode="abs", max_iter=500, return_trace=True)
    assert sol.all_converged
    easy, hard = sol.nstep.tolist()
    assert easy < hard and sol.n_f_evals == hard
    # Running only until the easy sample stops gives the bitwise same easy value: it never moved after.
    short = solve(f, z0, method, tol=1e-10, stop_mode="abs", max_iter=easy)
    assert short.statuses()[0] == Status.CONVERGED and short.statuses()[1] == Status.MAX_ITER
    assert torch.equal(short.value[0], sol.value[0])
    assert torch.equal(short.abs_residual[0], sol.abs_residual[0])
    # its trace is constant once it stopped, while the hard sample keeps iterating
    assert bool((sol.abs_trace[easy - 1 :, 0] == sol.abs_trace[easy - 1, 0]).all())
    assert float(sol.abs_trace[-1, 1]) < float(sol.abs_trace[easy - 1, 1])
    # and it agrees with solving the easy sample alone
    def f_easy(z: torch.Tensor) -> torch.Tensor:
        return f(torch.cat([z, z]))[:1]

    alone = solve(f_easy, z0[:1], method, tol=1e-10, stop_mode="abs", max_iter=500)
    torch.testing.assert_close(alone.value[0], sol.value[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_sample_is_isolated(method: str, bad: float) -> None:
    f = scaled_linear([0.5, 0.6, 0.7])
    z0 = torch.zeros(3, 8, dtype=f64)
    calls = {"n": 0}

    def poisoned(z: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = f(z)
        if calls["n"] >= 4:  # from the 4th call on, sample 1 comes back non-finite
            out = out.clone()
            out[1, 3] = bad
        return out

    clean = solve(f, z0, method, tol=1e-10, stop_mode="abs", max_iter=200)
    sol = solve(poisoned, z0, method, tol=1e-10, stop_mode="abs", max_iter=200)
    assert sol.statuses() == [Status.CONVERGED, Status.NON_FINITE, Status.CONVERGED]
    assert bool(torch.isfinite(sol.value).all())
    assert int(sol.nstep[1]) == 3 and bool(torch.isfinite(sol.abs_residual[1]))
    for b in (0, 2):  # the other samples are not contaminated
        assert torch.equal(sol.value[b], clean.value[b])
        assert sol.nstep[b] == clean.nstep[b]


def test_non_finite_at_the_first_evaluation_returns_z0() -> None:
    def f(z: torch.Tensor) -> torch.Tensor:
        out = 0.5 * z + 1
        out[0] = float("nan")
        return out

    z0 = torch.full((2, 3), 0.25, dtype=f64)
    for method in METHODS:
        sol = solve(f, z0, method, tol=1e-8, max_iter=100, lipschitz=0.5)
        assert sol.statuses() == [Status.NON_FINITE, Status.CONVERGED]
        assert torch.equal(sol.value[0], z0[0]) and int(sol.nstep[0]) == 0
        assert sol.abs_residual[0] == float("inf") and sol.error_bound[0] == float("inf")
        torch.testing.assert_close(sol.value[1], torch.full((3,), 2.0, dtype=f64))


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_expanding_map_diverges_under_picard(stop_mode: str) -> None:
    def f(z: torch.Tensor) -> torch.Tensor:
        return 2 * z + 1

    sol = solve(f, torch.zeros(2, 4, dtype=f64), "picard", tol=1e-6, stop_mode=stop_mode, max_iter=100)
    assert sol.statuses() == [Status.DIVERGED] * 2
    assert sol.n_f_evals < 20  # stopped early, at 1e4 times the smallest residual (2^14 > 1e4)
    if stop_mode == "abs":  # the best iterate is z0, whose image is returned
        torch.testing.assert_close(sol.value, torch.ones(2, 4, dtype=f64))


@pytest.mark.parametrize("method", METHODS)
def test_map_without_fixed_point_never_converges(method: str) -> None:
    def f(z: torch.Tensor) -> torch.Tensor:  # f(z) - z >= 1 everywhere: no fixed point
        return z + 1 + torch.nn.functional.softplus(z)

    sol = solve(f, torch.zeros(3, 4, dtype=f64), method, tol=1e-3, stop_mode="abs", max_iter=60)
    assert all(s in (Status.DIVERGED, Status.MAX_ITER) for s in sol.statuses())
    assert bool(torch.isfinite(sol.value).all())


def test_norm_overflow_is_divergence_not_non_finite() -> None:
    def f(z: torch.Tensor) -> torch.Tensor:  # finite entries whose squares overflow float32
        return torch.full_like(z, 1e25) * torch.tensor([[0.0], [1.0]])

    sol = solve(f, torch.zeros(2, 4), "picard", tol=1e-3, max_iter=10)
    assert sol.statuses() == [Status.CONVERGED, Status.DIVERGED]


@pytest.mark.parametrize("lam", [0.0, 1e-4])
def test_anderson_singular_least_squares_does_not_crash(lam: float) -> None:
    D = 6
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(D, generator=g, dtype=f64), torch.randn(D, generator=g, dtype=f64)
    A = 0.5 * torch.outer(u, v) / (u.norm() * v.norm())  # rank one: the residual history is degenerate
    c = torch.randn(D, generator=g, dtype=f64)
    z_star = torch.linalg.solve(torch.eye(D, dtype=f64) - A, c)

    cases = {
        "rank_one": (lambda z: z @ A.T + c, torch.zeros(4, D, dtype=f64), z_star),
        "constant": (lambda z: torch.zeros_like(z) + c, torch.zeros(4, D, dtype=f64), c),
        "start_at_fixed_point": (lambda z: z @ A.T + c, z_star.expand(4, D).clone(), z_star),
        "duplicated": (lambda z: z @ A.T + c, torch.randn(1, D, generator=g, dtype=f64).expand(4, D), z_star),
    }
    for name, (f, z0, ref) in cases.items():
        sol = solve(f, z0, "anderson", tol=1e-12, stop_mode="abs", max_iter=40, lam=lam)
        assert sol.all_converged, name
        torch.testing.assert_close(sol.value, ref.expand(4, D), rtol=0, atol=1e-10, msg=name)


def test_anderson_falls_back_to_picard_when_the_small_solve_fails() -> None:
    from lipdeq.solvers.anderson import Anderson

    z = torch.zeros(2, 3, dtype=f64)
    st = Anderson(z, m=3, lam=0.0)
    fz = torch.ones(2, 3, dtype=f64)
    for _ in range(3):  # identical history entries: H is exactly singular with lam = 0
        out = st.step(z, fz, fz - z)
        assert bool(torch.isfinite(out).all())
        torch.testing.assert_close(out, fz)
