"""Typed result of a fixed-point solve: the value plus a per-sample verdict."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

__all__ = ["Solution", "SolverWarning", "Status", "percentile", "sample_summary", "status_counts"]


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
        n_f_evals: number of (batched) evaluations of ``f`` (of vector-Jacobian products, for an
            adjoint solve).
        extra_f_evals: evaluations of ``f`` made after the solve by :func:`lipdeq.fixed_point` (the
            graph-carrying re-evaluation at ``z*``, phantom steps); 0 for a bare solve and under a
            certified budget, whose last solver step carries the graph.
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
    extra_f_evals: int = 0
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
        return status_counts(self.status)

    def summary(self, prefix: str) -> dict[str, float]:
        """Per-sample statistics of this solve as a flat dict of floats, keys ``{prefix}_<name>``.

        See :func:`sample_summary` for the names; ``prefix`` is usually ``"forward"`` or
        ``"backward"``.
        """
        return sample_summary(
            prefix,
            nstep=self.nstep,
            rel_residual=self.rel_residual,
            abs_residual=self.abs_residual,
            status=self.status,
            error_bound=self.error_bound,
        )


def percentile(x: torch.Tensor, q: float) -> float:
    """The ``q``-quantile (``q`` in [0, 1], linear interpolation) of all entries of ``x``; NaN if empty."""
    return float(torch.quantile(x.detach().double().flatten(), q)) if x.numel() else math.nan


def status_counts(status: torch.Tensor) -> dict[str, int]:
    """Number of samples per status name of an int8 :class:`Status` code tensor."""
    return {s.name.lower(): int((status == int(s)).sum()) for s in Status}


def sample_summary(
    prefix: str,
    *,
    nstep: torch.Tensor,
    rel_residual: torch.Tensor,
    abs_residual: torch.Tensor,
    status: torch.Tensor,
    error_bound: torch.Tensor | None = None,
) -> dict[str, float]:
    """Statistics over samples of per-sample solver results (one solve, or many concatenated).

    Keys (each ``{prefix}_`` + name): ``nstep_mean``, ``nstep_p95``, ``nstep_max``,
    ``rel_residual_mean``, ``rel_residual_median``, ``rel_residual_max``, ``abs_residual_max``,
    ``converged_frac`` and, when ``error_bound`` is given, ``error_bound_max`` (the certified
    a-posteriori bound). Over zero samples every value is NaN. Taking the tensors rather than a
    :class:`Solution` lets an evaluation summarise many batches without keeping their fixed points.
    """
    names = ["nstep_mean", "nstep_p95", "nstep_max", "rel_residual_mean", "rel_residual_median",
             "rel_residual_max", "abs_residual_max", "converged_frac"]
    if error_bound is not None:
        names.append("error_bound_max")
    if nstep.numel() == 0:
        return {f"{prefix}_{name}": math.nan for name in names}
    ns, rel = nstep.detach().double(), rel_residual.detach().double()
    stats = [
        ns.mean(),
        torch.quantile(ns, 0.95),  # as percentile(), kept on the device
        ns.max(),
        rel.mean(),
        rel.median(),  # the lower median (torch's convention): a value some sample reached
        rel.max(),
        abs_residual.detach().double().max(),
        (status == int(Status.CONVERGED)).double().mean(),
    ]
    if error_bound is not None:
        stats.append(error_bound.detach().double().max())
    # One host transfer for all statistics (the trainer calls this every logged step, on GPU too).
    values = torch.stack([v.to(ns.device) for v in stats]).tolist()
    return {f"{prefix}_{name}": value for name, value in zip(names, values, strict=True)}
