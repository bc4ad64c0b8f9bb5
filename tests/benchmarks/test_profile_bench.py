"""``lipdeq bench profile``: the phases of a step add up to the step, and the counts are the model's."""

from __future__ import annotations

import pytest
import torch

from lipdeq.benchmarks import profile
from lipdeq.cli import main

TINY = ["model.channels=[8,8]", "model.head_channels=[4,4]", "model.final_channels=16", "model.num_groups=4",
        "model.image_size=8"]


@pytest.mark.parametrize("budget", ["certified", "residual"])
def test_phases_add_up_and_hooks_are_removed(budget):
    r = profile.run("lipmdeq_tiny", batch_size=4, steps=2, warmup=1, overrides=[*TINY, f"model.budget={budget}"])
    tr, inf = r["train"], r["infer"]
    assert all(tr[p] >= 0 for p in profile.PHASES if p != "optimizer")
    assert sum(tr[p] for p in profile.PHASES) == pytest.approx(tr["total"], rel=1e-9)
    assert tr["solve_f"] + tr["solve_outside_f"] == pytest.approx(tr["solve"])
    assert tr["cap"] > 0 and tr["graph_step"] > 0 and tr["backward_adjoint"] > 0 and inf["solve"] > 0
    assert inf["graph_step"] == 0.0 and 0 < inf["total"] and inf["cap"] < r["infer_first"]["cap"]
    assert r["train_forward_f_evals"] >= 2 and r["train_backward_vjps"] >= 1
    assert (r["train_forward_f_evals"] == 2) == (budget == "certified")  # at init L ~ 0.01: K = 2
    assert 0 < r["certificate_share"] < 1 and r["certificate_refresh_s"] > 0
    assert torch.autograd.grad.__name__ == "grad"  # the timing wrapper is gone
    text = profile.format_report(r)
    assert "backward_adjoint" in text and "of a training step" in text
    # the yardstick: one evaluation of the bench solvers map per step; the step and inference in its units
    assert r["yardstick_s"] > 0
    assert r["train_units"] == pytest.approx(tr["total"] / r["yardstick_s"])
    assert r["infer_units"] == pytest.approx(inf["total"] / r["yardstick_s"])
    assert "yardstick" in text and f"{profile.ISSUE11_TARGETS['train']:.1f}" in text


def test_cli_bench_profile(capsys):
    sets = [a for s in TINY for a in ("--set", s)]
    assert main(["bench", "profile", "--batch-size", "2", "--steps", "1", *sets]) == 0
    out = capsys.readouterr().out
    assert "lipmdeq_tiny, batch 2" in out and "graph_step" in out
