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
from lipdeq.cli import main
from lipdeq.configs import ConfigError, load_config
from lipdeq.training.checkpoint import find_latest
from lipdeq.training.rundir import (
    CONFIG_FILE,
    RunDirError,
    RunDirLock,
    config_written_by_lipdeq,
    metrics_written_by_lipdeq,
    prepare_run_dir,
    write_config,
)

CONFIG = {"model": {"name": "m"}, "data": {"data_dir": "1e5"}, "train": {"lr": 1e-06}, "preset": "lipmdeq_tiny"}


def _lock_info(out: Path) -> dict:
    return json.loads((out / ".lock").read_text())


def _make_run(out: Path) -> None:
    """What a run leaves: checkpoints, metrics records and the config.yaml that lipdeq wrote."""
    (out / "checkpoints" / "last").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text('{"tag": "last"}')
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "tr')  # torn by a crash
    write_config(out, CONFIG)


def test_fresh_directory_is_created_locked_and_released(tmp_path: Path) -> None:
    out = tmp_path / "a" / "run"
    with prepare_run_dir(out, resume=False, overwrite=False) as run:
        assert isinstance(run, RunDirLock) and run.held and not run.resuming
        info = _lock_info(out)
        assert info["pid"] == os.getpid() and info["hostname"] == socket.gethostname()
        assert run.checkpoint_dir == out / "checkpoints" and run.metrics_path == out / "metrics.jsonl"
        assert find_latest(run.checkpoint_dir) is None
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


def test_overwrite_keeps_a_config_yaml_that_lipdeq_did_not_write(tmp_path: Path) -> None:
    """Issue 14 item 5: --overwrite used to delete the user's own config.yaml along with the run."""
    _make_run(tmp_path)
    mine = "# my settings\nbase: lipmdeq_tiny\ntrain: {lr: 0.01}\n"
    (tmp_path / CONFIG_FILE).write_text(mine)
    with prepare_run_dir(tmp_path, resume=False, overwrite=True):
        remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == [".lock", CONFIG_FILE]
    assert (tmp_path / CONFIG_FILE).read_text() == mine


def test_overwrite_keeps_an_edited_config_yaml(tmp_path: Path) -> None:
    _make_run(tmp_path)
    path = tmp_path / CONFIG_FILE
    edited = path.read_text().replace("1.0e-06", "2.0e-06")
    path.write_text(edited)
    assert not config_written_by_lipdeq(path)
    with prepare_run_dir(tmp_path, resume=False, overwrite=True):
        pass
    assert path.read_text() == edited and not (tmp_path / "checkpoints").exists()


def test_a_foreign_config_yaml_is_never_replaced_and_nothing_is_touched(tmp_path: Path) -> None:
    _make_run(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("train: {}\n")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    for resume, overwrite in ((True, False), (False, True)):
        with pytest.raises(RunDirError, match=r"config\.yaml was not written by lipdeq.*move it out"):
            prepare_run_dir(tmp_path, resume=resume, overwrite=overwrite, config=CONFIG)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before
    assert (tmp_path / CONFIG_FILE).read_text() == "train: {}\n"


def test_overwrite_refuses_a_metrics_file_that_lipdeq_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "last").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(RunDirError, match=r"metrics\.jsonl was not written by lipdeq"):
        prepare_run_dir(tmp_path, resume=False, overwrite=True)
    assert (tmp_path / "metrics.jsonl").read_text() == "epoch,loss\n1,0.5\n"
    assert (tmp_path / "checkpoints" / "last").is_dir()
    assert not metrics_written_by_lipdeq(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text("")
    assert metrics_written_by_lipdeq(tmp_path / "metrics.jsonl")  # created, then the run died


def test_config_is_written_atomically_and_replaced_when_ours(tmp_path: Path) -> None:
    with prepare_run_dir(tmp_path, resume=False, overwrite=False, config=CONFIG) as run:
        assert config_written_by_lipdeq(run.config_path)
        text = run.config_path.read_text()
    assert text.startswith("# ") and "preset 'lipmdeq_tiny'" in text and "base: NAME" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE]  # no temporary left
    other = {**CONFIG, "train": {"lr": 0.5}}
    with prepare_run_dir(tmp_path, resume=True, overwrite=False, config=other):
        pass
    assert "lr: 0.5" in (tmp_path / CONFIG_FILE).read_text()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    debris = tmp_path / f".tmp@{CONFIG_FILE}@{int(dead.stdout)}@abc"
    debris.write_text("half")
    with prepare_run_dir(tmp_path, resume=True, overwrite=False):
        pass
    assert not debris.exists()  # a dead writer's temporary is removed


@pytest.mark.parametrize("preset", ["lipmdeq_tiny", "mdeq_large_reg"])
def test_config_yaml_loads_back_as_the_same_run_config(tmp_path: Path, preset: str) -> None:
    cfg = load_config(preset, ["train.max_steps=3", 'data.data_dir="1e5"', "model.dropout=0.0"])
    write_config(tmp_path, cfg.to_dict())
    again = load_config(tmp_path / CONFIG_FILE)
    assert again == cfg and again.preset == preset and again.data.data_dir == "1e5"


def test_a_recorded_preset_is_not_a_base(tmp_path: Path) -> None:
    """``preset:`` in a file records provenance; only ``base:`` starts from a preset."""
    path = tmp_path / "partial.yaml"
    path.write_text("preset: lipmdeq_tiny\ntrain: {lr: 0.01}\n")
    with pytest.raises(ConfigError, match=r"(?s)model is required but missing.*to start from one write 'base: NAME'"):
        load_config(path)
    path.write_text("base: lipmdeq_tiny\ntrain: {lr: 0.01}\n")
    assert load_config(path).preset == "lipmdeq_tiny" and load_config(path).train.lr == 0.01


TINY = ["--set", "model.channels=[8,8]", "--set", "model.head_channels=[4,4]", "--set", "model.final_channels=16",
        "--set", "model.num_groups=4", "--set", "data.dataset=synthetic", "--set", "data.train_subset=32",
        "--set", "data.test_subset=16", "--set", "train.batch_size=16", "--set", "train.max_steps=1",
        "--set", "train.num_threads=1", "--set", "model.f_thres=4", "--set", "model.b_thres=4"]


def test_train_writes_config_yaml_that_train_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--config", "lipmdeq_tiny", "--out", str(first), "--no-progress", *TINY]) == 0
    written = first / CONFIG_FILE
    assert config_written_by_lipdeq(written)
    cfg = load_config("lipmdeq_tiny", [item for item in TINY if item != "--set"])
    assert load_config(written) == cfg
    assert main(["train", "--config", str(written), "--out", str(second), "--no-progress"]) == 0
    assert (second / CONFIG_FILE).read_text() == written.read_text()
    # resuming in place from the run's own config.yaml, with a longer budget, updates it
    assert main(["train", "--config", str(written), "--out", str(first), "--resume", "--no-progress",
                 "--set", "train.max_steps=2"]) == 0
    assert load_config(written).train.max_steps == 2 and config_written_by_lipdeq(written)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2


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
