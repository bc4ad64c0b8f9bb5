"""What a bench profile trains and measures, and the one table of targets its verdicts use."""

from __future__ import annotations

from dataclasses import dataclass

from lipdeq.benchmarks.memory import FLAT_RATIO

__all__ = ["FULL", "PROFILES", "QUICK", "SWEEP_KNOBS", "TARGETS", "Profile"]

SWEEP_KNOBS: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("relu_slope", (0.2, 0.4, 0.6, 0.8, 1.0)),
    ("conv_cap", (1.0, 2.0, 3.0)),
    ("alpha", (0.25, 0.5, 0.75)),
    ("beta", (0.15, 0.3, 0.6)),
)


@dataclass(frozen=True)
class Profile:
    """What a bench profile trains and measures (see :mod:`lipdeq.benchmarks.paper`)."""

    name: str
    baselines: tuple[str, ...]
    lipschitz: tuple[str, ...]
    headline: tuple[str, str]  # (Lipschitz preset, baseline preset) of results.json's summary
    overrides: tuple[str, ...]  # applied to every model's preset
    baseline_max_steps: int | None  # None: the preset's epochs
    match_baseline_time: bool  # Lipschitz models train for the headline baseline's elapsed time
    snapshots: int  # snapshot intervals per run
    max_evals: int | None  # evaluated snapshots per model (None: all)
    test_subset: int | None
    eval_batch_size: int
    probe_batch_size: int
    sweep_preset: str
    sweep_knobs: tuple[tuple[str, tuple[float, ...]], ...]
    sweep_steps: int
    sweep_test_subset: int | None
    trace_iters: int
    memory_f_thres: tuple[int, ...]
    memory_batch_size: int
    train_subset: int | None = None
    bn_recalibration_batches: int = 0  # re-estimate BatchNorm statistics before each evaluation


QUICK = Profile(
    name="quick",
    baselines=("mdeq_tiny",),
    lipschitz=("lipmdeq_tiny",),
    headline=("lipmdeq_tiny", "mdeq_tiny"),
    overrides=("train.batch_size=32", "train.pretrain_steps=0", "train.eval_batch_size=100"),
    baseline_max_steps=16,
    match_baseline_time=True,
    snapshots=2,
    max_evals=3,
    test_subset=500,
    eval_batch_size=100,
    probe_batch_size=32,
    sweep_preset="lipmdeq_tiny",
    sweep_knobs=SWEEP_KNOBS,
    sweep_steps=4,
    sweep_test_subset=100,
    trace_iters=30,
    memory_f_thres=(5, 30),
    memory_batch_size=8,
    bn_recalibration_batches=4,
)

FULL = Profile(
    name="full",
    baselines=("mdeq_large", "mdeq_large_reg"),
    lipschitz=("lipmdeq_large",),
    headline=("lipmdeq_large", "mdeq_large"),
    overrides=(),
    baseline_max_steps=None,
    match_baseline_time=False,
    snapshots=20,
    max_evals=None,
    test_subset=None,
    eval_batch_size=256,
    probe_batch_size=128,
    sweep_preset="lipmdeq_large",
    sweep_knobs=SWEEP_KNOBS,
    sweep_steps=50,
    sweep_test_subset=2000,
    trace_iters=60,
    memory_f_thres=(5, 15, 30),
    memory_batch_size=32,
)

PROFILES = {"quick": QUICK, "full": FULL}

# The one source of the headline's thresholds: the verdicts in results.json and the labels of
# results.md are both computed from this table (see compare.summary_and_targets).
TARGETS = {
    "train_step_speedup": 4.75,  # baseline / Lipschitz median train-step time, at least
    "inference_speedup": 4.0,  # baseline / Lipschitz seconds per test image, at least
    "equal_steps_drop": 0.01,  # accuracy (fraction) the Lipschitz model may lose at equal steps, at most
    "memory_ratio": FLAT_RATIO,  # implicit training memory at the largest / smallest forward cap, at most
}
