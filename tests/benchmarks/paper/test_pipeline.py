"""The paper bench on a tiny budget: outputs, aggregates recomputed from raw records, snapshots checked
against the trainer's own checkpoint, the full profile's code path (dry run), and where the data comes from."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from lipdeq.benchmarks import paper
from lipdeq.training import evaluate_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::lipdeq.solvers.SolverWarning")

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


def test_quick_profile_on_real_cifar(tmp_path: Path, real_cifar_dir: Path, tiny: dict) -> None:
    # no BatchNorm re-estimation here, so that our evaluation matches `lipdeq eval` of the same checkpoint
    res = paper.run(tmp_path, profile="quick", data_dir=str(real_cifar_dir), device="cpu", max_steps_override=4,
                    overrides=tiny["small_2"], profile_options={**tiny["options"], "bn_recalibration_batches": 0},
                    verbose=False)
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
    # equal steps: the same step on both sides; the baseline's step count whenever the Lipschitz run got there
    # (it keeps a snapshot at that step); it may not on tiny models, whose fixed per-step costs dominate
    pair = res["pairs"][0]
    lip_steps, base_steps = ({e["step"] for e in m["evals"]} for m in (lip, base))
    assert (base["steps"] in lip_steps) == (lip["steps"] >= base["steps"])
    n = max(s for s in lip_steps & base_steps if s <= min(lip["steps"], base["steps"]))
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


def test_full_profile_dry_run(full_dry_run: tuple[Path, dict]) -> None:
    out, res = full_dry_run
    data = _check_outputs(out, "full", "mdeq_large")
    assert data["dataset"] == "synthetic"
    assert set(res["models"]) == {"mdeq_large", "mdeq_large_reg", "lipmdeq_large"}
    assert {(p["lipschitz"], p["baseline"]) for p in res["pairs"]} == {
        ("lipmdeq_large", "mdeq_large"), ("lipmdeq_large", "mdeq_large_reg")}
    assert all(m["steps"] == 2 for m in res["models"].values())
    # mdeq_large pretrains (unrolled) for its first steps, as its preset says: no solver stats then
    assert all(r.get("pretrain") for r in res["models"]["mdeq_large"]["records"])
    assert not any(r.get("pretrain") for r in res["models"]["mdeq_large_reg"]["records"])
    assert res["settings"]["bn_recalibration_images"] == 2 * 4


def test_resolve_data_prefers_explicit_then_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert paper.resolve_data(str(tmp_path))[:2] == ("cifar10", str(tmp_path))
    monkeypatch.setenv("LIPDEQ_DATA_DIR", str(tmp_path))
    assert paper.resolve_data(None)[:2] == ("cifar10", None)
    monkeypatch.delenv("LIPDEQ_DATA_DIR")
    assert paper.resolve_data(None)[0] == "synthetic"


def test_resolve_data_never_guesses_a_workspace_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A CIFAR-10 copy in ../shared/data beside the working directory is not picked up: the bench uses
    only --data-dir or $LIPDEQ_DATA_DIR, and says plainly that it falls back to the synthetic set."""
    batches = tmp_path / "shared" / "data" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "test_batch").write_bytes(b"")
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("LIPDEQ_DATA_DIR", raising=False)
    dataset, data_dir, how = paper.resolve_data(None)
    assert (dataset, data_dir) == ("synthetic", None)
    assert "--data-dir" in how and "LIPDEQ_DATA_DIR" in how and "synthetic" in how
    monkeypatch.setenv("LIPDEQ_DATA_DIR", "")  # set but empty: as unset
    assert paper.resolve_data(None)[0] == "synthetic"
    assert paper.resolve_data("")[0] == "synthetic"


def test_bad_arguments(tmp_path: Path) -> None:
    out = tmp_path / "unused"
    with pytest.raises(ValueError, match="profile"):
        paper.run(out, profile="medium", verbose=False)
    with pytest.raises(ValueError, match="max_steps_override"):
        paper.run(out, max_steps_override=1, verbose=False)
    with pytest.raises(ValueError, match="num_threads"):
        paper.run(out, num_threads=0, verbose=False)
    assert not out.exists()  # refused before anything was written


def test_missing_matplotlib_is_reported_before_any_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lipdeq.optional import MissingExtraError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "bench"
    with pytest.raises(MissingExtraError, match=r"lipdeq\[plots\]"):
        paper.run(out, profile="quick", device="cpu", verbose=False)
    assert not out.exists()  # nothing trained, nothing written
