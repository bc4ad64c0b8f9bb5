"""End to end on the real CIFAR-10 copy: train, evaluate, resume exactly, survive SIGKILL, torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lipdeq.configs import load_config
from lipdeq.training import evaluate_checkpoint, load_checkpoint, train

SMALL_MODEL = [
    "model.channels=[8,8]", "model.head_channels=[4,4]", "model.final_channels=16", "model.num_groups=4",
    "model.f_thres=8", "model.b_thres=8",
]


def _overrides(data_dir: Path, steps: int, extra: list[str] = ()) -> list[str]:
    return [
        *SMALL_MODEL, "data.dataset=cifar10", f"data.data_dir={json.dumps(str(data_dir))}",
        "data.train_subset=96", "data.test_subset=32", "train.batch_size=16", "train.eval_batch_size=32",
        f"train.max_steps={steps}", "train.log_every=1", "train.num_threads=1", *extra,
    ]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints").model_state


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


@pytest.mark.parametrize("preset", ["lipmdeq_tiny", "mdeq_tiny"])
def test_train_evaluate_and_resume_exactly(tmp_path, real_cifar_dir, preset):
    # 96 images / batch 16 = 6 steps per epoch: stopping at 4 and resuming crosses an epoch boundary at 6.
    extra = ["train.pretrain_steps=2"] if preset == "mdeq_tiny" else []
    full = train(load_config(preset, _overrides(real_cifar_dir, 8, extra)), tmp_path / "full", progress=False)
    assert full.step == 8 and full.stopped_by == "max_steps"
    part = train(load_config(preset, _overrides(real_cifar_dir, 4, extra)), tmp_path / "part", progress=False)
    assert part.step == 4
    resumed = train(load_config(preset, _overrides(real_cifar_dir, 8, extra)), tmp_path / "part", resume=True,
                    progress=False)
    assert resumed.step == 8
    _assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "part"))

    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 9))
    assert all(r["forward_nstep_mean"] >= 1 for r in train_records if not r["pretrain"])

    metrics = evaluate_checkpoint(tmp_path / "full")
    assert metrics["num_images"] == 32 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["accuracy"] == pytest.approx(full.final_eval["accuracy"])
    if preset.startswith("lip"):
        assert metrics["certificate"] < 1.0 and metrics["error_bound_max"] < 1.0
    else:
        assert metrics["certificate"] == float("inf")


def test_sigkill_leaves_a_readable_checkpoint_and_resume_matches(tmp_path, real_cifar_dir):
    overrides = _overrides(real_cifar_dir, 10, ["train.checkpoint_every_steps=2"])
    reference = train(load_config("lipmdeq_tiny", overrides), tmp_path / "ref", progress=False)
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lipdeq", "train", "--config", "lipmdeq_tiny", "--out", str(run), "--no-progress"]
    cmd += [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        latest = run / "checkpoints" / "latest"
        while time.time() < deadline and not latest.exists():
            time.sleep(0.05)
        assert latest.exists(), "no checkpoint appeared"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ck = load_checkpoint(run / "checkpoints")
    assert 2 <= ck.step < 10
    resumed = train(load_config("lipmdeq_tiny", overrides), run, resume=True, progress=False)
    assert resumed.step == reference.step == 10
    _assert_same_weights(_weights(tmp_path / "ref"), _weights(run))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torchrun(tmp_path, real_cifar_dir):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "lipdeq", "train", "--config", "lipmdeq_tiny", "--out", str(run),
           "--no-progress", "--device", "cpu"]
    cmd += [a for o in _overrides(real_cifar_dir, 3) for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        proc.communicate()
        pytest.fail("torchrun did not finish within 300 s")
    assert proc.returncode == 0, err[-3000:]
    ck = load_checkpoint(run / "checkpoints")
    assert ck.step == 3
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if json.loads(line)["kind"] == "train"]) == 3  # rank 0 only writes
