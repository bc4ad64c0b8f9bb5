"""What the bench measures on each snapshot: BatchNorm re-estimation before evaluations, which snapshots."""

from __future__ import annotations

import torch

from lipdeq.benchmarks.paper.running import choose_evals
from lipdeq.training.evaluate import recalibrate_batchnorm


def test_recalibrate_batchnorm_matches_batch_statistics() -> None:
    """Oracle: after re-estimation, running mean / var are the averages over the batches of each batch's
    per-channel mean and unbiased variance (equal batch sizes); momentum and mode are restored."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3)
    bn = torch.nn.BatchNorm2d(5, momentum=0.1)
    model = torch.nn.Sequential(conv, bn, torch.nn.ReLU())
    batches = [torch.randn(6, 3, 8, 8) * (i + 1) for i in range(3)]
    bn.running_mean.fill_(7.0)
    assert recalibrate_batchnorm(model, batches) == 1
    with torch.no_grad():
        feats = [conv(x) for x in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and not model.training
    assert recalibrate_batchnorm(torch.nn.Linear(2, 2), batches) == 0


def test_choose_evals_keeps_required_steps_and_spreads_the_rest() -> None:
    steps = list(range(10, 110, 10))  # 10 snapshots
    assert choose_evals(steps, {50}, None) == steps  # no limit: all
    assert choose_evals(steps, {50}, 20) == steps  # fewer than the limit: all
    chosen = choose_evals(steps, {50, 100}, 4)
    assert len(chosen) == 4 and {50, 100} <= set(chosen)
    assert chosen == [10, 50, 90, 100]  # the two free picks: the ends of the remaining steps
    assert choose_evals(steps, {30}, 2) == [30, 100]  # one free pick: the last remaining step
    assert choose_evals(steps, {20, 40, 60}, 2) == [20, 40, 60]  # required steps are never dropped
