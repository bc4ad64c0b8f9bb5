"""Training for a wall-clock budget: the clock, the stop, the snapshots, the time-horizon schedule and the
pretraining share, checked against the run's own per-step records."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lipdeq.benchmarks.accuracy.training import RunSpec, train_for_budget
from lipdeq.benchmarks.paper.running import model_from_state
from lipdeq.configs import load_config

TINY = ["model.channels=[4,4]", "model.head_channels=[2,4]", "model.final_channels=8", "model.num_groups=2",
        "model.expansion=2", "model.f_thres=6", "model.b_thres=6", "model.pretrain_layers=2", "train.batch_size=8",
        "data.dataset=synthetic", "data.train_subset=64"]


def test_budget_snapshots_schedule_and_pretraining(tmp_path: Path) -> None:
    cfg = load_config("mdeq_tiny", TINY)
    budget, pretrain = 1.2, 0.3
    spec = RunSpec("mdeq_tiny", cfg.to_dict(), budget, (0.2, 0.5), (0.4, 0.8), pretrain, str(tmp_path), "cpu", 1)
    run = train_for_budget(spec)
    recs = run["records"]
    times = [r["step_time"] for r in recs]
    # the clock is the sum of step times; the run stops at the first step that ends past the budget
    assert run["train_seconds"] == pytest.approx(sum(times)) and run["skipped_steps"] == 0
    assert run["train_seconds"] >= budget > run["train_seconds"] - times[-1]
    assert run["steps"] == len(recs) == run["batches"] and run["epochs"] == pytest.approx(run["steps"] / 8)
    # snapshots: at the first step past each requested time, the last one at the end (on the curve)
    before = {r["step"]: r["elapsed"] - r["step_time"] for r in recs}
    for s in run["snapshots"]:
        assert Path(s["path"]).is_file()
        for t in s["nominal"]:
            assert before[s["step"]] < t <= s["elapsed"]
    assert [t for s in run["snapshots"] for t in s["nominal"]] == [0.2, 0.5]
    last = run["snapshots"][-1]
    assert last["step"] == run["steps"] and last["elapsed"] == run["train_seconds"]
    # a snapshot holds weights the model loads
    model_from_state(cfg, load_file(last["path"]), torch.device("cpu"), cfg.train.seed)
    # schedule: each step's lr is the cosine at the training time spent before it, over the budget
    for r in recs:
        progress = min(before[r["step"]] / budget, 1.0)
        expected = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + torch.cos(torch.tensor(torch.pi * progress)).item())
        assert r["lr"] == pytest.approx(expected, rel=0, abs=1e-8)  # microsecond units: |error| < 2e-9
    # pretraining (unrolled, no solver statistics) for the first 0.3 s of training time, then the DEQ
    assert [r["pretrain"] for r in recs] == [before[r["step"]] < pretrain for r in recs]
    assert recs[0]["pretrain"] and not recs[-1]["pretrain"]
    assert all(("forward_nstep_mean" in r) != r["pretrain"] for r in recs)
