"""The README's main command runs end to end (shrunk: small widths, a few steps)."""

from __future__ import annotations

import json

from lipdeq.demo import run_demo

SHRINK = ["model.channels=[8,8]", "model.head_channels=[4,4]", "model.final_channels=16", "model.num_groups=4",
          "data.train_subset=64", "data.test_subset=32",
          "train.num_threads=1"]


def test_demo_compares_both_models(tmp_path, capsys):
    rows = run_demo(tmp_path, steps=3, extra_overrides=SHRINK)
    out = capsys.readouterr().out
    assert "train-step speed-up of lipmdeq_tiny over mdeq_tiny" in out
    assert [r["model"] for r in rows] == ["lipmdeq_tiny", "mdeq_tiny"]
    lip, base = rows
    assert lip["certificate"] < 1.0 and base["certificate"] == float("inf")
    assert lip["steps"] == base["steps"] == 3
    assert lip["forward_iters"] < base["forward_iters"]
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())[0]["model"] == "lipmdeq_tiny"
