"""The pair comparison: equal steps means the same step on both sides, even when the Lipschitz run stops first."""

from __future__ import annotations

import math
from typing import Any

from lipdeq.benchmarks.paper.compare import compare_pair, equal_step


def _run(preset: str, steps: int, eval_steps: list[int], step_time: float) -> dict[str, Any]:
    return {
        "preset": preset,
        "steps": steps,
        "train_seconds": steps * step_time,
        "step_time_all": step_time,
        "step_time_trained": step_time,
        "inference_s_per_image": step_time / 10,
        "records": [{"step": s, "step_time": step_time} for s in range(1, steps + 1)],
        "evals": [{"step": s, "elapsed": s * step_time, "accuracy": s / 100, "accuracy_se": 0.01,
                   "seconds_per_image": step_time / 10} for s in eval_steps],
    }


def test_equal_steps_at_the_baseline_step_count_when_the_lipschitz_run_is_longer() -> None:
    lip, base = _run("lip", 10, [2, 4, 6, 8, 10], 0.1), _run("base", 4, [2, 4], 1.0)
    pair = compare_pair(lip, base)
    assert pair["equal_steps"]["steps"] == 4
    assert pair["equal_steps"]["lipschitz"]["step"] == 4 == pair["equal_steps"]["baseline"]["step"]
    assert pair["train_step_speedup_equal_steps"] == 10.0


def test_equal_steps_move_to_a_common_step_when_the_lipschitz_run_stops_first() -> None:
    # the Lipschitz run ran out of time at step 3 (its final snapshot); the baseline has evaluations at 2 and 4
    lip, base = _run("lip", 3, [2, 3], 1.5), _run("base", 4, [2, 4], 1.0)
    assert equal_step(lip, base) == 2
    pair = compare_pair(lip, base)
    assert pair["equal_steps"]["lipschitz"]["step"] == 2 == pair["equal_steps"]["baseline"]["step"]
    assert pair["equal_steps"]["lipschitz"]["accuracy"] == 0.02


def test_no_common_step_gives_no_equal_steps_comparison() -> None:
    lip, base = _run("lip", 3, [3], 1.5), _run("base", 4, [2, 4], 1.0)
    assert equal_step(lip, base) is None
    pair = compare_pair(lip, base)
    assert math.isnan(pair["equal_steps"]["lipschitz"]["accuracy"])
    assert math.isnan(pair["train_step_speedup_equal_steps"])
    assert math.isnan(pair["inference_speedup_equal_steps"])
