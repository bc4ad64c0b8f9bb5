"""Interrupted runs lose nothing: SIGINT/SIGTERM stop cleanly with a final checkpoint; SIGKILL at random
points loses at most the steps since the last checkpoint, and resuming reproduces (bitwise, CPU) the
weights of an uninterrupted run; a second writer of the same run directory is refused.

Torn and partial checkpoint files are covered in tests/training/test_checkpoint.py
(test_truncated_or_modified_file_is_never_loaded, test_process_death_mid_save).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lipdeq.configs import load_config
from lipdeq.training import RunDirError, load_checkpoint, train

STEPS = 8
EVERY = 2  # checkpoint_every_steps of the SIGKILL runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory, overrides) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted run of ``STEPS`` steps."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = train(load_config("lipmdeq_tiny", overrides(STEPS)), run, progress=False)
    assert result.step == STEPS
    return load_checkpoint(run / "checkpoints").model_state


def _cli(run: Path, sets: list[str], *flags: str) -> list[str]:
    cmd = [sys.executable, "-m", "lipdeq", "train", "--config", "lipmdeq_tiny", "--out", str(run), "--no-progress"]
    return cmd + list(flags) + [a for s in sets for a in ("--set", s)]


def _start(run: Path, sets: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(_cli(run, sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended (code {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _logged_steps(run: Path) -> list[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record.get("kind") == "train":
            steps.append(record["step"])
    return steps


def _latest_step(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoints" / "latest").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_with_a_final_checkpoint_and_resumes_exactly(tmp_path, reference, overrides, sig) -> None:
    run = tmp_path / "run"
    sets = overrides(STEPS)  # no periodic checkpoints: the one on disk must be the signal's
    proc = _start(run, sets)
    try:
        _wait_for(lambda: len(_logged_steps(run)) >= 2, proc, "two logged steps")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_by"] == f"signal:{sig.name}"
    ck = load_checkpoint(run / "checkpoints")
    assert 2 <= ck.step == summary["step"] < STEPS
    assert max(_logged_steps(run)) == ck.step  # nothing was applied after the checkpoint
    assert not (run / ".lock").exists()
    resumed = train(load_config("lipmdeq_tiny", sets), run, resume=True, progress=False)
    assert resumed.step == STEPS
    _assert_same(load_checkpoint(run / "checkpoints").model_state, reference)


def test_sigkill_at_random_points_loses_at_most_the_steps_since_the_last_checkpoint(
    tmp_path, reference, overrides
) -> None:
    """Three runs killed after their 1st, 2nd and 3rd periodic checkpoint, each after a random extra
    delay of up to ~1.5 steps (so the kill may land mid-step or mid-save); run concurrently."""
    rng = random.Random(1234)
    sets = overrides(STEPS, [f"train.checkpoint_every_steps={EVERY}"])
    runs = {k: tmp_path / f"kill{k}" for k in (1, 2, 3)}
    procs = {k: _start(run, sets) for k, run in runs.items()}
    try:
        pending = dict(procs)
        deadline = time.time() + 240
        while pending and time.time() < deadline:
            for k, proc in list(pending.items()):
                if _latest_step(runs[k]) >= k * EVERY:
                    time.sleep(rng.uniform(0.0, 0.3))
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=30)
                    del pending[k]
                elif proc.poll() is not None:
                    raise AssertionError(f"run {k} ended before its kill point: {proc.stderr.read()[-2000:]}")
            time.sleep(0.01)
        assert not pending, "timed out waiting for the kill points"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for k, run in runs.items():
        assert procs[k].returncode == -signal.SIGKILL
        ck = load_checkpoint(run / "checkpoints")  # the checksum-verified newest complete checkpoint
        logged = _logged_steps(run)
        last = max(logged) if logged else 0
        assert ck.step % EVERY == 0 and ck.step >= k * EVERY
        assert last - ck.step < EVERY, (k, ck.step, last)  # at most the steps since the last checkpoint
        assert (run / ".lock").exists()  # a dead writer's lock ...
        resumed = train(load_config("lipmdeq_tiny", sets), run, resume=True, progress=False)  # ... is taken over
        assert resumed.step == STEPS
        _assert_same(load_checkpoint(run / "checkpoints").model_state, reference)


def test_second_writer_of_a_run_directory_is_refused(tmp_path, overrides) -> None:
    """While a training process holds ``out/.lock``, another run on ``out`` is refused, with resume or
    overwrite alike, and the first run is unharmed (then stopped by SIGTERM, exit code 0)."""
    run = tmp_path / "run"
    proc = _start(run, overrides(500))
    try:
        _wait_for(lambda: len(_logged_steps(run)) >= 1, proc, "a logged step")
        cfg = load_config("lipmdeq_tiny", overrides(4))
        for flags in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(RunDirError, match=rf"pid {proc.pid}"):
                train(cfg, run, progress=False, **flags)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["stopped_by"] == "signal:SIGTERM"
    assert load_checkpoint(run / "checkpoints").step == max(_logged_steps(run))
