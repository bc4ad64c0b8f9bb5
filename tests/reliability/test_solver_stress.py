"""The solvers and fixed_point under stress: mixed batches (converging, diverging, plateauing and NaN
samples), a singular Anderson system, backward max_iter; per-sample statuses and SolverWarning."""

from __future__ import annotations

import warnings

import pytest
import torch

from lipdeq import fixed_point
from lipdeq.solvers import SolverWarning, Status, solve

F64 = torch.float64
D = 4
METHODS = ("anderson", "picard", "broyden")
C = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=F64)


def _mixed_map(calls: list[int]):
    """Per-sample maps on a batch of 4: 0 contraction (z* = 2c), 1 runaway without fixed point
    (``z + c (1 + ||z||^2)``), 2 plateau without fixed point (``z + c``), 3 NaN from the 3rd call."""

    def f(z: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        out = torch.empty_like(z)
        out[0] = 0.5 * z[0] + C
        out[1] = z[1] + C * (1 + (z[1] ** 2).sum())
        out[2] = z[2] + C
        out[3] = 0.5 * z[3] + C if calls[0] < 3 else torch.full_like(z[3], float("nan"))
        return out

    return f


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_gives_one_status_per_sample(method: str) -> None:
    calls = [0]
    z0 = torch.zeros(4, D, dtype=F64)
    sol = solve(_mixed_map(calls), z0, method=method, tol=1e-10, stop_mode="abs", max_iter=60,
                **({"lam": 0.0} if method == "anderson" else {}))
    s = sol.statuses()
    assert s[0] == Status.CONVERGED
    # Picard and Broyden blow up on the runaway map; Anderson may also keep it bounded (MAX_ITER)
    assert s[1] in ({Status.MAX_ITER, Status.DIVERGED} if method == "anderson" else {Status.DIVERGED})
    # constant residual ||c||: Picard/Anderson plateau; Broyden's near-zero secant jumps to |z| ~ 1e16
    # (a run-off, DIVERGED; it used to read as CONVERGED there, see the test below)
    assert s[2] == (Status.DIVERGED if method == "broyden" else Status.MAX_ITER)
    assert s[3] == Status.NON_FINITE
    torch.testing.assert_close(sol.value[0], 2 * C, rtol=0, atol=1e-9)
    assert bool(torch.isfinite(sol.value).all())
    # the plateau's residual is exactly ||c|| wherever it went; the NaN sample keeps a finite iterate
    torch.testing.assert_close(sol.abs_residual[2], torch.linalg.vector_norm(C), rtol=1e-9, atol=0)
    assert float(sol.abs_residual[3]) < float("inf") and int(sol.nstep[3]) <= 2
    # the contraction sample's answer does not depend on its neighbours
    alone = solve(lambda z: 0.5 * z + C, z0[:1], method=method, tol=1e-10, stop_mode="abs", max_iter=60)
    torch.testing.assert_close(sol.value[0], alone.value[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method", METHODS)
def test_translation_has_no_fixed_point_and_never_converges(method: str, dtype: torch.dtype) -> None:
    """``f(z) = z + c``: no fixed point, residual ``||c||`` everywhere. Regression: Broyden used to jump
    to ``|z| ~ 1e16`` (float64) / ``1e7`` (float32) within 5 evaluations, where ``fl(z + c) == z``, and
    report CONVERGED; the run-off rule of ``divergence_factor`` now stops it as DIVERGED."""
    c = C.to(dtype)
    sol = solve(lambda z: z + c, torch.zeros(2, D, dtype=dtype), method=method, tol=1e-3, stop_mode="abs",
                max_iter=60)
    assert Status.CONVERGED not in sol.statuses()
    assert bool((sol.abs_residual >= 0.99 * torch.linalg.vector_norm(c)).all())
    # with the rule switched off (divergence_factor=inf) the artefact is visible for Broyden
    off = solve(lambda z: z + c, torch.zeros(2, D, dtype=dtype), method=method, tol=1e-3, stop_mode="abs",
                max_iter=60, divergence_factor=float("inf"))
    if method == "broyden":
        assert off.statuses() == [Status.CONVERGED] * 2 and float(off.value.abs().max()) > 1e6


def test_singular_anderson_system_without_regularisation() -> None:
    """``f(z) = z + c``: every stored residual is ``c``, so ``G G^T`` has rank 1 and, with ``lam=0``,
    the mixing system is singular. No crash, no NaN: the sample falls back to a Picard step."""
    z0 = torch.zeros(3, D, dtype=F64)
    sol = solve(lambda z: z + C, z0, method="anderson", tol=1e-8, stop_mode="abs", max_iter=12, lam=0.0, m=4)
    assert sol.statuses() == [Status.MAX_ITER] * 3
    assert bool(torch.isfinite(sol.value).all())
    torch.testing.assert_close(sol.abs_residual, torch.linalg.vector_norm(C).expand(3), rtol=1e-12, atol=0)


def _tanh_problem(batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=gen, dtype=F64)
    W = (W * (0.9 / torch.linalg.matrix_norm(W, ord=2))).requires_grad_()
    x = torch.randn(batch, D, generator=gen, dtype=F64)
    return W, x


def test_forward_non_finite_and_diverged_samples_warn_with_counts() -> None:
    W, x = _tanh_problem()

    def f(z: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(z @ W.T + x)
        nan_row = torch.full_like(out[:1], float("nan"))
        runaway = z[1:2] + 1.0 + (z[1:2] ** 2).sum()
        return torch.cat([nan_row, runaway, out[2:]])

    with pytest.warns(SolverWarning, match=r"forward solve left 2 of 4 samples .*non_finite: 1, diverged: 1") as rec:
        z, sol = fixed_point(f, torch.zeros(4, D, dtype=F64), solver="picard", f_max_iter=400, f_tol=1e-8,
                             stop_mode="abs")
    message = str(rec[0].message)
    assert "check the inputs for nan/inf" in message.lower() and "f_max_iter" in message
    assert sol.statuses()[:2] == [Status.NON_FINITE, Status.DIVERGED]
    assert sol.statuses()[2:] == [Status.CONVERGED] * 2
    assert rec[0].filename == __file__  # points at the caller's line


def test_forward_max_iter_warns_only_on_request() -> None:
    W, x = _tanh_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        with torch.no_grad():
            _, sol = fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros(4, D, dtype=F64), f_max_iter=2,
                                 f_tol=1e-12, stop_mode="abs")
    assert sol.statuses() == [Status.MAX_ITER] * 4
    with pytest.warns(SolverWarning, match=r"4 of 4 samples .*max_iter: 4.*raise f_max_iter"), torch.no_grad():
        fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros(4, D, dtype=F64), f_max_iter=2, f_tol=1e-12,
                    stop_mode="abs", warn_max_iter=True)


def test_converged_solves_do_not_warn() -> None:
    W, x = _tanh_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        z, sol = fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros(4, D, dtype=F64), f_tol=1e-10,
                             b_tol=1e-10, f_max_iter=200, b_max_iter=200, stop_mode="abs")
        z.sum().backward()
    assert sol.all_converged and sol.backward.all_converged


@pytest.mark.parametrize("solver", METHODS)
def test_backward_max_iter_gives_per_sample_status_and_a_warning(solver: str) -> None:
    W, x = _tanh_problem()
    z, sol = fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros(4, D, dtype=F64), solver=solver,
                         f_tol=1e-10, f_max_iter=200, b_tol=1e-14, b_max_iter=2, stop_mode="abs")
    with pytest.warns(SolverWarning, match=r"backward \(adjoint\) solve left 4 of 4 samples .*max_iter: 4.*b_max_iter"):
        z.sum().backward()
    assert sol.backward.statuses() == [Status.MAX_ITER] * 4
    assert bool(torch.isfinite(W.grad).all())


def test_nan_sample_poisons_parameter_gradient_loudly() -> None:
    """A sample whose f is NaN at the equilibrium makes the parameter gradient NaN even when the loss
    ignores that sample (autograd multiplies its zero adjoint by a NaN local derivative): the failure
    is loud (and the trainer then skips the step), never a silently wrong finite gradient. The
    other samples' forward values are unaffected."""
    W, x = _tanh_problem()

    def f(z: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(z @ W.T + x)
        return torch.cat([out[:1] * float("nan"), out[1:]])

    with pytest.warns(SolverWarning) as rec:
        z, sol = fixed_point(f, torch.zeros(4, D, dtype=F64), f_tol=1e-10, b_tol=1e-10, f_max_iter=200,
                             b_max_iter=200, stop_mode="abs")
        (grad,) = torch.autograd.grad(z[1:].sum(), W)
    assert sol.statuses() == [Status.NON_FINITE] + [Status.CONVERGED] * 3
    assert sol.backward.statuses()[0] == Status.NON_FINITE
    assert any("backward" in str(r.message) for r in rec) and any("forward" in str(r.message) for r in rec)
    assert not bool(torch.isfinite(grad).all())
    with torch.no_grad():
        clean, _ = fixed_point(lambda z: torch.tanh(z @ W.T + x[1:]), torch.zeros(3, D, dtype=F64), f_tol=1e-10,
                               f_max_iter=200, stop_mode="abs")
    torch.testing.assert_close(z[1:].detach(), clean, rtol=0, atol=1e-9)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_incoming_gradient_is_passed_on_not_a_crash(bad: float) -> None:
    """Regression: an Inf/NaN gradient arriving at the equilibrium used to crash the backward pass
    ("z0 contains NaN or Inf" from the adjoint solve). Now that sample is NON_FINITE in
    ``solution.backward``, its input gradient is non-finite (so a trainer's policy sees it), a
    SolverWarning is emitted, and every other sample gets exactly its clean gradient."""
    W, x = _tanh_problem()
    x = x.clone().requires_grad_()
    kw = {"f_tol": 1e-12, "b_tol": 1e-12, "f_max_iter": 300, "b_max_iter": 300, "stop_mode": "abs"}
    z, sol = fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros(4, D, dtype=F64), **kw)
    upstream = torch.ones(4, D, dtype=F64)
    upstream[2, 1] = bad
    with pytest.warns(SolverWarning, match=r"backward \(adjoint\) solve left 1 of 4 .*non_finite: 1"):
        (gx,) = torch.autograd.grad(z, x, upstream)
    assert sol.backward.statuses() == [Status.CONVERGED, Status.CONVERGED, Status.NON_FINITE, Status.CONVERGED]
    assert not bool(torch.isfinite(gx[2]).all())
    keep = [0, 1, 3]
    x2 = x.detach()[keep].clone().requires_grad_()
    z2, _ = fixed_point(lambda z: torch.tanh(z @ W.T + x2), torch.zeros(3, D, dtype=F64), **kw)
    (gx2,) = torch.autograd.grad(z2, x2, torch.ones(3, D, dtype=F64))
    torch.testing.assert_close(gx[keep], gx2, rtol=1e-10, atol=1e-12)
