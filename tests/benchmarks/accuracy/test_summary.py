"""The time-to-accuracy arithmetic on constructed curves, against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from lipdeq.benchmarks.accuracy import summary as S
from lipdeq.benchmarks.accuracy.running import partition
from lipdeq.benchmarks.accuracy.training import schedule_factor


def _curve(times, accs, n=1000, epochs=None):
    epochs = epochs or [t / 100 for t in times]
    return [{"step": i + 1, "elapsed": t, "epoch": e, "accuracy": a, "num_images": n}
            for i, (t, e, a) in enumerate(zip(times, epochs, accs))]


# Lipschitz: 0.12, 0.22, 0.31, 0.40 at 10, 20, 40, 80 s; baseline: 0.09, 0.12, 0.16, 0.21 at the same times
LIP = _curve([10, 20, 40, 80], [120 / 1000, 220 / 1000, 310 / 1000, 400 / 1000])
BASE = _curve([10, 20, 40, 80], [90 / 1000, 120 / 1000, 160 / 1000, 210 / 1000])


def test_thresholds_every_five_points():
    assert [S.threshold_key(t) for t in S.THRESHOLDS] == [f"0.{k:02d}" for k in range(10, 100, 5)]


def test_time_to_threshold_is_the_first_evaluation_at_or_above():
    tt = S.time_to_threshold(LIP)
    # 0.40 is reached with equality (400 of 1000 images) at 80 s; 0.45 never
    assert {k: tt[k] for k in ("0.10", "0.15", "0.20", "0.25", "0.30", "0.35", "0.40", "0.45")} == {
        "0.10": 10.0, "0.15": 20.0, "0.20": 20.0, "0.25": 40.0, "0.30": 40.0, "0.35": 80.0, "0.40": 80.0,
        "0.45": None}
    assert S.time_to_threshold(BASE)["0.10"] == 20.0 and S.time_to_threshold(BASE)["0.25"] is None
    # the first crossing counts even when a later point falls back below (no smoothing)
    assert S.time_to_threshold(_curve([1, 2, 3], [0.16, 0.12, 0.17]))["0.15"] == 1.0


def test_brackets_and_speedups_by_hand():
    br_l, br_b = S.threshold_bracket(LIP), S.threshold_bracket(BASE)
    assert br_l["0.10"] == [0.0, 10.0] and br_l["0.15"] == [10.0, 20.0] and br_l["0.20"] == [10.0, 20.0]
    assert br_b["0.10"] == [10.0, 20.0] and br_b["0.15"] == [20.0, 40.0] and br_b["0.20"] == [40.0, 80.0]
    sp = S.speedup_to_threshold(S.time_to_threshold(LIP), S.time_to_threshold(BASE))
    assert sp == {"0.10": 2.0, "0.15": 2.0, "0.20": 4.0}  # 20/10, 40/20, 80/20; 0.25 only one reached


def test_threshold_verdict_with_its_brackets():
    models = {"lip": {"curve": LIP, "final": None}, "base": {"curve": BASE, "final": None}}
    eq = {"epoch": 0.8, "set_by": "base", "lip": LIP[1], "base": BASE[-1]}
    _, targets = S.summarize(models, "lip", "base", eq)
    v = targets["time_to_threshold_speedup"]
    rows = v["per_threshold"]
    assert set(rows) == {"0.10", "0.15", "0.20"}
    # 0.10: 2x, bracket [10/10, 20/0] = [1, inf]; 0.15: 2x, [20/20, 40/10] = [1, 4]; 0.20: 4x, [40/20, 80/10] = [2, 8]
    assert rows["0.10"]["bracket"] == [1.0, math.inf] and rows["0.15"]["bracket"] == [1.0, 4.0]
    assert rows["0.20"]["bracket"] == [2.0, 8.0] and rows["0.20"]["speedup"] == 4.0
    assert [rows[k]["met"] for k in ("0.10", "0.15", "0.20")] == [False, False, False]
    # only 0.15's bracket lies wholly below 4.75
    assert [rows[k]["decided"] for k in ("0.10", "0.15", "0.20")] == [False, True, False]
    assert v["met"] is False and v["decided"] is False and v["not_measured"] == []


def test_threshold_met_and_not_measured_cases():
    lip = _curve([10, 40, 80], [0.22, 0.30, 0.35])
    base = _curve([10, 40, 80], [0.12, 0.15, 0.21])
    _, t = S.summarize({"lip": {"curve": lip, "final": None}, "base": {"curve": base, "final": None}}, "lip", "base",
                       {"epoch": 0.8, "set_by": "base", "lip": lip[0], "base": base[-1]})
    v = t["time_to_threshold_speedup"]
    # 0.10: both at their first evaluation: no time information; 0.15: 40/10 = 4 (bracket [10/10, 40/0]);
    # 0.20: 80/10 = 8 >= 4.75, but its bracket [40/10, inf] still allows 4: met, not decided
    assert v["not_measured"] == ["0.10"]
    assert v["per_threshold"]["0.15"]["speedup"] == 4.0 and not v["per_threshold"]["0.15"]["met"]
    row = v["per_threshold"]["0.20"]
    assert row["speedup"] == 8.0 and row["met"] and row["bracket"] == [4.0, math.inf] and not row["decided"]
    assert v["met"] is False
    # a threshold the baseline reaches and the Lipschitz model never: not met, decided
    _, t = S.summarize({"lip": {"curve": _curve([10, 20], [0.11, 0.12]), "final": None},
                        "base": {"curve": _curve([10, 20], [0.05, 0.16]), "final": None}}, "lip", "base",
                       {"epoch": 0.2, "set_by": "base", "lip": LIP[0], "base": BASE[0]})
    v = t["time_to_threshold_speedup"]
    assert v["per_threshold"]["0.15"]["met"] is False and v["per_threshold"]["0.15"]["speedup"] is None
    assert v["met"] is False and v["decided"] is False  # 0.10 (2x, bracket [10/10, 20/0]) is undecided
    # the baseline reaches no threshold: nothing to assess
    _, t = S.summarize({"lip": {"curve": LIP, "final": None}, "base": {"curve": _curve([10], [0.05]), "final": None}},
                       "lip", "base", {"epoch": 0.1, "set_by": "base", "lip": LIP[0], "base": BASE[0]})
    assert t["time_to_threshold_speedup"]["met"] is None


def test_binomial_standard_error_by_hand():
    assert S.binomial_se(0.5, 100) == pytest.approx(0.05, rel=1e-12)
    assert S.binomial_se(0.3, 1000) == pytest.approx(0.014491376746189439, rel=1e-12)  # sqrt(2.1e-4)
    assert S.binomial_se(1.0, 50) == 0.0 and math.isnan(S.binomial_se(0.5, 0))


def test_accuracy_comparison_and_its_verdicts():
    # 3-4-5: se 0.03 (p 0.9, n 100) and 0.04 (p 0.2, n 100) give a difference error of 0.05
    lip = {"step": 9, "epoch": 0.5, "elapsed": 60.0, "accuracy": 0.9, "num_images": 100}
    base = {"step": 3, "epoch": 0.2, "elapsed": 61.0, "accuracy": 0.2, "num_images": 100}
    c = S.compare_accuracy(lip, base)
    assert c["difference"] == pytest.approx(0.7) and c["difference_se"] == pytest.approx(0.05)
    assert c["z"] == pytest.approx(14.0)
    models = {"lip": {"curve": LIP, "final": lip}, "base": {"curve": BASE, "final": base}}
    eq = {"epoch": 0.2, "set_by": "base", "lip": {**lip, "accuracy": 0.2}, "base": {**base, "accuracy": 0.6}}
    s, t = S.summarize(models, "lip", "base", eq)
    assert s["final_accuracy"] == {"lip": 0.9, "base": 0.2}
    assert s["final_accuracy_se"]["lip"] == pytest.approx(0.03) and s["final_images"] == {"lip": 100, "base": 100}
    assert t["accuracy_equal_wallclock"]["met"] is True and t["accuracy_equal_wallclock"]["z"] == pytest.approx(14.0)
    assert s["equal_wallclock"]["baseline"]["accuracy_se"] == pytest.approx(0.04)
    assert s["verdicts"] == {"time_to_threshold_speedup": False, "accuracy_equal_wallclock": True,
                             "accuracy_equal_epochs": None}
    # equal epochs: 0.2 vs 0.6, errors 0.04 and sqrt(0.24)/10, reported with its sign, no verdict
    se = math.hypot(0.04, math.sqrt(0.24) / 10)
    assert t["accuracy_equal_epochs"]["measured"] == pytest.approx(-0.4)
    assert t["accuracy_equal_epochs"]["se"] == pytest.approx(se) and t["accuracy_equal_epochs"]["met"] is None
    assert s["equal_epochs"]["epoch"] == 0.2 and s["equal_epochs"]["set_by"] == "base"
    # the final evaluation is what final_accuracy reports; without one, the curve's last point
    s, t = S.summarize({"lip": {"curve": LIP, "final": None}, "base": {"curve": BASE, "final": None}}, "lip", "base",
                       eq)
    assert s["final_accuracy"] == {"lip": 0.4, "base": 0.21} and s["final_images"]["lip"] == 1000
    # 0.40 vs 0.21 on 1000 images each: z = 0.19 / sqrt((0.24 + 0.1659) / 1000) = 9.43
    assert t["accuracy_equal_wallclock"]["z"] == pytest.approx(0.19 / math.sqrt(0.4059e-3))


def test_evaluation_grids():
    assert S.eval_grid(3200.0, 6) == pytest.approx([100, 200, 400, 800, 1600, 3200])  # ratio 32 ** (1/5) = 2
    assert S.eval_grid(100.0, 4, "linear") == pytest.approx([25, 50, 75, 100])
    with pytest.raises(ValueError, match="spacing"):
        S.eval_grid(10.0, 3, "log")


def test_nearest_epoch_and_interval_means():
    snaps = [{"step": 1, "epoch": 0.25}, {"step": 2, "epoch": 0.75}, {"step": 3, "epoch": 1.5}]
    assert S.nearest_epoch(snaps, 0.5)["step"] == 1  # a tie: the earlier
    assert S.nearest_epoch(snaps, 1.0)["step"] == 2 and S.nearest_epoch(snaps, 9.0)["step"] == 3
    recs = [{"step": 1, "pretrain": True}, *({"step": s, "forward_nstep_mean": 2.0 * s} for s in (2, 3, 4, 5))]
    assert S.interval_means(recs, [1, 3, 5], keys=("forward_nstep_mean",)) == [
        {"forward_nstep_mean": None}, {"forward_nstep_mean": 5.0}, {"forward_nstep_mean": 9.0}]  # (4+6)/2, (8+10)/2


def test_partition_longest_first_to_the_least_loaded():
    # 5 -> w0, 4 -> w1, 3 -> w1 (4 < 5), 3 -> w0 (5 < 7), 1 -> w1 (7 < 8): loads 8 and 8
    assert partition([5.0, 4.0, 3.0, 3.0, 1.0], 2) == [[0, 3], [1, 2, 4]]


def test_time_horizon_of_the_schedule():
    t = SimpleNamespace(warmup_steps=0, schedule="cosine", lr=1e-3, min_lr=1e-6)
    assert schedule_factor(0.0, 100.0, 0, t) == 1.0
    assert schedule_factor(50.0, 100.0, 7, t) == pytest.approx((1e-6 + 0.5 * (1e-3 - 1e-6)) / 1e-3)
    assert schedule_factor(100.0, 100.0, 9, t) == pytest.approx(1e-3)  # min_lr / lr at the budget
    assert schedule_factor(250.0, 100.0, 9, t) == pytest.approx(1e-3)  # and after it (the last step's overrun)
    assert schedule_factor(30.0, 100.0, 0, SimpleNamespace(**{**vars(t), "schedule": "constant"})) == 1.0
    assert schedule_factor(30.0, 100.0, 1, SimpleNamespace(**{**vars(t), "warmup_steps": 4})) == 0.5
