"""Checkpoints: exact resume, crash safety, and a clear error for every kind of bad file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from lipdeq.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    capture_rng_state,
    find_latest,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

CONFIG = {"model": {"name": "tiny_test", "channels": [4, 4]}, "train": {"lr": 0.01}, "preset": None}


class Tiny(nn.Module):
    """Linear + BatchNorm (buffers) + dropout (uses the RNG) + a tied output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(6, 3)
        self.register_buffer("bf16_buffer", torch.arange(3, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.bn(self.lin(x)))))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """One step whose batch draws from the torch, Python and NumPy global RNGs."""
    x = torch.randn(8, 4) * float(np.random.rand() + 0.5)
    y = torch.tensor([random.randrange(3) for _ in range(8)])
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _make(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Tiny()
    return model, torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _save(directory: Path, model: nn.Module, step: int, tag: str = "last", **kw: object) -> Path:
    args: dict = dict(
        model=model,
        optimizer=None,
        config=CONFIG,
        step=step,
        epoch=0,
        extra_state={},
        rng_state=None,
        tag=tag,
    )
    args.update(kw)
    return save_checkpoint(directory, **args)


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    _seed_all(0)
    model, opt = _make(0)
    for _ in range(2):
        _train_step(model, opt)
    save_checkpoint(
        tmp_path,
        model=model,
        optimizer=opt,
        config=CONFIG,
        step=2,
        epoch=0,
        extra_state={"batch": 2, "scheduler": {"last_epoch": 2}},
        rng_state=capture_rng_state(),
        tag="last",
    )
    for _ in range(2):
        _train_step(model, opt)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    def resumed(restore_rng: bool) -> dict[str, torch.Tensor]:
        _seed_all(123)
        other, other_opt = _make(7)
        ckpt = load_checkpoint(tmp_path)
        assert ckpt.extra_state == {"batch": 2, "scheduler": {"last_epoch": 2}}
        other.load_state_dict(ckpt.model_state)
        other_opt.load_state_dict(ckpt.optimizer_state)
        if restore_rng:
            assert set(restore_rng_state(ckpt.rng_state)) == set(ckpt.rng_state)
        for _ in range(2):
            _train_step(other, other_opt)
        return other.state_dict()

    got = resumed(True)
    assert set(got) == set(reference)
    for key in reference:
        assert torch.equal(got[key], reference[key]), key
    assert got["bn.num_batches_tracked"].item() == 4
    # control: the same resume without the RNG state diverges, so the comparison above is sensitive
    unrestored = resumed(False)
    assert not torch.equal(unrestored["lin.weight"], reference["lin.weight"])


def test_meta_contents_and_checksums(tmp_path: Path) -> None:
    model, opt = _make(0)
    extra = {"pos": (3, 4), "by_rank": {0: [1, 2], 1: [3]}, "best": math.inf, "name": "x", "__tensor__": 1}
    path = save_checkpoint(
        tmp_path / "ckpt",
        model=model,
        optimizer=opt,
        config=CONFIG,
        step=5,
        epoch=2,
        extra_state=extra,
        rng_state={"torch": torch.get_rng_state()},
        tag="epoch_2",
    )
    assert path == tmp_path / "ckpt" / "epoch_2"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == CHECKPOINT_FORMAT == "lipdeq-checkpoint-v1"
    assert meta["model_name"] == "tiny_test" and meta["step"] == 5 and meta["epoch"] == 2
    assert meta["config"] == CONFIG
    assert set(meta["files"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors"}
    for name, info in meta["files"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == info["sha256"]
    assert json.loads((tmp_path / "ckpt" / "latest").read_text())["tag"] == "epoch_2"
    ckpt = load_checkpoint(tmp_path / "ckpt" / "epoch_2" / "meta.json")
    assert ckpt.extra_state == extra and ckpt.step == 5 and ckpt.epoch == 2 and ckpt.config == CONFIG
    assert ckpt.model_state["bf16_buffer"].dtype == torch.bfloat16
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.model_state[key], value)
    with safe_open(str(path / "model.safetensors"), "pt") as fh:  # plain safetensors, readable by anyone
        assert set(fh.keys()) == set(model.state_dict())


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    path = _save(tmp_path, model, 1)
    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        assert len(list(fh.keys())) == 1
    fresh = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    fresh.load_state_dict(load_checkpoint(tmp_path).model_state)
    assert torch.equal(fresh[1].weight, model[0].weight)


def _hidden_entries(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if p.name.startswith(".tmp") or p.name.startswith(".latest")
    )


@pytest.mark.parametrize(("fail_at", "expected_step"), [(1, 1), (2, 1), (3, 2)])
def test_failed_rename_keeps_a_loadable_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int, expected_step: int
) -> None:
    model, _ = _make(0)
    _save(tmp_path, model, 1)
    real_replace, calls = os.replace, []

    def flaky_replace(src: object, dst: object) -> None:
        calls.append((src, dst))
        if len(calls) == fail_at:
            raise OSError("simulated failure")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with torch.no_grad():
        model.lin.weight.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, model, 2)
    monkeypatch.setattr(os, "replace", real_replace)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == expected_step
    assert torch.equal(ckpt.model_state["lin.weight"], model.lin.weight) == (expected_step == 2)
    assert _hidden_entries(tmp_path) == []
    _save(tmp_path, model, 3)  # the next save succeeds and removes every leftover
    assert load_checkpoint(tmp_path).step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "latest"]


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lipdeq.atomic as atomic

    model, opt = _make(0)
    _save(tmp_path, model, 1)
    real_write, calls = atomic.write_file, []

    def flaky_write(path: Path, data: bytes) -> dict:
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(data[: len(data) // 2])
            raise OSError("disk full")
        return real_write(path, data)

    monkeypatch.setattr(atomic, "write_file", flaky_write)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, model, 2, optimizer=opt)
    assert load_checkpoint(tmp_path).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "latest"]


_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    from lipdeq.training.checkpoint import save_checkpoint

    def run(directory, crash_at):
        model = torch.nn.Linear(2, 2)
        cfg = {"model": {"name": "crash"}}
        kw = dict(model=model, optimizer=None, config=cfg, epoch=0, extra_state={},
                  rng_state=None, tag="last")
        save_checkpoint(directory, step=1, **kw)
        real, calls = os.replace, []
        def dying_replace(src, dst):
            calls.append(1)
            if len(calls) == crash_at:
                os._exit(17)  # the process dies here: no cleanup, no rollback
            real(src, dst)
        os.replace = dying_replace
        save_checkpoint(directory, step=2, **kw)
        os._exit(0)

    # one interpreter, one forked writer per crash point (the parent runs no torch op before forking)
    for arg in sys.argv[1:]:
        directory, crash_at = arg.split("=")
        pid = os.fork()
        if pid == 0:
            run(directory, int(crash_at))
        _, status = os.waitpid(pid, 0)
        print(crash_at, os.waitstatus_to_exitcode(status))
    """
)
CRASHES = {1: 1, 2: 1, 3: 2}  # os.replace call at which the writer dies -> step that must load


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_process_death_mid_save(tmp_path: Path) -> None:
    """Kill the writer at each of the three renames: the directory always yields a complete checkpoint."""
    args = [f"{tmp_path / str(n)}={n}" for n in CRASHES]
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, *args], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == [w for n in CRASHES for w in (str(n), "17")]
    for crash_at, expected_step in CRASHES.items():
        directory = tmp_path / str(crash_at)
        assert any(p.name.startswith(".") for p in directory.iterdir())  # the dead writer left debris
        found = find_latest(directory)
        assert found is not None and not found.name.startswith(".tmp")
        assert load_checkpoint(directory, expected_model_name="crash").step == expected_step
        # a later save recovers and cleans up after the dead writer
        _save(directory, nn.Linear(2, 2), 3, model_name="crash")
        assert load_checkpoint(directory).step == 3
        assert sorted(p.name for p in directory.iterdir()) == ["last", "latest"]


def test_truncated_or_modified_file_is_never_loaded(tmp_path: Path) -> None:
    model, opt = _make(0)
    path = _save(tmp_path, model, 1, optimizer=opt)
    target = path / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"checksum mismatch in .*model\.safetensors"):
        load_checkpoint(tmp_path)
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    target.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"checksum mismatch in .*model\.safetensors"):
        load_checkpoint(path)
    target.write_bytes(data)
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is missing"):
        load_checkpoint(path)


def test_pickles_and_other_files_are_rejected(tmp_path: Path) -> None:
    model, _ = _make(0)
    pickled = tmp_path / "model.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(CheckpointError, match=r"model\.pt is .*never unpickles"):
        load_checkpoint(pickled)
    old_pickle = tmp_path / "old.pkl"
    torch.save(model.state_dict(), old_pickle, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"old\.pkl is a Python pickle"):
        load_checkpoint(old_pickle)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt is not a checkpoint"):
        load_checkpoint(text)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty holds no lipdeq checkpoint"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent")


def test_garbled_or_foreign_meta_is_rejected(tmp_path: Path) -> None:
    model, _ = _make(0)
    path = _save(tmp_path, model, 1)
    meta_path = path / "meta.json"
    good = meta_path.read_text()
    meta_path.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"meta\.json is not valid JSON"):
        load_checkpoint(path)
    meta_path.write_text(json.dumps({**json.loads(good), "format": "someone-else-v3"}))
    with pytest.raises(CheckpointError, match=r"meta\.json: format marker is 'someone-else-v3'"):
        load_checkpoint(path)
    meta_path.write_text(json.dumps({**json.loads(good), "files": {"../../etc/passwd": {"sha256": "0"}}}))
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(path)


def test_wrong_model_name_names_both(tmp_path: Path) -> None:
    model, _ = _make(0)
    _save(tmp_path, model, 1, config={"model": {"name": "lipmdeq_tiny"}})
    with pytest.raises(CheckpointError, match=r"meta\.json belongs to model 'lipmdeq_tiny'.*'mdeq_tiny'"):
        load_checkpoint(tmp_path, expected_model_name="mdeq_tiny")
    assert load_checkpoint(tmp_path, expected_model_name="lipmdeq_tiny").model_name == "lipmdeq_tiny"


def test_model_name_falls_back_to_the_models_own_config(tmp_path: Path) -> None:
    """Without a name in ``config``, the name comes from the model's ModelConfig (``model.cfg``)."""
    from lipdeq.models import create_model

    model = create_model("lipmdeq_tiny", channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4)
    path = _save(tmp_path, model, 1, config={"train": {"lr": 0.01}})
    assert json.loads((path / "meta.json").read_text())["model_name"] == "lipmdeq_tiny"
    assert load_checkpoint(tmp_path, expected_model_name="lipmdeq_tiny").model_name == "lipmdeq_tiny"
    _save(tmp_path / "plain", Tiny(), 1, config={})
    assert load_checkpoint(tmp_path / "plain").model_name == "Tiny"  # no config anywhere: the class name


def test_save_has_no_scheduler_state_parameter(tmp_path: Path) -> None:
    """The scheduler's state travels in ``extra_state`` (as the trainer stores it); no second channel."""
    with pytest.raises(TypeError, match="scheduler_state"):
        _save(tmp_path, Tiny(), 1, scheduler_state={"last_epoch": 1})
    assert not tmp_path.joinpath("last").exists()


def test_public_names_are_the_same_objects_everywhere() -> None:
    import lipdeq.training as training
    import lipdeq.training.checkpoint as checkpoint
    import lipdeq.training.rng as rng

    names = ["Checkpoint", "CheckpointError", "find_latest", "load_checkpoint", "save_checkpoint"]
    for name in [*names, "capture_rng_state", "restore_rng_state"]:
        assert getattr(training, name) is getattr(checkpoint, name), name
    assert checkpoint.capture_rng_state is rng.capture_rng_state
    assert checkpoint.restore_rng_state is rng.restore_rng_state


def test_non_finite_parameter_and_buffer_are_refused(tmp_path: Path) -> None:
    model, _ = _make(0)
    _save(tmp_path, model, 1)
    with torch.no_grad():
        model.lin.weight[0, 0] = math.nan
    with pytest.raises(CheckpointError, match=r"non-finite .* lin\.weight"):
        _save(tmp_path, model, 2)
    with torch.no_grad():
        model.lin.weight[0, 0] = 0.0
        model.bn.running_var[1] = math.inf
    with pytest.raises(CheckpointError, match=r"bn\.running_var"):
        _save(tmp_path, model, 3, tag="other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "latest"]
    assert load_checkpoint(tmp_path).step == 1
    with pytest.raises(CheckpointError):
        _save(tmp_path / "fresh", model, 1)
    assert not (tmp_path / "fresh").exists()


def test_find_latest_and_tags(tmp_path: Path) -> None:
    assert find_latest(tmp_path / "nothing") is None
    assert find_latest(tmp_path) is None
    model, _ = _make(0)
    _save(tmp_path, model, 7, tag="epoch_1")
    _save(tmp_path, model, 3, tag="best")
    assert find_latest(tmp_path) == tmp_path / "best"  # the pointer: most recently saved
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path) == tmp_path / "epoch_1"  # no pointer: the highest step
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(CheckpointError, match="not a valid 'latest' pointer"):
        find_latest(tmp_path)
    for bad in ["", ".hidden", "latest", "a/b", "x@y"]:
        with pytest.raises(ValueError, match="tag"):
            _save(tmp_path, model, 1, tag=bad)


def test_rng_capture_restore_round_trip() -> None:
    state = capture_rng_state()
    expected = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(2), np.random.randn())
    restore_rng_state(state)
    got = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(2), np.random.randn())
    assert torch.equal(expected[0], got[0]) and expected[1:3] == got[1:3]
    assert np.array_equal(expected[3], got[3]) and expected[4] == got[4]
    with pytest.raises(ValueError, match="unknown key"):
        restore_rng_state({"mystery": torch.zeros(1)})
