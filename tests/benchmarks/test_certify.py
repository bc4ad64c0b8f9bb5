"""``lipdeq certify --checkpoint``: the certificate of trained weights against empirical estimates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lipdeq.benchmarks.certify import certify_checkpoint
from lipdeq.cli import main

SMALL = ["model.channels=[8,8]", "model.head_channels=[4,4]", "model.final_channels=16", "model.num_groups=4",
         "model.f_thres=8", "model.b_thres=8", "data.dataset=synthetic", "data.train_subset=32",
         "data.test_subset=8", "train.batch_size=16", "train.eval_batch_size=8", "train.num_threads=1"]


def _train(preset: str, steps: int, out: Path) -> Path:
    from lipdeq.configs import load_config
    from lipdeq.training import train

    train(load_config(preset, [*SMALL, f"train.max_steps={steps}"]), out, progress=False)
    return out


@pytest.fixture(scope="module")
def lip_run(tmp_path_factory) -> Path:
    return _train("lipmdeq_tiny", 2, tmp_path_factory.mktemp("certify") / "lip")


def test_certificate_is_never_below_the_empirical_estimate(lip_run):
    result = certify_checkpoint(lip_run, images=4, iters=10)
    cert, emp = result["certificate"]["value"], result["empirical"]
    assert result["model"] == "lipmdeq_tiny" and result["step"] == 2 and result["images"] == 4
    assert emp["value"] == max(emp["jacobian_data"], emp["jacobian_random"], emp["pairs"]) > 0
    assert result["ratio"] == cert / emp["value"] >= 1.0
    assert result["fixed_point_residual_max"] < 1e-8  # the data points are fixed points


def test_cli_json_and_text(lip_run, capsys):
    assert main(["certify", "--checkpoint", str(lip_run), "--images", "2", "--iters", "5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"certificate", "empirical", "ratio", "model", "step", "checkpoint"}
    assert data["certificate"]["mode"] == "weights" and data["ratio"] >= 1.0
    assert main(["certify", "--checkpoint", str(lip_run), "--images", "2", "--iters", "5"]) == 0
    out = capsys.readouterr().out
    for line in ("certificate  Lip(f) <=", "empirical    Lip(f) >=", "ratio", "pair ascent"):
        assert line in out


def test_baseline_has_an_infinite_certificate_and_a_finite_estimate(tmp_path, capsys):
    run = _train("mdeq_tiny", 1, tmp_path / "mdeq")
    assert main(["certify", "--checkpoint", str(run), "--images", "2", "--iters", "5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["certificate"]["value"] == "inf" and data["ratio"] == "inf"
    assert "GroupNorm" in data["certificate"]["reason"]
    assert math.isfinite(data["empirical"]["value"]) and data["empirical"]["value"] > 0


def test_a_missing_checkpoint_is_refused_by_name(tmp_path, capsys):
    assert main(["certify", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err and "does not exist" in err
