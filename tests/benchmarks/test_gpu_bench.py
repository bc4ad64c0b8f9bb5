"""``lipdeq bench gpu``: the dry run writes every field and the table; without CUDA it refuses."""

from __future__ import annotations

import json

import pytest
import torch

from lipdeq.benchmarks.gpu_report import TARGETS, format_report, verdicts
from lipdeq.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::lipdeq.solvers.SolverWarning")


def test_dry_run_writes_the_results_and_the_table(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert main(["bench", "gpu", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert r["dry_run"] is True and r["environment"]["device"] == "cpu" and r["elapsed_s"] <= r["budget_s"]
    assert r["tests"]["skipped"] >= 12 and r["tests"]["failed"] == 0 and r["tests"]["errors"] == 0  # no CUDA here
    rows = {(x["preset"], x["amp"], x["compile"]): x for x in r["throughput"]}
    assert {p for p, _, _ in rows} == {"lipmdeq_large", "mdeq_large", "mdeq_large_reg"}
    for key in [("lipmdeq_large", "none", False), ("lipmdeq_large", "bf16", False), ("mdeq_large", "none", False),
                ("lipmdeq_large", "none", True)]:
        row = rows[key]
        assert row["finite"] and row["train_images_per_s"] > 0 and row["infer_images_per_s"] > 0, key
        assert row["train_peak_bytes"] is None  # CPU: no allocator peak
    # the contraction converges in a few iterations, the baseline runs at its cap (4 in the dry run)
    assert rows["lipmdeq_large", "none", False]["forward_iters"] < 4
    assert rows["mdeq_large", "none", False]["forward_iters"] == 4
    assert 0 < r["bf16_logits"]["lipmdeq_large"] < 1e-2
    assert r["memory"]["ratio"] == pytest.approx(1.0, abs=0.1) and r["memory"]["metric"] == "saved_tensor_bytes"
    for preset in ("lipmdeq_large", "mdeq_large"):
        of = r["outside_f"][preset]
        assert of["check_every_1"]["f_evals"] <= of["check_every_4"]["f_evals"]
        assert of["check_every_4"]["f_evals"] == 4  # checked at the 4th evaluation only (f_thres 4)
        tr = r["training"][preset]
        assert tr["steps"] >= 1 and 0.0 <= tr["accuracy"] <= 1.0 and tr["test_images"] == 8
    assert [v["target"] for v in r["targets"]] == list(TARGETS.values())
    assert all(v["verdict"] in ("met", "not met", "not measured") for v in r["targets"])
    assert "| lipmdeq_large | float32 | off |" in table and "| lipmdeq_large | float32 | on |" in table
    assert "## Targets" in table and "DRY RUN" in table and printed.strip() == table.strip()


def test_refuses_to_start_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--out", str(tmp_path / "gpu")]) == 2
    err = capsys.readouterr().err
    assert "CUDA" in err and "--dry-run" in err
    assert not (tmp_path / "gpu").exists()


def _row(preset, amp, compiled, ips):
    return {"preset": preset, "amp": amp, "compile": compiled, "train_images_per_s": ips, "infer_images_per_s": ips,
            "train_peak_bytes": 2**30, "infer_peak_bytes": None, "forward_iters": 3.0, "backward_iters": 2.0,
            "first_step_s": 1.0}


def test_verdicts_follow_the_thresholds():
    results = {
        "throughput": [_row("lipmdeq_large", "bf16", False, 1900.0), _row("lipmdeq_large", "bf16", True, 2100.0),
                       _row("mdeq_large", "bf16", False, 400.0), {"preset": "mdeq_large", "amp": "bf16",
                                                                   "compile": True, "note": "skipped: time"}],
        "bf16_logits": {"lipmdeq_large": 0.02},
        "memory": {"preset": "lipmdeq_large", "f_thres": [5, 30], "values": [2**30, 1.05 * 2**30], "ratio": 1.05,
                   "metric": "cuda_peak_bytes"},
        "outside_f": {},
    }
    got = {v["key"]: v for v in verdicts(results)}
    assert got["throughput"]["verdict"] == "met" and "2,100" in got["throughput"]["measured"]
    assert got["ratio"]["verdict"] == "met" and got["ratio"]["measured"].startswith("4.75x (bf16, eager)")
    assert got["bf16"]["verdict"] == "not met"
    assert got["memory"]["verdict"] == "met"
    assert got["outside_f"]["verdict"] == "not measured"
    results["throughput"][2]["train_images_per_s"] = 401.0  # 1900 / 401 < 4.75
    assert {v["key"]: v for v in verdicts(results)}["ratio"]["verdict"] == "not met"
    assert verdicts({})[0]["verdict"] == "not measured"
    report = format_report({**results, "dry_run": False, "budget_s": 480, "elapsed_s": 1, "batch_size": 128,
                            "started": "t", "environment": {"device": "cuda:0", "device_name": "X", "torch": "t"},
                            "targets": verdicts(results)})
    assert "| mdeq_large | bf16 | on | skipped: time |" in report
    assert "| lipmdeq_large | bf16 | on | 2,100 | 2,100 | 1,024 | - | 3.0 / 2.0 | 1.0 |" in report
