"""The sweep trains through the trainer's own step (lipdeq.training.step.train_step), point by point."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
import torch

from lipdeq.benchmarks.paper import QUICK
from lipdeq.benchmarks.paper.sweep import run_sweep
from lipdeq.configs import load_config
from lipdeq.data import load_dataset
from lipdeq.training import step as step_module

pytestmark = pytest.mark.filterwarnings("ignore::lipdeq.solvers.SolverWarning")


def _sweep(tiny: dict, extra: Sequence[str] = ()) -> tuple[dict, list]:
    prof = dataclasses.replace(QUICK, sweep_knobs=(("relu_slope", (0.4, 1.0)),), sweep_steps=2,
                               sweep_test_subset=12, eval_batch_size=12)
    common = [*tiny["small_2"], "data.dataset=synthetic", *extra]

    def config(preset: str, more: Sequence[str] = ()) -> object:
        return load_config(preset, [*common, *more])

    train_x, train_y = load_dataset("synthetic", "train", subset=32, seed=0)
    return run_sweep(prof, config, train_x, train_y, torch.device("cpu"), 0, 0.5, 1e-3, "mdeq_tiny",
                     lambda msg: None, [])


def test_sweep_steps_are_train_steps(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = step_module.train_step

    def counting(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(step_module, "train_step", counting)
    sweep = _sweep(tiny)
    rows = sweep["points"]
    assert [r["point"] for r in rows] == ["reference", "relu_slope=1"]
    assert len(calls) == 2 * 2  # two points, two steps each, all through the one step function
    assert all(c.finite for c in calls) and all(r["skipped_steps"] == 0 for r in rows)
    for row, first, last in zip(rows, calls[0::2], calls[1::2]):
        # the statistics recorded per step are those of the step's own solves
        assert row["first_step"]["forward_nstep_mean"] == first.solution.summary("forward")["forward_nstep_mean"]
        assert row["last_step"]["backward_nstep_mean"] == (
            last.solution.backward.summary("backward")["backward_nstep_mean"])
        assert row["train_step_speedup"] == pytest.approx(0.5 / row["step_time"])
        assert row["hyper_certified"] == (row["hyper_bound"] < 1.0)

