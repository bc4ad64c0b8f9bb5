"""Solver budgets from a certified Lipschitz constant: a-priori iteration counts, no residual checks.

With ``L = Lip(f) < 1`` certified, Picard's error after k evaluations from ``z0`` is at most
``L^k / (1 - L) ||f(z0) - z0||``, and the adjoint ``w = J^T w + g`` is the Neumann series
``w = sum_i (J^T)^i g`` (``||J|| <= L``), whose truncation after k vector-Jacobian products has error
at most ``L^(k+1) / (1 - L) ||g||`` (docs/MATH.md section 11). So both passes take the number of
steps the tolerance asks for, known before they start:

* the forward runs ``K - 1`` graph-free Picard steps and makes its K-th, last, evaluation the one
  that carries the graph (no separate re-evaluation at ``z*``); with a relative tolerance and
  ``z0 = 0``, ``K`` is the smallest k with ``L^k <= f_tol (1 - L) / (1 + L)``, since
  ``||z*|| >= ||f(0)|| / (1 + L)``;
* the backward (``"ift"``) sums the first ``k + 1`` Neumann terms, ``k`` the smallest with
  ``L^(k+1) <= b_tol (1 - L) / (1 + L)`` (``||w|| >= ||g|| / (1 + L)``), without a convergence check;
* ``"jfb"`` takes ``w = g`` (zero terms) and reports its certified error ``L / (1 - L) ||g||``.

Every pass reports per-sample status, iterations and the certified bound, the smaller of the
a-priori one above and the a-posteriori ``L / (1 - L) ||last step||`` (both bound the error of the
returned value; they use the same ``L``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lipdeq.solvers import Solution, Status

__all__ = ["apriori_steps", "budget_counts", "budgeted_fixed_point", "record_jfb_error"]

_CONVERGED, _MAX_ITER, _NON_FINITE = int(Status.CONVERGED), int(Status.MAX_ITER), int(Status.NON_FINITE)


def apriori_steps(L: float, ratio: float) -> int:
    """The smallest ``k >= 0`` with ``L**k <= ratio`` (``L`` in [0, 1), ``ratio`` > 0); 0 when ratio >= 1."""
    if ratio >= 1.0:
        return 0
    if L <= 0.0:
        return 1
    k = max(0, math.ceil(math.log(ratio) / math.log(L)))
    while k > 0 and L ** (k - 1) <= ratio:  # the logarithms' rounding, both ways
        k -= 1
    while L**k > ratio:
        k += 1
    return k


def _relative_forward_evals(L: float, f_tol: float) -> int:
    """Evaluations K of a relative-tolerance forward from ``z0 = 0`` (before the ``max_iter`` cap)."""
    return max(apriori_steps(L, f_tol * (1.0 - L) / (1.0 + L)), 1)


def _relative_adjoint_terms(L: float, b_tol: float) -> int:
    """Neumann terms k of a relative-tolerance adjoint (before the ``b_max_iter`` cap)."""
    return max(apriori_steps(L, b_tol * (1.0 - L) / (1.0 + L)) - 1, 0)


def budget_counts(L: float, f_tol: float, b_tol: float) -> tuple[int, int]:
    """``(forward evaluations, adjoint terms)`` of a certified budget with relative tolerances from
    ``z0 = 0`` (the model's case), as :func:`budgeted_fixed_point` sets them (before its iteration
    caps); ``(inf, inf)`` for ``L`` outside [0, 1). Monotone in ``L``."""
    if not 0.0 <= L < 1.0:
        return (math.inf, math.inf)  # type: ignore[return-value]
    return _relative_forward_evals(L, f_tol), _relative_adjoint_terms(L, b_tol)


def _norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))


def _solution(value, status, nstep, abs_r, fz_norm, bound, n_evals, stop_mode, tol, max_iter) -> Solution:
    return Solution(
        value=value, status=status, nstep=nstep, abs_residual=abs_r, rel_residual=abs_r / (fz_norm + 1e-5),
        error_bound=bound, n_f_evals=n_evals, method="picard (certified budget)", stop_mode=stop_mode,
        tol=float(tol), max_iter=max_iter,
    )


def _forward_count(L: float, f_tol: float, stop_mode: str, max_iter: int, first: torch.Tensor | None) -> int:
    """Total evaluations K of the forward; ``first``: per-sample ``||f(z0) - z0|| / target`` (abs mode)."""
    if first is None:  # relative tolerance from z0 = 0: independent of the data
        k = _relative_forward_evals(L, f_tol)
    else:  # L^K / (1 - L) d_b <= target_b for every sample
        worst = float(first.max())
        k = 1 if worst == 0.0 else (max_iter if not math.isfinite(worst) else apriori_steps(L, (1.0 - L) / worst))
    return min(max(k, 1), max_iter)


def budgeted_fixed_point(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    lipschitz: float,
    backward: str = "ift",
    f_tol: float = 1e-3,
    b_tol: float = 1e-3,
    f_max_iter: int = 30,
    b_max_iter: int = 30,
    stop_mode: str = "rel",
) -> tuple[torch.Tensor, Solution]:
    """:func:`lipdeq.fixed_point` with budgets from ``lipschitz`` (see the module docstring).

    ``f_tol`` / ``b_tol`` bound the certified error of the returned fixed point / adjoint, relative to
    the solution's norm (``stop_mode="rel"``) or absolute (``"abs"``). ``backward`` is ``"ift"``
    (Neumann terms) or ``"jfb"``. A sample whose evaluation is non-finite stops as NON_FINITE with its
    last finite iterate; one whose count is cut by ``f_max_iter`` / ``b_max_iter`` reports MAX_ITER.
    The forward :class:`Solution` counts every evaluation of ``f`` in ``n_f_evals`` (its last one
    carries the graph); its ``backward`` (filled in by the backward pass) counts the
    vector-Jacobian products.
    """
    L = float(lipschitz)
    if not 0.0 <= L < 1.0:
        raise ValueError(f"a certified budget needs a Lipschitz constant in [0, 1), got {L}")
    if backward not in ("ift", "jfb"):
        raise ValueError(f"a certified budget supports backward 'ift' or 'jfb', got {backward!r}")
    scale = L / (1.0 - L)
    z0 = z0.detach()
    relative_from_zero = stop_mode == "rel" and not bool(z0.any())
    grad = torch.is_grad_enabled()
    with torch.no_grad():
        fz = f(z0)
        d = _norms(fz - z0)  # ||z1 - z0||
        n1 = _norms(fz)
        if stop_mode == "rel":
            # ||z*|| >= max(||z1|| - L/(1-L) d, (||z1|| - L ||z0||) / (1 + L))
            lower = torch.maximum(n1 - scale * d, (n1 - L * _norms(z0)) / (1.0 + L)).clamp_min(0.0)
            target = f_tol * lower
        else:
            target = torch.full_like(d, f_tol)
        first = None if relative_from_zero else torch.where(target > 0, d / target, torch.where(d > 0, math.inf, 0.0))
        K = _forward_count(L, f_tol, stop_mode, f_max_iter, first)
        finite = torch.isfinite(d + n1)
        n_f, n_it = 1, 1  # evaluations made; index k of the iterate z_k = f(z_(k-1)) held in fz
        z_prev, z = z0, torch.where(_rows(finite, z0), fz, z0)
        while n_it < K - 1:
            # a-posteriori early stop: the next (graph) evaluation has error <= L * L/(1-L) ||z - z_prev||
            if n_it > 1 and bool((L * scale * _norms(z - z_prev) <= target).all()):
                break
            fz = f(z)
            n_f, n_it = n_f + 1, n_it + 1
            ok = torch.isfinite(_norms(fz))
            finite = finite & ok
            z_prev, z = z, torch.where(_rows(ok, z), fz, z)
    if K == 1 and not grad:
        z_in, z_out = z0, fz
    else:  # the last evaluation, with the graph when one is recorded (K = 1: f(z0) once more)
        z_in = (z0 if K == 1 else z).detach()
        if grad:
            z_in = z_in.requires_grad_()
        z_out = f(z_in)
        n_f += 1
        n_it = 1 if K == 1 else n_it + 1
    with torch.no_grad():
        res = _norms(z_out.detach() - z_in.detach())
        out_norm = _norms(z_out.detach())
        ok = torch.isfinite(res + out_norm) & finite
        # a-priori: ||z_k - z*|| <= L^(k-1) * L/(1-L) ||z1 - z0||; a-posteriori: L/(1-L) ||z_k - z_(k-1)||
        bound = torch.minimum(L ** (n_it - 1) * scale * d, scale * res)
        bound = torch.where(ok, bound, math.inf)
        status = torch.full(res.shape, _MAX_ITER, dtype=torch.int8, device=res.device)
        status = status.masked_fill(ok & (bound <= target), _CONVERGED).masked_fill(~ok, _NON_FINITE)
        nstep = torch.full(res.shape, n_it, dtype=torch.long, device=res.device)
    z_ret = z_out if bool(ok.all()) else torch.where(_rows(ok, z_out), z_out, z_in)
    sol = _solution(z_ret.detach(), status, nstep, torch.where(ok, res, math.inf), out_norm, bound, n_f,
                    stop_mode, f_tol, f_max_iter)
    if not z_out.requires_grad:
        return z_ret, sol
    if backward == "jfb":
        return record_jfb_error(z_ret, sol, L, b_tol), sol

    if stop_mode == "rel":
        k_terms = min(_relative_adjoint_terms(L, b_tol), b_max_iter)
    else:
        k_terms = None  # from ||g|| in the hook

    def adjoint_hook(grad: torch.Tensor) -> torch.Tensor:
        g = grad.detach()
        g_norm = _norms(g)
        rows_ok = torch.isfinite(g_norm)
        all_ok = bool(rows_ok.all())
        g0 = g if all_ok else torch.where(_rows(rows_ok, g), g, 0.0)
        if k_terms is None:
            worst = float(torch.where(rows_ok, g_norm, 0.0).max())
            k = 0 if worst == 0.0 else apriori_steps(L, b_tol * (1.0 - L) / worst) - 1
            k = min(max(k, 0), b_max_iter)
        else:
            k = k_terms
        w, step = g0, g0
        for _ in range(k):
            (step,) = torch.autograd.grad(z_out, z_in, step, retain_graph=True)  # (J^T)^i g
            w = w + step
        with torch.no_grad():
            last = _norms(step)  # ||w_k - w_(k-1)||: the residual of w_(k-1) (||g|| for k = 0)
            b = torch.minimum(L ** (k + 1) / (1.0 - L) * g_norm, scale * last)
            target_b = b_tol * g_norm / (1.0 + L) if stop_mode == "rel" else torch.full_like(g_norm, b_tol)
            ok_b = rows_ok & torch.isfinite(b)
            st = torch.full(b.shape, _MAX_ITER, dtype=torch.int8, device=b.device)
            st = st.masked_fill(ok_b & (b <= target_b), _CONVERGED).masked_fill(~ok_b, _NON_FINITE)
            sol.backward = _solution(w.detach(), st, torch.full_like(nstep, k), last, _norms(w), torch.where(
                ok_b, b, math.inf), k, stop_mode, b_tol, b_max_iter)
        return w if all_ok else torch.where(_rows(rows_ok, g), w, grad)

    # The hook goes on an alias of z_out (see lipdeq.gradients.fixed_point: a hook on z_out itself
    # would form a reference cycle through the graph that the garbage collector cannot see).
    z_alias = z_ret.view_as(z_ret)
    z_alias.register_hook(adjoint_hook)
    return z_alias, sol


def record_jfb_error(z: torch.Tensor, sol: Solution, lipschitz: float, tol: float = math.inf) -> torch.Tensor:
    """Return an alias of ``z`` whose backward records, as ``sol.backward``, the certified error of the
    Jacobian-free gradient: it uses ``w = g`` for the adjoint ``w = J^T w + g``, so
    ``||w_true - g|| <= L / (1 - L) ||g||`` per sample (relative to ``||g||``: ``L / (1 - L)``).
    A sample is CONVERGED when that bound is at most ``tol ||g|| / (1 + L)`` (``<= tol ||w_true||``),
    MAX_ITER otherwise."""
    L = float(lipschitz)

    def hook(grad: torch.Tensor) -> None:
        with torch.no_grad():
            g_norm = _norms(grad)
            ok = torch.isfinite(g_norm)
            bound = torch.where(ok, L / (1.0 - L) * g_norm, math.inf)
            status = torch.full(g_norm.shape, _MAX_ITER, dtype=torch.int8, device=g_norm.device)
            status = status.masked_fill(ok & (bound <= tol * g_norm / (1.0 + L)), _CONVERGED)
            status = status.masked_fill(~ok, _NON_FINITE)
            zeros = torch.zeros(g_norm.shape, dtype=torch.long, device=g_norm.device)
            sol.backward = _solution(grad.detach(), status, zeros, g_norm, g_norm, bound, 0, "rel", tol, 0)
            sol.backward.method = "jfb"

    alias = z.view_as(z)
    alias.register_hook(hook)
    return alias
