"""Input validation, grad-mode neutrality, adjoint use inside autograd, devices, and TorchDEQ as oracle."""

from __future__ import annotations

import pytest
import torch

import lipdeq
from lipdeq.solvers import Solution, Status, solve

f64 = torch.float64


def half(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z + 1


Z0 = torch.zeros(2, 3)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"method": "newton"}, ValueError, "anderson, picard, broyden"),
        ({"stop_mode": "max"}, ValueError, "stop_mode"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"tol": -1e-3}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"max_iter": 2.5}, TypeError, "max_iter"),
        ({"lipschitz": 1.0}, ValueError, "lipschitz"),
        ({"lipschitz": -0.1}, ValueError, "lipschitz"),
        ({"lipschitz": 1.5}, ValueError, "lipschitz"),
        ({"lipschitz": torch.tensor([0.5, 1.0])}, ValueError, "lipschitz"),
        ({"lipschitz": torch.tensor([0.5, 0.5, 0.5])}, ValueError, r"\(2,\)"),
        ({"stop_mode": "cert"}, ValueError, "lipschitz"),
        ({"divergence_factor": 1.0}, ValueError, "divergence_factor"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"foo": 1}, TypeError, "'foo'"),
        ({"method": "picard", "m": 3}, TypeError, "'m'"),
        ({"method": "anderson", "tau": 0.5}, TypeError, "'tau'"),
        ({"method": "anderson", "m": 0}, ValueError, "m"),
        ({"method": "anderson", "lam": -1.0}, ValueError, "lam"),
        ({"method": "anderson", "beta": 0.0}, ValueError, "beta"),
        ({"method": "picard", "tau": -0.5}, ValueError, "tau"),
        ({"method": "broyden", "m": 1.5}, TypeError, "m"),
    ],
)
def test_bad_settings_raise(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        solve(half, Z0, **kwargs)


def test_bad_z0_and_f_raise() -> None:
    with pytest.raises(TypeError, match="z0"):
        solve(half, [[0.0, 1.0]])
    with pytest.raises(ValueError, match="batch"):
        solve(half, torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty batch"):
        solve(half, torch.zeros(0, 3))
    with pytest.raises(TypeError, match="floating"):
        solve(half, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or Inf"):
        solve(half, torch.tensor([[0.0, float("nan")]]))
    for bad in (float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="NaN or Inf"):
            solve(half, torch.tensor([[1.0, 2.0], [0.0, bad]]))
    # finite entries whose squares overflow float32 make the norm inf: still a finite z0
    huge = torch.tensor([[3e38, -3e38], [1.0, 2.0]])
    assert torch.isinf(torch.linalg.vector_norm(huge, dim=1)[0])
    sol = solve(half, huge, max_iter=1)  # no error; the huge sample stops on its overflowing norm
    assert torch.equal(sol.value[1], half(huge)[1]) and sol.status[0] == Status.DIVERGED
    with pytest.raises(TypeError, match="callable"):
        solve(3, Z0)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        solve(lambda z: torch.zeros(2, 4), Z0)
    with pytest.raises(TypeError, match="Tensor"):
        solve(lambda z: z.tolist(), Z0)
    with pytest.raises(TypeError, match="dtype"):
        solve(lambda z: z.double(), Z0)


def test_public_names() -> None:
    assert lipdeq.solvers.solve is solve and lipdeq.solve is solve
    assert lipdeq.Solution is Solution and lipdeq.Status is Status
    sol = solve(half, Z0.clone(), tol=1e-6)
    assert isinstance(sol, Solution) and sol.method == "anderson" and sol.stop_mode == "rel"
    assert sol.tol == 1e-6 and sol.max_iter == 50 and sol.error_bound is None and sol.abs_trace is None
    assert sol.status.dtype == torch.int8 and sol.counts()["converged"] == 2


def test_batch_of_scalars_and_z0_untouched() -> None:
    # a batch of scalars is (B, 1); a 1-D z0 is refused (tests/reliability/test_hostile_user.py)
    z0 = torch.tensor([[0.0], [10.0]], dtype=f64)
    before = z0.clone()
    sol = solve(half, z0, tol=1e-10, stop_mode="abs")
    assert torch.equal(z0, before) and sol.value.shape == (2, 1)
    torch.testing.assert_close(sol.value, torch.full((2, 1), 2.0, dtype=f64))


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_grad_mode_is_left_alone_and_value_is_detached(grad_enabled: bool) -> None:
    W = torch.randn(3, 3, dtype=f64, requires_grad=True)
    z0 = torch.zeros(2, 3, dtype=f64, requires_grad=True) * 1.0  # a non-leaf input

    def f(z: torch.Tensor) -> torch.Tensor:
        assert torch.is_grad_enabled() == grad_enabled
        return torch.tanh(z @ (0.3 * W / W.detach().norm()).T + 1)

    with torch.set_grad_enabled(grad_enabled):
        sol = solve(f, z0, tol=1e-8)
        assert torch.is_grad_enabled() == grad_enabled
    assert sol.all_converged and not sol.value.requires_grad


def test_adjoint_solve_with_autograd_inside_f() -> None:
    """The implicit-differentiation use: solve w = J^T w + g where J^T w comes from torch.autograd.grad."""
    g = torch.Generator().manual_seed(0)
    D = 5
    W = torch.randn(D, D, generator=g, dtype=f64)
    W = 0.7 * W / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(3, D, generator=g, dtype=f64)
    z_star = solve(lambda z: torch.tanh(z @ W.T + x), torch.zeros(3, D, dtype=f64), tol=1e-13,
                   stop_mode="abs", max_iter=200).value
    z = z_star.clone().requires_grad_()
    fz = torch.tanh(z @ W.T + x)
    rhs = torch.randn(3, D, generator=g, dtype=f64)

    def adjoint(w: torch.Tensor) -> torch.Tensor:
        (vjp,) = torch.autograd.grad(fz, z, w, retain_graph=True)
        return vjp + rhs

    with torch.no_grad():
        sol = solve(adjoint, torch.zeros(3, D, dtype=f64), tol=1e-12, stop_mode="abs", max_iter=200)
    J = (1 - fz.detach() ** 2)[:, :, None] * W  # (B, D, D)
    ref = torch.linalg.solve(torch.eye(D, dtype=f64) - J.transpose(1, 2), rhs.unsqueeze(-1)).squeeze(-1)
    assert sol.all_converged
    torch.testing.assert_close(sol.value, ref, rtol=0, atol=1e-10)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_devices_and_dtypes(device: str, dtype: torch.dtype, method: str) -> None:
    g = torch.Generator().manual_seed(0)
    W = (0.6 * torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=f64)).Q).to(device, dtype)
    x = torch.randn(4, 6, generator=g, dtype=f64).to(device, dtype)
    z0 = torch.zeros(4, 6, device=device, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    sol = solve(lambda z: torch.tanh(z @ W.T + x), z0, method, tol=tol, lipschitz=torch.full((4,), 0.6),
                return_trace=True)
    for t in (sol.value, sol.status, sol.nstep, sol.abs_residual, sol.error_bound, sol.abs_trace):
        assert t.device.type == device
    assert sol.value.dtype == dtype and sol.error_bound.dtype == dtype
    assert sol.all_converged


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_f_that_writes_every_result_into_one_buffer_is_refused(method: str) -> None:
    """The methods keep earlier images by reference, and Picard's next input is the last image: an f that
    returns the same buffer every call overwrites them (without the check, Picard "converged" after two
    evaluations to a point that is not the fixed point). A clear error instead; the same f with a copy solves."""
    g = torch.Generator().manual_seed(5)
    W = 0.7 * torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=f64)).Q
    x = torch.randn(4, 8, generator=g, dtype=f64)
    buf = torch.empty(4, 8, dtype=f64)

    def fresh(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + x)

    z0 = torch.zeros(4, 8, dtype=f64)
    with pytest.raises(ValueError, match="changed its previous result in place"):
        solve(lambda z: buf.copy_(fresh(z)), z0, method, tol=1e-10, max_iter=60)
    ref = solve(fresh, z0, method, tol=1e-10, max_iter=60)
    sol = solve(lambda z: buf.copy_(fresh(z)).clone(), z0, method, tol=1e-10, max_iter=60)
    assert ref.all_converged and sol.n_f_evals == ref.n_f_evals
    torch.testing.assert_close(sol.value, ref.value, rtol=0, atol=0)
    if method == "picard":  # its next input is its last result: an f that changes its input changes that
        with pytest.raises(ValueError, match="changed its previous result in place"):
            solve(lambda z: fresh(z.mul_(1.0)), z0, method, tol=1e-10, max_iter=60)
    # a constant map may return one tensor every time (not written to): accepted
    c = fresh(z0)
    assert solve(lambda z: c, z0, method, tol=1e-10, max_iter=5).all_converged


def test_same_fixed_point_as_torchdeq_anderson() -> None:
    solver_mod = pytest.importorskip("torchdeq.solver")
    g = torch.Generator().manual_seed(3)
    D = 20
    W = torch.randn(D, D, generator=g, dtype=f64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(4, D, generator=g, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + x)

    z0 = torch.zeros(4, D, dtype=f64)
    theirs, _, info = solver_mod.get_solver("anderson")(f, z0, max_iter=200, tol=1e-11, stop_mode="abs")
    assert float(info["abs_lowest"].max()) < 1e-11
    ours = solve(f, z0, "anderson", tol=1e-11, stop_mode="abs", max_iter=200)
    assert ours.all_converged
    # both return f(z) with ||f(z) - z|| < tol, hence each is within 0.9/0.1 * tol of z*
    torch.testing.assert_close(ours.value, theirs, rtol=0, atol=2 * 9 * 1e-11)
