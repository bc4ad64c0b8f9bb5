"""Comparison statistics: medians, speed-up ratios, accuracy z-scores, and the verdicts on the targets.

Every threshold of a verdict comes from :data:`~lipdeq.benchmarks.paper.profiles.TARGETS`, read
when the verdict is computed; each verdict carries its ``threshold`` so that the report labels it
with the number it was judged by.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from lipdeq.benchmarks.paper.profiles import TARGETS

__all__ = ["compare_pair", "equal_step", "eval_at", "last_common_step", "median", "points", "ratio",
           "summary_and_targets", "z_score"]


def median(values: Sequence[float | None]) -> float:
    """Median of the finite values (NaN when there is none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else float("nan")


def ratio(num: float | None, den: float | None) -> float:
    """``num / den`` for finite values and a positive ``den``; NaN otherwise (a speed-up not measured)."""
    if num is None or den is None or not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return float("nan")
    return num / den


def z_score(side: dict[str, Any]) -> float:
    """(Lipschitz - baseline accuracy) in standard errors of the difference (binomial, independent sets)."""
    se = math.hypot(side["lipschitz"].get("accuracy_se", float("nan")), side["baseline"].get("accuracy_se",
                                                                                            float("nan")))
    return (side["lipschitz"]["accuracy"] - side["baseline"]["accuracy"]) / se if se > 0 else float("nan")


def eval_at(entry: dict[str, Any], *, max_step: int | None = None, max_elapsed: float | None = None) -> dict | None:
    """The last evaluation with ``step <= max_step`` / ``elapsed <= max_elapsed``."""
    ok = [e for e in entry["evals"] if (max_step is None or e["step"] <= max_step)
          and (max_elapsed is None or e["elapsed"] <= max_elapsed)]
    return ok[-1] if ok else None


def last_common_step(a: Iterable[int], b: Iterable[int], limit: int) -> int | None:
    """The largest step in both ``a`` and ``b`` that is at most ``limit`` (None if there is none)."""
    common = set(a) & set(b)
    return max((s for s in common if s <= limit), default=None)


def equal_step(lip: dict[str, Any], base: dict[str, Any]) -> int | None:
    """The largest step at which both runs were evaluated, at most the shorter run's length.

    Usually the shorter run's last step: the Lipschitz run keeps a snapshot at the baseline's step
    count. When the Lipschitz run stops first (its time budget ran out, as on tiny test models whose
    fixed per-step costs dominate), the baseline may have no evaluation at that step; comparing the
    nearest earlier one would compare different steps, so the comparison moves to a common step
    (which :func:`~lipdeq.benchmarks.paper.running.measure_run` evaluates on both sides).
    ``None`` when the runs share no evaluated step.
    """
    return last_common_step((e["step"] for e in lip["evals"]), (e["step"] for e in base["evals"]),
                            min(lip["steps"], base["steps"]))


def compare_pair(lip: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Speed-ups and accuracies of a Lipschitz model against a baseline."""
    n = equal_step(lip, base)
    t = min(lip["train_seconds"], base["train_seconds"])
    lip_n, base_n = (eval_at(lip, max_step=n), eval_at(base, max_step=n)) if n else (None, None)
    # a run stops at the first step past its budget: allow one (median) step beyond t
    lip_t = eval_at(lip, max_elapsed=t + lip["step_time_all"])
    base_t = eval_at(base, max_elapsed=t + base["step_time_all"])
    m = n or 0  # no common step: no equal-steps window
    half = [r["step_time"] for r in lip["records"] if m / 2 < r["step"] <= m]
    half_b = [r["step_time"] for r in base["records"] if m / 2 < r["step"] <= m]

    def acc(e: dict | None) -> dict[str, Any]:
        return {"accuracy": e["accuracy"], "accuracy_se": e["accuracy_se"], "step": e["step"],
                "elapsed": e["elapsed"]} if e else {"accuracy": float("nan")}

    return {
        "lipschitz": lip["preset"],
        "baseline": base["preset"],
        "train_step_speedup": ratio(base["step_time_trained"], lip["step_time_trained"]),
        "train_step_speedup_equal_steps": ratio(median(half_b), median(half)),
        "inference_speedup": ratio(base["inference_s_per_image"], lip["inference_s_per_image"]),
        "inference_speedup_equal_steps": ratio(base_n["seconds_per_image"] if base_n else None,
                                               lip_n["seconds_per_image"] if lip_n else None),
        "equal_steps": {"steps": n, "baseline": acc(base_n), "lipschitz": acc(lip_n)},
        "equal_wallclock": {"seconds": t, "baseline": acc(base_t), "lipschitz": acc(lip_t)},
    }


def summary_and_targets(results: dict[str, Any], headline: tuple[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """results.json's ``summary`` (the headline pair) and ``targets`` (each verdict and its threshold)."""
    lip_name, base_name = headline
    pair = next(p for p in results["pairs"] if p["lipschitz"] == lip_name and p["baseline"] == base_name)
    wc, es = pair["equal_wallclock"], pair["equal_steps"]
    summary = {
        "profile": results["profile"],
        "dataset": results["dataset"],
        "device": results["device"],
        "date": results["date"],
        "command": results["command"],
        "baseline": base_name,
        "lipschitz": lip_name,
        "train_step_speedup": pair["train_step_speedup"],
        "inference_speedup": pair["inference_speedup"],
        "accuracy_baseline": wc["baseline"]["accuracy"],
        "accuracy_lipschitz": wc["lipschitz"]["accuracy"],
        "accuracy_basis": f"equal wall-clock ({wc['seconds']:.1f} s of training)",
        "accuracy_baseline_equal_steps": es["baseline"]["accuracy"],
        "accuracy_lipschitz_equal_steps": es["lipschitz"]["accuracy"],
        "equal_steps": es["steps"],
        "certificate_lipschitz": results["models"][lip_name].get("certificate_final"),
    }
    drop = es["baseline"]["accuracy"] - es["lipschitz"]["accuracy"]
    mem = results["memory"]
    goal = TARGETS  # read at each call: the verdicts follow the table as it stands
    train_min, infer_min = goal["train_step_speedup"], goal["inference_speedup"]
    drop_max, mem_max = goal["equal_steps_drop"], goal["memory_ratio"]
    targets = {
        "train_step_speedup": {"target": f">= {train_min}x", "threshold": train_min,
                               "measured": pair["train_step_speedup"],
                               "met": bool(pair["train_step_speedup"] >= train_min)},
        "inference_speedup": {"target": f">= {infer_min}x", "threshold": infer_min,
                              "measured": pair["inference_speedup"],
                              "met": bool(pair["inference_speedup"] >= infer_min)},
        "accuracy_equal_wallclock": {
            "target": "Lipschitz higher than the baseline",
            "measured": wc["lipschitz"]["accuracy"] - wc["baseline"]["accuracy"],
            "z": z_score(wc),
            "met": bool(wc["lipschitz"]["accuracy"] > wc["baseline"]["accuracy"]),
        },
        "accuracy_equal_steps": {
            "target": f"Lipschitz at most {points(drop_max)} below the baseline",
            "threshold": drop_max,
            "measured": -drop,
            "z": z_score(es),
            "met": bool(drop <= drop_max + 1e-12),  # a drop of exactly the threshold meets it despite rounding
        },
        "memory_flat": {"target": f"ratio f_thres {mem['f_thres'][-1]} / {mem['f_thres'][0]} <= {mem_max:.2f}",
                        "threshold": mem_max,
                        "measured": mem["ratio_ift"], "met": bool(mem["ratio_ift"] <= mem_max)},
    }
    return summary, targets


def points(fraction: float) -> str:
    """An accuracy difference given as a fraction, in percentage points: 0.01 -> "1 point"."""
    p = 100 * fraction
    return f"{p:g} point" + ("" if math.isclose(p, 1.0) else "s")
