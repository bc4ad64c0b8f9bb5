"""Fixed-point solvers with per-sample stopping, explicit status and optional certificates."""

from __future__ import annotations

from .result import Solution, SolverWarning, Status, percentile, sample_summary, status_counts
from .solve import METHODS, solve

__all__ = ["METHODS", "Solution", "SolverWarning", "Status", "percentile", "sample_summary", "solve", "status_counts"]
