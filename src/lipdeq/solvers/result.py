"""Typed result of a fixed-point solve: the value plus a per-sample verdict."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class SolverWarning(UserWarning):
    """A solve left samples in a state the user should act on (see :func:`lipdeq.fixed_point`).

    Emitted by :func:`lipdeq.fixed_point` when the forward solve ends with diverged or non-finite
    samples, or the backward (adjoint) solve with any sample not converged. Filter it with
    ``warnings.simplefilter("ignore", SolverWarning)`` or turn it into an error with ``"error"``.
    """


class Status(enum.IntEnum):
    """Per-sample outcome of a solve (stored as int8 codes in :attr:`Solution.status`)."""

    CONVERGED = 0
    """The stop criterion fell below ``tol``."""
    MAX_ITER = 1
    """``max_iter`` was reached before the criterion fell below ``tol``."""
    DIVERGED = 2
    """The residual grew by more than ``divergence_factor`` over its best value, or ``||f(z)||`` grew by more
    than ``divergence_factor`` over ``max(||z0||, ||f(z0)||)``; iteration stopped."""
    NON_FINITE = 3
    """``f`` produced NaN or Inf for this sample; its best finite iterate is returned."""


@dataclass
class Solution:
    """Result of :func:`lipdeq.solvers.solve`.

    Every per-sample field has shape ``(B,)``. Per sample, let ``z_b`` be the iterate with the lowest
    stop criterion that was seen (never one with a non-finite ``f(z_b)``); ``value`` is its image
    ``f(z_b)`` (already computed, no extra evaluation; ``z0`` if ``f(z0)`` was already non-finite).

    Attributes:
        value: the approximate fixed point ``f(z_b)``, same shape as ``z0``.
        status: int8 codes of :class:`Status`, one per sample.
        nstep: number of evaluations of ``f`` up to and including ``f(z_b)`` (Picard: ``value`` is the
            ``nstep``-th iterate).
        abs_residual: ``||f(z_b) - z_b||`` per sample (l2 over all non-batch dims).
        rel_residual: ``||f(z_b) - z_b|| / (||f(z_b)|| + eps)`` per sample.
        error_bound: certified a-posteriori bound ``L/(1-L) * abs_residual`` on ``||value - z*||`` per
            sample when the solve was given ``lipschitz=L < 1``; ``None`` otherwise.
        n_f_evals: number of (batched) evaluations of ``f``.
        method, stop_mode, tol, max_iter: the settings that produced this solution.
        abs_trace, rel_trace: optional ``(T, B)`` residual traces (``return_trace=True``).
        backward: for :func:`lipdeq.fixed_point` with ``backward="ift"``, the adjoint solve's
            :class:`Solution`, filled in once the backward pass has run.
    """

    value: torch.Tensor
    status: torch.Tensor
    nstep: torch.Tensor
    abs_residual: torch.Tensor
    rel_residual: torch.Tensor
    error_bound: torch.Tensor | None = None
    n_f_evals: int = 0
    method: str = ""
    stop_mode: str = "rel"
    tol: float = 0.0
    max_iter: int = 0
    abs_trace: torch.Tensor | None = None
    rel_trace: torch.Tensor | None = None
    backward: Solution | None = field(default=None, repr=False)

    @property
    def converged(self) -> torch.Tensor:
        """Boolean mask ``(B,)`` of samples whose status is CONVERGED."""
        return self.status == int(Status.CONVERGED)

    @property
    def all_converged(self) -> bool:
        """True when every sample converged."""
        return bool(self.converged.all())

    def statuses(self) -> list[Status]:
        """The per-sample statuses as :class:`Status` members."""
        return [Status(int(s)) for s in self.status.tolist()]

    def counts(self) -> dict[str, int]:
        """Number of samples per status name, e.g. ``{"converged": 31, "max_iter": 1}``."""
        return {s.name.lower(): int((self.status == int(s)).sum()) for s in Status}
