"""Run directories: refuse another run without --resume/--overwrite; exclusive lock across processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lipdeq.training.rundir as rundir_module
from lipdeq.training.rundir import RunDirError, RunDirLock, prepare_run_dir


def _lock_info(out: Path) -> dict:
    return json.loads((out / ".lock").read_text())


def _make_run(out: Path) -> None:
    (out / "checkpoints" / "last").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text('{"tag": "last"}')
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "config.yaml").write_text("train: {}\n")


def test_fresh_directory_is_created_locked_and_released(tmp_path: Path) -> None:
    out = tmp_path / "a" / "run"
    with prepare_run_dir(out, resume=False, overwrite=False) as run:
        assert isinstance(run, RunDirLock) and run.held and not run.resuming
        info = _lock_info(out)
        assert info["pid"] == os.getpid() and info["hostname"] == socket.gethostname()
        assert run.checkpoint_dir == out / "checkpoints" and run.metrics_path == out / "metrics.jsonl"
        assert run.latest_checkpoint is None
    assert not (out / ".lock").exists() and not run.held
    with prepare_run_dir(out, resume=False, overwrite=False):  # an empty directory is not a run
        pass


def test_lock_released_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(KeyError), prepare_run_dir(tmp_path, resume=False, overwrite=False):
        raise KeyError("boom")
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("artifact", ["checkpoints", "metrics"])
def test_existing_run_needs_a_flag(tmp_path: Path, artifact: str) -> None:
    if artifact == "checkpoints":
        (tmp_path / "checkpoints" / "last").mkdir(parents=True)
    else:
        (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError) as info:
        prepare_run_dir(tmp_path, resume=False, overwrite=False)
    message = str(info.value)
    assert str(tmp_path) in message and "--resume" in message and "--overwrite" in message
    assert not (tmp_path / ".lock").exists()


def test_resume_keeps_the_run(tmp_path: Path) -> None:
    _make_run(tmp_path)
    with prepare_run_dir(tmp_path, resume=True, overwrite=False) as run:
        assert run.resuming
        assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "checkpoints" / "last").is_dir()
    with prepare_run_dir(tmp_path / "new", resume=True, overwrite=False) as run:
        assert not run.resuming  # nothing to resume: a fresh start


def test_overwrite_removes_only_run_artifacts(tmp_path: Path) -> None:
    _make_run(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    with prepare_run_dir(tmp_path, resume=False, overwrite=True) as run:
        assert not run.resuming
        remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == [".lock", "notes.txt"]


def test_resume_and_overwrite_together_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mutually exclusive"):
        prepare_run_dir(tmp_path, resume=True, overwrite=True)


def test_a_file_is_not_a_run_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        prepare_run_dir(tmp_path / "f", resume=False, overwrite=False)


def test_second_lock_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with prepare_run_dir(tmp_path, resume=False, overwrite=False):
        with pytest.raises(RunDirError, match=r"another run \(this process\) is writing"):
            prepare_run_dir(tmp_path, resume=True, overwrite=False)
        assert _lock_info(tmp_path)["pid"] == os.getpid()  # the failed attempt did not disturb the lock
    assert not (tmp_path / ".lock").exists()


_HOLDER = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("rundir_under_test", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.prepare_run_dir(sys.argv[2], resume=False, overwrite=False):
        print("held", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """
)


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, rundir_module.__file__, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError) as info:
            prepare_run_dir(tmp_path, resume=True, overwrite=False)
        assert f"another run (pid {proc.pid}) is writing {tmp_path}" in str(info.value)
        with pytest.raises(RunDirError, match=f"pid {proc.pid}"):
            prepare_run_dir(tmp_path, resume=False, overwrite=True)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "released"
    finally:
        proc.communicate(timeout=60)
    with prepare_run_dir(tmp_path, resume=False, overwrite=False):
        assert _lock_info(tmp_path)["pid"] == os.getpid()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    (tmp_path / ".lock").write_text(
        json.dumps({"pid": dead_pid, "hostname": socket.gethostname(), "token": "old", "started": 0.0})
    )
    with prepare_run_dir(tmp_path, resume=False, overwrite=False):
        assert _lock_info(tmp_path)["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lock_from_another_host_is_not_touched(tmp_path: Path) -> None:
    content = json.dumps({"pid": 1, "hostname": "elsewhere.invalid", "token": "t", "started": 0.0})
    (tmp_path / ".lock").write_text(content)
    with pytest.raises(RunDirError, match=r"pid 1 on host elsewhere\.invalid.*delete .*\.lock"):
        prepare_run_dir(tmp_path, resume=False, overwrite=False)
    assert (tmp_path / ".lock").read_text() == content


def test_garbled_lock_is_an_error(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text("")
    with pytest.raises(RunDirError, match="empty or garbled"):
        prepare_run_dir(tmp_path, resume=False, overwrite=False)


def test_release_does_not_remove_a_lock_that_is_not_ours(tmp_path: Path) -> None:
    run = prepare_run_dir(tmp_path, resume=False, overwrite=False)
    foreign = json.dumps({"pid": 1, "hostname": "h", "token": "someone-else", "started": 0.0})
    (tmp_path / ".lock").write_text(foreign)
    run.release()
    assert (tmp_path / ".lock").read_text() == foreign
