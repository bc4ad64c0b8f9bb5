"""The time-to-accuracy arithmetic: evaluation grid, thresholds, speed-ups, standard errors, verdicts.

Pure functions of plain data (lists of evaluation dicts with ``elapsed``, ``epoch``, ``accuracy``
and ``num_images``), so that each figure of results.json can be recomputed by hand.

Time to a threshold: the training time of the *first evaluation* whose accuracy is at least the
threshold; no interpolation between evaluations (the crossing happened somewhere after the
previous evaluation, and a straight line between two noisy points would claim more than was
measured). The interval ``(previous evaluation, first evaluation]`` is reported beside it as
the bracket within which the crossing lies; the speed-up's bracket follows from the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lipdeq.benchmarks.paper.compare import ratio

__all__ = [
    "TARGETS",
    "THRESHOLDS",
    "binomial_se",
    "compare_accuracy",
    "eval_grid",
    "interval_means",
    "nearest_epoch",
    "speedup_to_threshold",
    "summarize",
    "threshold_bracket",
    "threshold_key",
    "time_to_threshold",
]

THRESHOLDS: tuple[float, ...] = tuple(k / 100 for k in range(10, 100, 5))  # 0.10, 0.15, ..., 0.95
TARGETS = {
    "time_to_threshold_speedup": 4.75,  # baseline / Lipschitz time to every threshold the baseline reaches, at least
    "equal_wallclock_z": 2.0,  # (Lipschitz - baseline accuracy) at equal wall-clock, in standard errors, more than
}


def threshold_key(threshold: float) -> str:
    """The JSON key of a threshold: ``0.1 -> "0.10"``."""
    return f"{threshold:.2f}"


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error ``sqrt(p (1 - p) / n)`` of an accuracy measured on ``n`` images (NaN for n = 0)."""
    if n <= 0:
        return float("nan")
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / n)


def eval_grid(budget: float, points: int, spacing: str = "geometric", span: float = 32.0) -> list[float]:
    """Nominal training times of the evaluated snapshots, ending at ``budget``.

    ``geometric``: from ``budget / span`` to ``budget`` at a constant ratio (the resolution of a
    time ratio is then the same at every accuracy, which is what a speed-up needs); ``linear``:
    ``budget * k / points`` for ``k = 1..points``.
    """
    if points < 1 or budget <= 0:
        raise ValueError(f"need points >= 1 and budget > 0, got {points} and {budget}")
    if spacing == "linear":
        return [budget * (k + 1) / points for k in range(points)]
    if spacing != "geometric":
        raise ValueError(f"spacing must be 'geometric' or 'linear', got {spacing!r}")
    if points == 1:
        return [budget]
    return [budget * span ** ((k - (points - 1)) / (points - 1)) for k in range(points)]


def _first_reaching(curve: Sequence[Mapping[str, Any]], threshold: float) -> int | None:
    for i, e in enumerate(curve):
        if e["accuracy"] >= threshold:
            return i
    return None


def time_to_threshold(curve: Sequence[Mapping[str, Any]],
                      thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float | None]:
    """Threshold key -> training seconds of the first evaluation at or above it (None: never reached).

    ``curve``: evaluations in training order (``elapsed``, ``accuracy``).
    """
    out: dict[str, float | None] = {}
    for t in thresholds:
        i = _first_reaching(curve, t)
        out[threshold_key(t)] = None if i is None else float(curve[i]["elapsed"])
    return out


def threshold_bracket(curve: Sequence[Mapping[str, Any]],
                      thresholds: Sequence[float] = THRESHOLDS) -> dict[str, list[float] | None]:
    """Threshold key -> ``[previous evaluation's time (0 for the first), first time at or above]``."""
    out: dict[str, list[float] | None] = {}
    for t in thresholds:
        i = _first_reaching(curve, t)
        out[threshold_key(t)] = None if i is None else [
            float(curve[i - 1]["elapsed"]) if i > 0 else 0.0, float(curve[i]["elapsed"])]
    return out


def speedup_to_threshold(lipschitz: Mapping[str, float | None],
                         baseline: Mapping[str, float | None]) -> dict[str, float]:
    """Threshold key -> baseline time / Lipschitz time, for the thresholds both reached."""
    return {k: ratio(baseline[k], lipschitz[k]) for k in baseline
            if baseline[k] is not None and lipschitz.get(k) is not None}


def _speedup_bracket(lip: Sequence[float], base: Sequence[float]) -> list[float]:
    """``[lowest, highest]`` ratio consistent with the two brackets (inf when the Lipschitz run
    reached the threshold at its first evaluation: its crossing may have been at any time before)."""
    low = base[0] / lip[1] if lip[1] > 0 else float("nan")
    high = base[1] / lip[0] if lip[0] > 0 else float("inf")
    return [low, high]


def interval_means(records: Sequence[Mapping[str, Any]], steps: Sequence[int],
                   keys: Sequence[str] = ("forward_nstep_mean", "backward_nstep_mean"),
                   ) -> list[dict[str, float | None]]:
    """Per snapshot step, the mean of each training-record key over the steps since the previous
    snapshot (``(previous, step]``); None where no record in the interval has the key (pretraining)."""
    out = []
    prev = 0
    for s in steps:
        row: dict[str, float | None] = {}
        for k in keys:
            vals = [r[k] for r in records if prev < r["step"] <= s and r.get(k) is not None]
            row[k] = sum(vals) / len(vals) if vals else None
        out.append(row)
        prev = s
    return out


def nearest_epoch(snapshots: Sequence[Mapping[str, Any]], epoch: float) -> Mapping[str, Any]:
    """The snapshot whose ``epoch`` is nearest ``epoch`` (the earlier one on a tie)."""
    if not snapshots:
        raise ValueError("no snapshots to choose from")
    return min(snapshots, key=lambda s: (abs(s["epoch"] - epoch), s["epoch"]))


def _point(e: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("step", "epoch", "elapsed", "accuracy", "num_images")
    return {**{k: e[k] for k in keys if k in e}, "accuracy_se": binomial_se(e["accuracy"], e["num_images"])}


def compare_accuracy(lip: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """Lipschitz and baseline evaluations side by side, with the difference (Lipschitz - baseline),
    its standard error (``hypot`` of the two: independent binomial errors; on the same test images
    the paired error is usually smaller, so this one errs on the cautious side) and their ratio ``z``."""
    diff = lip["accuracy"] - base["accuracy"]
    se = math.hypot(binomial_se(lip["accuracy"], lip["num_images"]), binomial_se(base["accuracy"], base["num_images"]))
    return {"lipschitz": _point(lip), "baseline": _point(base), "difference": diff, "difference_se": se,
            "z": diff / se if se > 0 else float("nan")}


def _threshold_verdict(tt: Mapping[str, Mapping[str, float | None]], br: Mapping[str, Mapping[str, Any]],
                       lip: str, base: str, factor: float) -> dict[str, Any]:
    """Per threshold the baseline reaches: the point speed-up against ``factor``, its bracket and
    whether the bracket decides the verdict; thresholds both runs reached at their first evaluation
    carry no time information and are listed as ``not_measured``."""
    rows: dict[str, Any] = {}
    not_measured = []
    for k, t_base in tt[base].items():
        if t_base is None:
            continue
        t_lip = tt[lip].get(k)
        if t_lip is None:
            rows[k] = {"speedup": None, "bracket": None, "met": False, "decided": True,
                       "note": f"{lip} never reached it"}
            continue
        b_lip, b_base = br[lip][k], br[base][k]
        if b_lip[0] == 0.0 and b_base[0] == 0.0:
            not_measured.append(k)
            continue
        s = ratio(t_base, t_lip)
        low, high = _speedup_bracket(b_lip, b_base)
        met = bool(s >= factor)
        rows[k] = {"speedup": s, "bracket": [low, high], "met": met,
                   "decided": bool(low >= factor) if met else bool(high < factor)}
    assessed = list(rows.values())
    return {
        "target": f"every threshold {base} reaches: {lip} reaches it in at most 1/{factor:g} of its time",
        "threshold": factor,
        "met": all(r["met"] for r in assessed) if assessed else None,
        "decided": all(r["decided"] for r in assessed) if assessed else False,
        "per_threshold": rows,
        "not_measured": not_measured,
    }


def summarize(models: Mapping[str, Mapping[str, Any]], lip: str, base: str,
              equal_epochs: Mapping[str, Any], thresholds: Sequence[float] = THRESHOLDS) -> tuple[dict, dict]:
    """results.json's ``summary`` and ``targets`` for the pair (``lip``, ``base``).

    ``models[name]`` has ``curve`` (evaluations on the fixed subset, in training order) and
    ``final`` (the last snapshot on the final images, or None when those were skipped: then the
    curve's last point stands in). ``equal_epochs``: ``{"epoch", "set_by", lip: eval, base: eval}``
    (see :func:`nearest_epoch`; both evaluations on the same images).
    """
    tt = {n: time_to_threshold(models[n]["curve"], thresholds) for n in (lip, base)}
    br = {n: threshold_bracket(models[n]["curve"], thresholds) for n in (lip, base)}
    end = {n: models[n]["final"] or models[n]["curve"][-1] for n in (lip, base)}
    wall = compare_accuracy(end[lip], end[base])
    epochs = compare_accuracy(equal_epochs[lip], equal_epochs[base])
    summary = {
        "lipschitz": lip,
        "baseline": base,
        "thresholds": [threshold_key(t) for t in thresholds],
        "time_to_threshold": tt,
        "time_to_threshold_bracket": br,
        "speedup_to_threshold": speedup_to_threshold(tt[lip], tt[base]),
        "final_accuracy": {n: end[n]["accuracy"] for n in (lip, base)},
        "final_accuracy_se": {n: binomial_se(end[n]["accuracy"], end[n]["num_images"]) for n in (lip, base)},
        "final_images": {n: end[n]["num_images"] for n in (lip, base)},
        "equal_wallclock": wall,
        "equal_epochs": {"epoch": equal_epochs["epoch"], "set_by": equal_epochs["set_by"], **epochs},
    }
    goal = TARGETS  # read at each call: the verdicts follow the table as it stands
    z_min = goal["equal_wallclock_z"]
    targets = {
        "time_to_threshold_speedup": _threshold_verdict(tt, br, lip, base, goal["time_to_threshold_speedup"]),
        "accuracy_equal_wallclock": {
            "target": f"{lip} more accurate at equal wall-clock by more than {z_min:g} standard errors",
            "threshold": z_min, "measured": wall["difference"], "se": wall["difference_se"], "z": wall["z"],
            "met": bool(wall["z"] > z_min),
        },
        "accuracy_equal_epochs": {
            "target": "the difference at equal epochs, reported whatever its sign",
            "measured": epochs["difference"], "se": epochs["difference_se"], "z": epochs["z"], "met": None,
        },
    }
    summary["verdicts"] = {k: v["met"] for k, v in targets.items()}  # details in results.json's targets
    return summary, targets
