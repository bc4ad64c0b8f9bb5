"""The paper bench on a tiny budget: outputs, aggregates recomputed from raw records, snapshots checked
against the trainer's own checkpoint, and the full profile's code path (dry run)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from lipdeq.benchmarks import paper
from lipdeq.configs import load_config
from lipdeq.training import evaluate_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::lipdeq.solvers.SolverWarning")

SMALL_2 = ["model.channels=[4,4]", "model.head_channels=[2,4]", "model.final_channels=8", "model.num_groups=2",
           "model.expansion=2", "model.f_thres=6", "model.b_thres=6", "train.batch_size=8"]
SMALL_4 = ["model.channels=[4,4,4,4]", "model.head_channels=[2,2,2,2]", "model.final_channels=8",
           "model.num_groups=2", "model.expansion=2", "model.f_thres=4", "model.b_thres=4", "train.batch_size=4",
           "model.pretrain_layers=3", "data.dataset=synthetic"]
OPTIONS = {"test_subset": 24, "sweep_test_subset": 12, "probe_batch_size": 4, "eval_batch_size": 12,
           "sweep_steps": 2, "sweep_knobs": (("relu_slope", (0.4, 1.0)),), "trace_iters": 4,
           "memory_f_thres": (2, 4), "memory_batch_size": 2, "train_subset": 64, "max_evals": 3}
PNGS = ("residuals.png", "accuracy_vs_time.png", "iterations.png", "sweep.png")
SUMMARY_NUMBERS = ("train_step_speedup", "inference_speedup", "accuracy_baseline", "accuracy_lipschitz")
def _check_outputs(out: Path, profile: str, baseline: str) -> dict:
    data = json.loads((out / "results.json").read_text())
    s = data["summary"]
    for key in SUMMARY_NUMBERS:
        assert isinstance(s[key], float) and math.isfinite(s[key]), key
    assert s["baseline"] == baseline and s["profile"] == profile
    for key in ("dataset", "device", "date", "command"):
        assert s[key]
    assert set(data["targets"]) >= {"train_step_speedup", "inference_speedup", "accuracy_equal_wallclock",
                                    "accuracy_equal_steps", "memory_flat"}
    t = data["targets"]
    assert t["train_step_speedup"]["met"] == (t["train_step_speedup"]["measured"] >= 4.75)
    assert t["inference_speedup"]["met"] == (t["inference_speedup"]["measured"] >= 4.0)
    assert t["accuracy_equal_wallclock"]["met"] == (s["accuracy_lipschitz"] > s["accuracy_baseline"])
    assert isinstance(t["accuracy_equal_steps"]["z"], (float, str))
    md = (out / "results.md").read_text()
    assert "train-step speed-up >= 4.75x" in md and f"against {baseline}" in md
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    return data


def _median_second_half(records: list[dict]) -> float:
    return statistics.median(r["step_time"] for r in records[len(records) // 2:])


def test_quick_profile_on_real_cifar(tmp_path: Path, real_cifar_dir: Path) -> None:
    # no BatchNorm re-estimation here, so that our evaluation matches `lipdeq eval` of the same checkpoint
    res = paper.run(tmp_path, profile="quick", data_dir=str(real_cifar_dir), device="cpu", max_steps_override=4,
                    overrides=SMALL_2, profile_options={**OPTIONS, "bn_recalibration_batches": 0}, verbose=False)
    data = _check_outputs(tmp_path, "quick", "mdeq_tiny")
    assert data["dataset"] == "cifar10"
    lip, base = res["models"]["lipmdeq_tiny"], res["models"]["mdeq_tiny"]
    assert base["steps"] == 4
    # the Lipschitz model trains for the baseline's training time (or its step cap)
    assert lip["train_seconds"] >= base["train_seconds"] or lip["steps"] == 16
    # aggregates recomputed from the raw per-step records
    speedup = _median_second_half(base["records"]) / _median_second_half(lip["records"])
    assert res["summary"]["train_step_speedup"] == pytest.approx(speedup)
    assert sum(r["step_time"] for r in lip["records"]) == pytest.approx(lip["train_seconds"])
    assert res["summary"]["inference_speedup"] == pytest.approx(
        base["evals"][-1]["seconds_per_image"] / lip["evals"][-1]["seconds_per_image"])
    # equal steps: the Lipschitz snapshot taken at the baseline's step count
    pair = res["pairs"][0]
    n = min(lip["steps"], base["steps"])
    assert pair["equal_steps"]["lipschitz"]["step"] == n == pair["equal_steps"]["baseline"]["step"]
    # the final snapshot is the trainer's own last checkpoint: the same accuracy by an independent path
    for name, entry in (("lipmdeq_tiny", lip), ("mdeq_tiny", base)):
        metrics = evaluate_checkpoint(tmp_path / "runs" / name, device="cpu",
                                      overrides=["data.test_subset=24", "train.eval_batch_size=12"])
        assert metrics["step"] == entry["evals"][-1]["step"]
        assert metrics["accuracy"] == entry["evals"][-1]["accuracy"]
    # the certificate: finite and < 1 for the Lipschitz model, none for the baseline; a contraction converges
    assert lip["certificate_final"] < 1.0 and math.isinf(base["certificate_final"])
    assert lip["probes"]["end"]["forward_converged_frac"] == 1.0
    fwd = torch.tensor(lip["traces"]["forward"])
    assert fwd.shape == (4, 4)
    assert float(fwd[-1].max()) < 1e-3
    # the sweep's a-priori verdict follows the hyperparameter bound
    for point in res["sweep"]["points"]:
        assert point["hyper_certified"] == (point["hyper_bound"] < 1.0)
    assert {p["point"] for p in res["sweep"]["points"]} == {"reference", "relu_slope=1"}


def test_full_profile_dry_run(tmp_path: Path) -> None:
    res = paper.run(tmp_path, profile="full", data_dir=None, device="cpu", max_steps_override=2,
                    overrides=SMALL_4, profile_options={**OPTIONS, "bn_recalibration_batches": 2}, verbose=False)
    data = _check_outputs(tmp_path, "full", "mdeq_large")
    assert data["dataset"] == "synthetic"
    assert set(res["models"]) == {"mdeq_large", "mdeq_large_reg", "lipmdeq_large"}
    assert {(p["lipschitz"], p["baseline"]) for p in res["pairs"]} == {
        ("lipmdeq_large", "mdeq_large"), ("lipmdeq_large", "mdeq_large_reg")}
    assert all(m["steps"] == 2 for m in res["models"].values())
    # mdeq_large pretrains (unrolled) for its first steps, as its preset says: no solver stats then
    assert all(r.get("pretrain") for r in res["models"]["mdeq_large"]["records"])
    assert not any(r.get("pretrain") for r in res["models"]["mdeq_large_reg"]["records"])
    assert res["settings"]["bn_recalibration_images"] == 2 * 4


def test_recalibrate_batchnorm_matches_batch_statistics() -> None:
    """Oracle: after re-estimation, running mean / var are the averages over the batches of each batch's
    per-channel mean and unbiased variance (equal batch sizes); momentum and mode are restored."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3)
    bn = torch.nn.BatchNorm2d(5, momentum=0.1)
    model = torch.nn.Sequential(conv, bn, torch.nn.ReLU())
    batches = [torch.randn(6, 3, 8, 8) * (i + 1) for i in range(3)]
    bn.running_mean.fill_(7.0)
    assert paper.recalibrate_batchnorm(model, batches) == 1
    with torch.no_grad():
        feats = [conv(x) for x in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and not model.training
    assert paper.recalibrate_batchnorm(torch.nn.Linear(2, 2), batches) == 0


def test_full_profile_trains_the_presets_as_they_are() -> None:
    assert paper.FULL.baseline_max_steps is None and not paper.FULL.match_baseline_time
    assert paper.FULL.overrides == ()
    cfg = load_config("lipmdeq_large", list(paper.FULL.overrides))
    assert paper._expected_steps(cfg, 50000) == 200 * (50000 // 128)
    assert load_config("mdeq_large", list(paper.FULL.overrides)).train.pretrain_steps == 20000


def test_resolve_data_prefers_explicit_then_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert paper.resolve_data(str(tmp_path))[:2] == ("cifar10", str(tmp_path))
    monkeypatch.setenv("LIPDEQ_DATA_DIR", str(tmp_path))
    assert paper.resolve_data(None)[:2] == ("cifar10", None)
    monkeypatch.delenv("LIPDEQ_DATA_DIR")
    monkeypatch.setattr(paper, "_repo_shared_cifar", lambda: [tmp_path / "absent"])
    assert paper.resolve_data(None)[0] == "synthetic"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="profile"):
        paper.run(Path("unused"), profile="medium", verbose=False)
    with pytest.raises(ValueError, match="max_steps_override"):
        paper.run(Path("unused"), max_steps_override=1, verbose=False)
