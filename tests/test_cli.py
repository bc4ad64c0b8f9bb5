"""The command line: exit codes, messages that name the problem, JSON output."""

from __future__ import annotations

import json

import pytest

from lipdeq.cli import main

TINY = ["--set", "model.channels=[8,8]", "--set", "model.head_channels=[4,4]", "--set", "model.final_channels=16",
        "--set", "model.num_groups=4", "--set", "data.dataset=synthetic", "--set", "data.train_subset=64",
        "--set", "data.test_subset=32", "--set", "train.batch_size=16", "--set", "train.max_steps=2",
        "--set", "train.num_threads=1"]


def test_train_then_eval_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "lipmdeq_tiny", "--out", str(out), "--no-progress", *TINY]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["stopped_by"] == "max_steps"
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["certificate"] < 1.0 and metrics["num_images"] == 32
    # the directory now holds a run: refused without --resume / --overwrite
    assert main(["train", "--config", "lipmdeq_tiny", "--out", str(out), "--no-progress", *TINY]) == 2
    assert str(out) in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,message",
    [("train.learning_rate=0.1", "train.learning_rate"), ("train.batch_size=12x", "train.batch_size"),
     ("model.dropuot=0.1", "model.dropuot")],
)
def test_bad_config_keys_are_named(tmp_path, capsys, override, message):
    code = main(["train", "--config", "lipmdeq_tiny", "--out", str(tmp_path / "r"), "--set", override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_eval_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"\x80\x04not a checkpoint")
    assert main(["eval", "--checkpoint", str(bogus)]) == 2
    assert "model.pt" in capsys.readouterr().err


def test_certify_and_models(capsys):
    assert main(["certify", "lipmdeq_tiny"]) == 0
    assert "Lip(f) <= 0.6912" in capsys.readouterr().out
    assert main(["certify", "mdeq_tiny"]) == 0
    assert "GroupNorm" in capsys.readouterr().out


def test_missing_cifar_directory_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(["train", "--config", "lipmdeq_tiny", "--out", str(tmp_path / "r"), "--data-dir", str(missing),
                 *TINY, "--set", "data.dataset=cifar10"])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err
