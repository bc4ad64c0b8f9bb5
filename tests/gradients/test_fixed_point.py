"""fixed_point: IFT gradients against closed forms, gradcheck, phantom convergence, eval mode."""

from __future__ import annotations

import pytest
import torch

from lipdeq import fixed_point
from lipdeq.solvers import Status

D, B = 6, 4


def _contraction(d: int, norm: float, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a * (norm / torch.linalg.matrix_norm(a, ord=2))


def _linear_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    A = _contraction(D, 0.7, gen).requires_grad_()
    U = torch.randn(D, 3, generator=gen, dtype=torch.float64).requires_grad_()
    x = torch.randn(B, 3, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(B, D, generator=gen, dtype=torch.float64)
    return A, U, x, w


def _closed_form_grads(A, U, x, w):
    eye = torch.eye(D, dtype=torch.float64)
    z = torch.linalg.solve(eye - A, (x @ U.T).T).T  # z* = (I - A)^-1 U x, per sample
    return torch.autograd.grad((w * z).sum(), (A, U, x))


@pytest.mark.parametrize("solver", ["anderson", "picard", "broyden"])
def test_ift_gradients_match_closed_form(solver):
    A, U, x, w = _linear_problem()
    expected = _closed_form_grads(A, U, x, w)

    def f(z):
        return z @ A.T + x @ U.T

    z, sol = fixed_point(f, torch.zeros(B, D, dtype=torch.float64), solver=solver, backward="ift",
                         f_tol=1e-13, b_tol=1e-13, f_max_iter=300, b_max_iter=300, stop_mode="abs")
    got = torch.autograd.grad((w * z).sum(), (A, U, x))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    assert sol.all_converged
    assert sol.backward is not None and sol.backward.all_converged
    assert sol.backward.nstep.shape == (B,)


def test_ift_forward_value_is_the_fixed_point():
    A, U, x, _ = _linear_problem(1)
    z, _ = fixed_point(lambda z: z @ A.T + x @ U.T, torch.zeros(B, D, dtype=torch.float64),
                       f_tol=1e-13, f_max_iter=300, stop_mode="abs")
    exact = torch.linalg.solve(torch.eye(D, dtype=torch.float64) - A, (x @ U.T).T).T
    torch.testing.assert_close(z.detach(), exact.detach(), rtol=0, atol=1e-11)


def test_gradcheck_nonlinear():
    gen = torch.Generator().manual_seed(3)
    W = _contraction(D, 0.5, gen)
    U = torch.randn(D, D, generator=gen, dtype=torch.float64)

    def solve_for(x, W):
        z, _ = fixed_point(lambda z: torch.tanh(z @ W.T + x @ U.T), torch.zeros(2, D, dtype=torch.float64),
                           f_tol=1e-14, b_tol=1e-14, f_max_iter=400, b_max_iter=400, stop_mode="abs")
        return z

    x = torch.randn(2, D, generator=gen, dtype=torch.float64, requires_grad=True)
    W = W.clone().requires_grad_()
    assert torch.autograd.gradcheck(solve_for, (x, W), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_phantom_approaches_ift_as_steps_grow():
    A, U, x, w = _linear_problem(2)
    expected = _closed_form_grads(A, U, x, w)[0]
    errors = []
    for k in (1, 5, 20, 80):
        z, _ = fixed_point(lambda z: z @ A.T + x @ U.T, torch.zeros(B, D, dtype=torch.float64),
                           backward="phantom", phantom_steps=k, phantom_tau=1.0, f_tol=1e-13,
                           f_max_iter=300, stop_mode="abs")
        (g,) = torch.autograd.grad((w * z).sum(), (A,))
        errors.append(float((g - expected).norm()))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-8 * max(1.0, float(expected.norm()))
    assert errors[0] > 1e-3


def test_jfb_is_gradient_of_one_step():
    A, U, x, w = _linear_problem(4)
    z, sol = fixed_point(lambda z: z @ A.T + x @ U.T, torch.zeros(B, D, dtype=torch.float64),
                         backward="jfb", f_tol=1e-13, f_max_iter=300, stop_mode="abs")
    (g,) = torch.autograd.grad((w * z).sum(), (x,))
    torch.testing.assert_close(g, w @ U, rtol=1e-12, atol=1e-12)  # d/dx of w . (A z* + U x), z* fixed


def test_gradients_reach_inputs_in_eval_mode_module():
    torch.manual_seed(0)
    lin = torch.nn.Linear(D, D).double().eval()
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, ord=2))
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    z, _ = fixed_point(lambda z: torch.tanh(lin(z) + x), torch.zeros(B, D, dtype=torch.float64))
    z.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert lin.weight.grad is not None


def test_no_graph_under_no_grad():
    A, U, x, _ = _linear_problem()
    with torch.no_grad():
        z, sol = fixed_point(lambda z: z @ A.T + x @ U.T, torch.zeros(B, D, dtype=torch.float64))
    assert not z.requires_grad
    assert sol.statuses() == [Status.CONVERGED] * B


def test_backward_max_iter_is_reported():
    A, U, x, w = _linear_problem()
    with torch.no_grad():
        A.mul_(0.99 / 0.7)
    z, sol = fixed_point(lambda z: z @ A.T + x @ U.T, torch.zeros(B, D, dtype=torch.float64),
                         solver="picard", f_tol=1e-10, f_max_iter=5000, b_tol=1e-12, b_max_iter=3, stop_mode="abs")
    (w * z).sum().backward()
    assert (sol.backward.status == int(Status.MAX_ITER)).all()


def test_bad_backward_name():
    with pytest.raises(ValueError, match="unknown backward 'adjoint'"):
        fixed_point(lambda z: 0.5 * z, torch.zeros(1, 2), backward="adjoint")


def test_ift_graph_is_freed_after_backward():
    # A hook that refers to the tensor it is registered on would keep the whole graph alive (a cycle
    # through autograd that Python's garbage collector cannot see): here x is saved for backward by
    # the product, so it must be collectable once the outputs are gone.
    import gc
    import weakref

    def solve_and_backward() -> weakref.ref:
        x = torch.rand(B, D, dtype=torch.float64, requires_grad=True)
        z, sol = fixed_point(lambda z: torch.tanh(0.5 * z * x + x), torch.zeros(B, D, dtype=torch.float64))
        z.sum().backward()
        assert sol.backward is not None
        return weakref.ref(x)

    ref = solve_and_backward()
    gc.collect()
    assert ref() is None
