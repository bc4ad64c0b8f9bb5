"""Shared fixtures of the reliability tests: tiny training configurations on the synthetic dataset."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

SMALL_MODEL = [
    "model.channels=[8,8]", "model.head_channels=[4,4]", "model.final_channels=16", "model.num_groups=4",
    "model.f_thres=8", "model.b_thres=8",
]


def tiny_overrides(steps: int, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Overrides for a seconds-long lipmdeq_tiny run on 96 synthetic images (6 steps per epoch)."""
    return [
        *SMALL_MODEL, "data.dataset=synthetic", "data.train_subset=96", "data.test_subset=32",
        "train.batch_size=16", "train.eval_batch_size=32", f"train.max_steps={steps}", "train.log_every=1",
        "train.num_threads=1", *extra,
    ]


@pytest.fixture(scope="session")
def overrides() -> Callable[..., list[str]]:
    """``overrides(steps, extra=())``: the tiny synthetic run's ``--set`` values."""
    return tiny_overrides


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A 2-step lipmdeq_tiny run (small widths, synthetic data) with a final checkpoint. Shared: tests
    that change a run work on :func:`copy_run` of it."""
    from lipdeq.configs import load_config
    from lipdeq.training import train

    run = tmp_path_factory.mktemp("trained") / "run"
    result = train(load_config("lipmdeq_tiny", tiny_overrides(2)), run, progress=False)
    assert result.step == 2
    return run


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of run directory ``src`` at ``dst`` that a test may change (without a lock file)."""
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst
