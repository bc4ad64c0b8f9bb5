"""``Solution.summary``: the one per-sample statistics summary (trainer, evaluation, bench), by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lipdeq.solvers import Solution, Status, percentile, sample_summary, solve, status_counts


def _solution(error_bound: torch.Tensor | None) -> Solution:
    c, m, d = int(Status.CONVERGED), int(Status.MAX_ITER), int(Status.DIVERGED)
    return Solution(
        value=torch.zeros(4, 3),
        status=torch.tensor([c, c, m, d], dtype=torch.int8),
        nstep=torch.tensor([1, 2, 3, 10]),
        abs_residual=torch.tensor([1.0, 2.0, 3.0, 4.0]),
        rel_residual=torch.tensor([0.1, 0.4, 0.2, 0.3]),
        error_bound=error_bound,
    )


def test_summary_by_hand() -> None:
    stats = _solution(torch.tensor([0.5, 0.25, 1.0, 2.0])).summary("forward")
    expected = {
        "forward_nstep_mean": 4.0,  # (1 + 2 + 3 + 10) / 4
        # sorted 1, 2, 3, 10: position 0.95 * 3 = 2.85 lies between 3 and 10 -> 3 + 0.85 * 7
        "forward_nstep_p95": 8.95,
        "forward_nstep_max": 10.0,
        "forward_rel_residual_mean": 0.25,
        "forward_rel_residual_median": 0.2,  # the lower of the two middle values 0.2 and 0.3
        "forward_rel_residual_max": 0.4,
        "forward_abs_residual_max": 4.0,
        "forward_converged_frac": 0.5,
        "forward_error_bound_max": 2.0,
    }
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-6, abs=0.0), key
        assert type(stats[key]) is float, key


def test_summary_prefix_and_no_bound() -> None:
    stats = _solution(None).summary("backward")
    assert all(key.startswith("backward_") for key in stats)
    assert "backward_error_bound_max" not in stats
    assert stats["backward_nstep_max"] == 10.0


def test_summary_of_no_samples_is_nan() -> None:
    empty = torch.zeros(0)
    stats = sample_summary("x", nstep=empty, rel_residual=empty, abs_residual=empty,
                           status=empty.to(torch.int8), error_bound=empty)
    assert len(stats) == 9 and all(math.isnan(v) for v in stats.values())


def test_summary_matches_a_real_solve() -> None:
    z0 = torch.zeros(3, 5, dtype=torch.float64)
    scale = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64).view(3, 1)
    sol = solve(lambda z: scale * z + 1.0, z0, method="picard", tol=1e-8, max_iter=500, lipschitz=0.9)
    stats = sol.summary("forward")
    assert stats["forward_nstep_max"] == float(sol.nstep.max())
    assert stats["forward_nstep_mean"] == pytest.approx(float(sol.nstep.double().mean()), rel=1e-12)
    assert stats["forward_converged_frac"] == 1.0
    assert stats["forward_error_bound_max"] == float(sol.error_bound.max())


def test_percentile_and_status_counts() -> None:
    assert percentile(torch.tensor([1.0, 2.0, 3.0, 10.0]), 0.5) == pytest.approx(2.5)
    assert percentile(torch.tensor([[4.0, 1.0], [3.0, 2.0]]), 1.0) == 4.0  # over all entries
    assert math.isnan(percentile(torch.zeros(0), 0.95))
    counts = status_counts(_solution(None).status)
    assert counts == {"converged": 2, "max_iter": 1, "diverged": 1, "non_finite": 0}
    assert _solution(None).counts() == counts
