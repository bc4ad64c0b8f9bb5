"""Differentiable fixed points: a graph-free forward solve plus a selectable backward method."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from lipdeq.gradients.budgeted import budgeted_fixed_point, record_jfb_error
from lipdeq.solvers import Solution, SolverWarning, Status, solve

BACKWARDS = ("ift", "phantom", "jfb")
BUDGETS = ("residual", "certified")


def _status_summary(sol: Solution, statuses: tuple[Status, ...]) -> tuple[int, str]:
    """How many samples ended in one of ``statuses``, and a ``"name: count"`` breakdown."""
    counts = sol.counts()
    parts = [(s.name.lower(), counts[s.name.lower()]) for s in statuses]
    return sum(n for _, n in parts), ", ".join(f"{name}: {n}" for name, n in parts if n)


def _warn_forward(sol: Solution, warn_max_iter: bool) -> None:
    """SolverWarning when the forward solve left diverged / non-finite (optionally max_iter) samples."""
    bad = (Status.NON_FINITE, Status.DIVERGED) + ((Status.MAX_ITER,) if warn_max_iter else ())
    n, detail = _status_summary(sol, bad)
    if n:
        warnings.warn(
            f"fixed_point: the forward solve left {n} of {sol.status.numel()} samples without a fixed point "
            f"({detail}; method={sol.method!r}, f_max_iter={sol.max_iter}, f_tol={sol.tol:g}, "
            f"stop_mode={sol.stop_mode!r}); their outputs are the best finite iterates, not equilibria. "
            "Check the inputs for NaN/Inf, lower the learning rate, or raise f_max_iter (f_thres).",
            SolverWarning,
            stacklevel=3,
        )


def _warn_backward(bsol: Solution) -> None:
    """SolverWarning when the adjoint solve left any sample not converged."""
    n, detail = _status_summary(bsol, (Status.MAX_ITER, Status.DIVERGED, Status.NON_FINITE))
    if n:
        warnings.warn(
            f"fixed_point: the backward (adjoint) solve left {n} of {bsol.status.numel()} samples not "
            f"converged ({detail}; method={bsol.method!r}, b_max_iter={bsol.max_iter}, b_tol={bsol.tol:g}, "
            f"stop_mode={bsol.stop_mode!r}); their gradients are approximate, or non-finite where the "
            "incoming gradient or the Jacobian was. Raise b_max_iter (b_thres) or b_tol, lower the learning "
            "rate, or check the inputs and the loss.",
            SolverWarning,
            stacklevel=2,
        )


def fixed_point(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    solver: str = "anderson",
    backward: str = "ift",
    f_tol: float = 1e-3,
    b_tol: float = 1e-3,
    f_max_iter: int = 30,
    b_max_iter: int = 30,
    stop_mode: str = "rel",
    b_solver: str | None = None,
    lipschitz: float | torch.Tensor | None = None,
    phantom_steps: int = 5,
    phantom_tau: float = 0.5,
    solver_options: dict[str, Any] | None = None,
    b_solver_options: dict[str, Any] | None = None,
    return_trace: bool = False,
    warn_max_iter: bool = False,
    check_every: int = 1,
    budget: str = "residual",
) -> tuple[torch.Tensor, Solution]:
    """Solve ``z* = f(z*)`` and return it with gradients defined by implicit differentiation.

    The forward solve runs without building a graph. ``f`` is then evaluated once more at the
    (detached) solution with gradients enabled, and the gradient is routed by ``backward``:

    - ``"ift"``: implicit function theorem. The incoming gradient ``g`` is replaced by the solution
      ``w`` of the adjoint fixed point ``w = J^T w + g`` (``J = df/dz`` at ``z*``), solved with
      ``b_solver`` (default: ``solver``) through vector-Jacobian products; autograd then carries
      ``w`` into every tensor ``f`` closes over (parameters and inputs). The adjoint solve's
      per-sample statistics appear as ``solution.backward`` once the backward pass has run.
    - ``"phantom"``: ``phantom_steps`` damped unrolled steps ``z <- (1 - tau) z + tau f(z)`` from
      ``z*`` (Geng et al. 2021); approaches the IFT gradient as the number of steps grows.
    - ``"jfb"``: Jacobian-free backprop: the gradient of one application of ``f`` at ``z*``.

    Args:
        f: maps a ``(B, ...)`` tensor to one of the same shape.
        z0: initial state ``(B, ...)``.
        solver, b_solver: forward / backward solver method (see :func:`lipdeq.solvers.solve`).
        f_tol, b_tol, f_max_iter, b_max_iter, stop_mode: forward / backward stop rules
            (MDEQ's f_thres and b_thres are ``f_max_iter`` and ``b_max_iter``).
        lipschitz: a known Lipschitz constant ``L < 1`` of ``f`` in ``z``: enables the
            certified per-sample error bounds of both solves.
        solver_options, b_solver_options: extra method options (e.g. Anderson memory ``m``).
        return_trace: keep residual traces in the returned solutions.
        warn_max_iter: also warn when forward samples stop at ``f_max_iter`` (off by default: that is
            the normal regime of the MDEQ baseline).
        check_every: host synchronisations of both solves every ``check_every`` iterations (see
            :func:`lipdeq.solvers.solve`; the same result, up to ``check_every - 1`` more evaluations).
        budget: ``"residual"`` (stop on residual checks, the MDEQ way) or ``"certified"``: iteration
            counts from ``lipschitz`` known in advance, Picard forward whose last step carries the
            graph, Neumann backward without convergence checks (:mod:`lipdeq.gradients.budgeted`;
            ``f_tol``/``b_tol`` then bound the certified errors). Without a ``lipschitz`` below 1 it
            falls back to ``"residual"`` with a SolverWarning. ``backward="jfb"`` with a
            ``lipschitz`` reports its certified adjoint error ``L/(1-L) ||g||`` as
            ``solution.backward`` under either budget.

    Warns:
        SolverWarning: the forward solve left samples DIVERGED or NON_FINITE (or MAX_ITER with
            ``warn_max_iter=True``), or, during the backward pass, the adjoint solve left any sample
            not CONVERGED. The message counts the samples per status and says what to change.

    Returns:
        ``(z, solution)``: ``z`` is ``f(z*)`` (with the gradient selected by ``backward``) when a
        graph is being recorded, else the solver's value; ``solution`` is the forward
        :class:`~lipdeq.solvers.Solution`.
    """
    if backward not in BACKWARDS:
        raise ValueError(f"unknown backward {backward!r}; expected one of {BACKWARDS}")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; expected one of {BUDGETS}")
    if budget == "certified":
        if backward == "phantom":
            raise ValueError("budget='certified' supports backward 'ift' or 'jfb', not 'phantom'")
        L = None if lipschitz is None else float(torch.as_tensor(lipschitz).max())
        if L is not None and 0.0 <= L < 1.0:
            z, sol = budgeted_fixed_point(f, z0, lipschitz=L, backward=backward, f_tol=f_tol, b_tol=b_tol,
                                          f_max_iter=f_max_iter, b_max_iter=b_max_iter,
                                          stop_mode="rel" if stop_mode == "rel" else "abs")
            _warn_forward(sol, warn_max_iter)
            return z, sol
        warnings.warn(
            f"fixed_point: budget='certified' needs a Lipschitz constant below 1, got {L}; "
            "solving with residual checks instead (budget='residual')",
            SolverWarning,
            stacklevel=2,
        )
        lipschitz = None
    if backward == "phantom" and (phantom_steps < 1 or not 0.0 < phantom_tau <= 1.0):
        raise ValueError(
            f"phantom backward needs phantom_steps >= 1 and 0 < phantom_tau <= 1, "
            f"got {phantom_steps} and {phantom_tau}"
        )
    with torch.no_grad():
        sol = solve(
            f,
            z0.detach(),
            method=solver,
            tol=f_tol,
            stop_mode=stop_mode,
            max_iter=f_max_iter,
            lipschitz=lipschitz,
            return_trace=return_trace,
            check_every=check_every,
            **(solver_options or {}),
        )
    _warn_forward(sol, warn_max_iter)
    z_star = sol.value.detach()
    if not torch.is_grad_enabled():
        return z_star, sol

    if backward == "jfb":
        sol.extra_f_evals = 1
        z = f(z_star)
        if lipschitz is not None and z.requires_grad:
            return record_jfb_error(z, sol, float(torch.as_tensor(lipschitz).max()), b_tol), sol
        return z, sol
    if backward == "phantom":
        sol.extra_f_evals = phantom_steps
        z = z_star
        for _ in range(phantom_steps):
            z = (1.0 - phantom_tau) * z + phantom_tau * f(z)
        return z, sol

    z_in = z_star.requires_grad_()  # z_star is already detached from the solver's value
    z_out = f(z_in)
    sol.extra_f_evals = 1
    if not z_out.requires_grad:  # f closes over nothing that needs a gradient
        return z_out, sol

    def adjoint_hook(grad: torch.Tensor) -> torch.Tensor:
        if grad is None:
            return grad

        def adjoint_map(w: torch.Tensor) -> torch.Tensor:
            (vjp,) = torch.autograd.grad(z_out, z_in, w, retain_graph=True)
            return vjp + grad

        # A non-finite incoming gradient cannot seed the solve (z0 must be finite): start those samples
        # at 0 (their first evaluation is non-finite, so they stop as NON_FINITE) and pass their
        # gradient on unchanged below, so the non-finite value reaches the parameters (and a trainer's
        # non-finite policy) instead of crashing the backward pass or turning into a finite gradient.
        g0 = grad.detach()
        rows_ok = torch.isfinite(g0.reshape(g0.shape[0], -1)).all(dim=1).view(-1, *([1] * (g0.dim() - 1)))
        all_ok = bool(rows_ok.all())
        if not all_ok:
            g0 = torch.where(rows_ok, g0, 0.0)

        bsol = solve(
            adjoint_map,
            g0,
            method=b_solver or solver,
            tol=b_tol,
            stop_mode=stop_mode,
            max_iter=b_max_iter,
            lipschitz=lipschitz,
            return_trace=return_trace,
            check_every=check_every,
            **(b_solver_options if b_solver_options is not None else solver_options or {}),
        )
        sol.backward = bsol
        _warn_backward(bsol)
        return bsol.value if all_ok else torch.where(rows_ok, bsol.value, grad)

    # The hook goes on an alias of z_out, not on z_out itself: the hook's closure refers to z_out (for
    # the vector-Jacobian products), and a hook on z_out would form a reference cycle through the
    # autograd graph that Python's garbage collector cannot see (a leak of one graph per step). The
    # vjps below start at z_out, so they never pass through the alias and its hook.
    z_ret = z_out.view_as(z_out)
    z_ret.register_hook(adjoint_hook)
    return z_ret, sol
