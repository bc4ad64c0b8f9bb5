"""``check_every``: fewer host synchronisations per solve, the same result.

The oracle is the solve with ``check_every=1`` (one synchronisation per iteration): with k > 1 every
field of the Solution must be bitwise equal, except ``n_f_evals`` (up to k - 1 more, ending on a
multiple of k or at ``max_iter``) and the traces (the extra rows repeat the last values).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lipdeq import fixed_point
from lipdeq.solvers import SolverWarning, solve

f64 = torch.float64
FIELDS = ("value", "status", "nstep", "abs_residual", "rel_residual", "error_bound")


def _problem(scales, D: int = 6, seed: int = 0, poison: int | None = None, blow_up: int | None = None):
    """Sample b: z -> scales[b] Q_b tanh(z) + c_b; ``poison``: that sample's image turns NaN from the 3rd
    call on (``calls["n"]`` counts them: reset it before each solve); ``blow_up``: that sample's map is
    expansive (Picard runs off)."""
    g = torch.Generator().manual_seed(seed)
    B = len(scales)
    Q = torch.linalg.qr(torch.randn(B, D, D, generator=g, dtype=f64)).Q
    A = torch.tensor(scales, dtype=f64)[:, None, None] * Q
    c = torch.randn(B, D, generator=g, dtype=f64)
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = (A @ torch.tanh(z).unsqueeze(-1)).squeeze(-1) + c
        if blow_up is not None:
            out = out.clone()
            out[blow_up] = 4.0 * z[blow_up] + 1.0
        if poison is not None and calls["n"] >= 3:
            out = out.clone()
            out[poison] = math.nan
        return out

    return f, torch.zeros(B, D, dtype=f64), calls


def _assert_same(ref, sol, k: int) -> None:
    for name in FIELDS:
        a, b = getattr(ref, name), getattr(sol, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    extra = sol.n_f_evals - ref.n_f_evals
    assert 0 <= extra < k
    assert sol.n_f_evals % k == 0 or sol.n_f_evals == sol.max_iter
    if ref.abs_trace is not None:
        n = ref.n_f_evals
        assert torch.equal(sol.abs_trace[:n], ref.abs_trace)
        assert bool((sol.abs_trace[n:] == ref.abs_trace[-1]).all())


@pytest.mark.parametrize("method", ["anderson", "picard", "broyden"])
@pytest.mark.parametrize("stop_mode", ["rel", "abs", "cert"])
def test_sparse_checks_give_the_same_solution(method: str, stop_mode: str) -> None:
    scales = [0.05, 0.3, 0.6, 0.85]  # each sample converges at its own iteration
    f, z0, _ = _problem(scales)
    lip = max(scales) if stop_mode == "cert" else None
    kwargs = dict(tol=1e-9, stop_mode=stop_mode, max_iter=60, lipschitz=lip, return_trace=True)
    ref = solve(f, z0, method, **kwargs)
    assert ref.all_converged and len(set(ref.nstep.tolist())) > 1
    for k in (2, 3, 7):
        _assert_same(ref, solve(f, z0, method, check_every=k, **kwargs), k)


@pytest.mark.parametrize("method", ["anderson", "picard", "broyden"])
def test_sparse_checks_with_non_finite_diverged_and_capped_samples(method: str) -> None:
    f, z0, calls = _problem([0.2, 0.5, 0.97, 0.4], poison=1, blow_up=3)
    kwargs = dict(tol=1e-13, stop_mode="abs", max_iter=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = solve(f, z0, method, **kwargs)
        names = [s.name for s in ref.statuses()]
        assert names[1] == "NON_FINITE" and bool(torch.isfinite(ref.value).all()), names
        if method == "picard":  # it runs off on the expansive sample and is slow on sample 2
            assert names[2] == "MAX_ITER" and names[3] == "DIVERGED", names
        for k in (2, 5):
            calls["n"] = 0
            _assert_same(ref, solve(f, z0, method, check_every=k, **kwargs), k)


def test_coupled_map_is_still_detected() -> None:
    """A map that couples the samples: the frozen-sample check runs on the branch-free path too."""
    f0, z0, _ = _problem([0.1, 0.8])

    def coupled(z):
        out = f0(z)
        return out + 1e-2 * z.flip(0)

    for k in (1, 3):
        with pytest.warns(SolverWarning, match="couples the samples"):
            sol = solve(coupled, z0, "anderson", tol=1e-10, stop_mode="abs", max_iter=80, check_every=k)
        assert sol.error_bound is None or not bool(torch.isfinite(sol.error_bound).any())


def test_fixed_point_gradients_are_unchanged() -> None:
    g = torch.Generator().manual_seed(3)
    W = (0.5 * torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=f64)).Q).requires_grad_()
    x = torch.randn(4, 5, generator=g, dtype=f64, requires_grad=True)
    grads = []
    for k in (1, 4):
        z, sol = fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros(4, 5, dtype=f64), f_tol=1e-10,
                             b_tol=1e-10, f_max_iter=50, b_max_iter=50, stop_mode="abs", check_every=k)
        grads.append(torch.autograd.grad(z.square().sum(), (W, x)))
        assert sol.backward.all_converged if sol.backward is not None else True
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_check_every_must_be_a_positive_int() -> None:
    f, z0, _ = _problem([0.5])
    for bad in (0, -1, 1.5, True):
        with pytest.raises((TypeError, ValueError), match="check_every"):
            solve(f, z0, check_every=bad)
