"""results.md and the verdicts of results.json are judged by the one table of targets (profiles.TARGETS)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from lipdeq.benchmarks.paper import TARGETS, format_markdown
from lipdeq.benchmarks.paper.compare import summary_and_targets


def _row(md: str, start: str) -> str:
    rows = [line for line in md.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, md)
    return rows[0]


def _rejudge(res: dict) -> str:
    res["summary"], res["targets"] = summary_and_targets(res, (res["summary"]["lipschitz"], res["summary"]["baseline"]))
    return format_markdown(res)


def _points(fraction: float) -> str:
    p = round(100 * fraction)
    return f"{p} point" + ("" if p == 1 else "s")


def test_report_verdicts_follow_the_targets_table(full_dry_run: tuple[Path, dict],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _, stored = full_dry_run
    res = copy.deepcopy(stored)
    md = _rejudge(res)
    for key, verdict in stored["targets"].items():  # the stored verdicts are the table's, recomputed alike
        again = res["targets"][key]
        assert again["met"] == verdict["met"] and again["target"] == verdict["target"], key
        assert again["measured"] == verdict["measured"] or math.isnan(verdict["measured"]), key
    assert _row(md, "| train-step speed-up >= 4.75x |").endswith(f"| {res['targets']['train_step_speedup']['met']} |")

    speedup = res["targets"]["train_step_speedup"]["measured"]
    inference = res["targets"]["inference_speedup"]["measured"]
    memory = res["targets"]["memory_flat"]["measured"]
    drop = -res["targets"]["accuracy_equal_steps"]["measured"]
    assert all(math.isfinite(v) and v > 0 for v in (speedup, inference, memory)) and math.isfinite(drop)
    for met in (True, False):
        train_min = speedup / 2 if met else speedup * 2
        infer_min = inference / 2 if met else inference * 2
        mem_max = memory * 2 if met else memory / 2
        drop_max = (math.ceil(100 * drop) + 1) / 100 if met else (math.floor(100 * drop) - 1) / 100
        monkeypatch.setitem(TARGETS, "train_step_speedup", train_min)
        monkeypatch.setitem(TARGETS, "inference_speedup", infer_min)
        monkeypatch.setitem(TARGETS, "memory_ratio", mem_max)
        monkeypatch.setitem(TARGETS, "equal_steps_drop", drop_max)
        md = _rejudge(res)
        t = res["targets"]
        assert [t[k]["met"] for k in ("train_step_speedup", "inference_speedup", "memory_flat",
                                      "accuracy_equal_steps")] == [met] * 4
        assert t["train_step_speedup"]["threshold"] == train_min and t["memory_flat"]["threshold"] == mem_max
        assert _row(md, f"| train-step speed-up >= {train_min:g}x |").endswith(f"| {met} |")
        assert _row(md, f"| inference speed-up >= {infer_min:g}x |").endswith(f"| {met} |")
        assert _row(md, f"| training memory flat in f_thres (<= {mem_max:.2f}) |").endswith(f"| {met} |")
        assert _row(md, f"| accuracy within {_points(drop_max)} at equal steps").endswith(f"| {met} |")
        assert "speed-up >= 4.75x" not in md
