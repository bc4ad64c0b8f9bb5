"""Shared settings of the paper-bench tests, and one dry run of the full profile that several tests read."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from lipdeq.benchmarks import paper
from lipdeq.solvers import SolverWarning

# Tiny widths and budgets: the bench's code path in seconds (SMALL_4: the full profile's four branches).
SMALL_2 = ["model.channels=[4,4]", "model.head_channels=[2,4]", "model.final_channels=8", "model.num_groups=2",
           "model.expansion=2", "model.f_thres=6", "model.b_thres=6", "train.batch_size=8"]
SMALL_4 = ["model.channels=[4,4,4,4]", "model.head_channels=[2,2,2,2]", "model.final_channels=8",
           "model.num_groups=2", "model.expansion=2", "model.f_thres=4", "model.b_thres=4", "train.batch_size=4",
           "model.pretrain_layers=3", "data.dataset=synthetic"]
OPTIONS = {"test_subset": 24, "sweep_test_subset": 12, "probe_batch_size": 4, "eval_batch_size": 12,
           "sweep_steps": 2, "sweep_knobs": (("relu_slope", (0.4, 1.0)),), "trace_iters": 4,
           "memory_f_thres": (2, 4), "memory_batch_size": 2, "train_subset": 64, "max_evals": 3}


@pytest.fixture(scope="session")
def tiny() -> dict[str, Any]:
    """The tiny settings above: ``small_2`` / ``small_4`` overrides and the profile ``options``."""
    return {"small_2": list(SMALL_2), "small_4": list(SMALL_4), "options": dict(OPTIONS)}


@pytest.fixture(scope="session")
def full_dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The full profile's code path on tiny widths and the synthetic set: ``(out_dir, results)``."""
    out = tmp_path_factory.mktemp("full_dry_run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # as the module-level marks of the tests that read this
        res = paper.run(out, profile="full", data_dir=None, device="cpu", max_steps_override=2, overrides=SMALL_4,
                        profile_options={**OPTIONS, "bn_recalibration_batches": 2}, num_threads=1, verbose=False)
    return out, res
