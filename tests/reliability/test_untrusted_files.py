"""Untrusted files: a pickle planted in a checkpoint or a CIFAR-10 batch is never executed, and the CLI
refuses to write into a directory that holds another run unless told to.

Related tests elsewhere: tests/data/test_data_safe_pickle.py (restricted unpickler),
tests/training/test_checkpoint.py::test_pickles_and_other_files_are_rejected (torch.save files),
tests/training/test_rundir.py (locks and the overwrite/resume rules at the API level).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
from torch import nn

import lipdeq.cli
from lipdeq.training import CheckpointError, load_checkpoint, save_checkpoint


class _Touch:
    """Unpickling this object runs ``touch marker`` (what a malicious file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(marker: Path) -> bytes:
    payload = pickle.dumps({"weight": _Touch(marker)}, protocol=2)
    pickle.loads(payload)  # oracle: an ordinary unpickler runs the command ...
    assert marker.exists()
    marker.unlink()  # ... which is what must never happen below
    return payload


def _checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ckpts", model=nn.Linear(3, 2), config={"model": {"name": "tiny"}}, step=1,
                           epoch=0)


def test_pickle_in_place_of_model_safetensors_is_never_unpickled(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    path = _checkpoint(tmp_path)
    payload = _evil_pickle(marker)
    (path / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"checksum mismatch in .*model\.safetensors"):
        load_checkpoint(tmp_path / "ckpts")
    # an attacker who also rewrites the checksum in meta.json: the file is parsed only as safetensors
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["model.safetensors"] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"cannot decode .*model\.safetensors"):
        load_checkpoint(path)
    assert lipdeq.cli.main(["eval", "--checkpoint", str(path)]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert not marker.exists()


def test_planted_pickle_in_cifar_batch_is_rejected_by_the_cli(tmp_path: Path, capsys) -> None:
    """``lipdeq train --data-dir`` on a folder whose data_batch_1 is a malicious pickle: exit code 2, the
    message names the file and the forbidden global, and the command never ran."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(_evil_pickle(marker))
    argv = ["train", "--config", "lipmdeq_tiny", "--out", str(tmp_path / "run"), "--data-dir", str(folder),
            "--no-progress", "--set", "data.dataset=cifar10", "--set", "data.train_subset=16"]
    assert lipdeq.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "data_batch_1" in err and "system" in err
    assert not marker.exists()


def test_cli_refuses_a_directory_that_holds_another_run(tmp_path: Path, capsys, overrides) -> None:
    out = tmp_path / "run"
    (out / "checkpoints" / "last").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (out / "notes.txt").write_text("mine")
    argv = ["train", "--config", "lipmdeq_tiny", "--out", str(out), "--no-progress"]
    argv += [a for s in overrides(1) for a in ("--set", s)]
    assert lipdeq.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1}\n'  # untouched
    assert not (out / ".lock").exists()
    # asked explicitly, it replaces the run's artifacts (and only those)
    assert lipdeq.cli.main(argv + ["--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 1
    assert load_checkpoint(out / "checkpoints").step == 1
    assert (out / "notes.txt").read_text() == "mine"
