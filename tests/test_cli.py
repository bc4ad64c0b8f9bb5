"""The command line: exit codes, messages that name the problem, JSON output.

A :class:`lipdeq.LipdeqError` prints one line and exits 2; an ``OSError`` prints one line naming the
path and exits 1; any other exception (a bug, CUDA out of memory) propagates from ``main`` with its
traceback, so the console script exits 1 with the traceback printed.
"""

from __future__ import annotations

import json
import subprocess
import sys

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


# --- user errors, OS errors and bugs ---------------------------------------------------------------


def _user_error_classes() -> list[tuple[type, type]]:
    from lipdeq.configs import ConfigError
    from lipdeq.data import DataError
    from lipdeq.models.mdeq import NotAContractionError
    from lipdeq.optional import MissingExtraError
    from lipdeq.training import CheckpointError
    from lipdeq.training.rundir import RunDirError
    from lipdeq.training.trainer import NonFiniteTrainingError

    return [(ConfigError, ValueError), (DataError, ValueError), (CheckpointError, ValueError),
            (RunDirError, ValueError), (NotAContractionError, ValueError), (NonFiniteTrainingError, RuntimeError),
            (MissingExtraError, ImportError)]


def test_every_user_error_is_a_lipdeq_error_and_keeps_its_old_base():
    import lipdeq
    from lipdeq.errors import LipdeqError

    assert lipdeq.LipdeqError is LipdeqError
    for cls, old_base in _user_error_classes():
        assert issubclass(cls, LipdeqError) and issubclass(cls, old_base), cls


@pytest.mark.parametrize("index", range(7))
def test_a_lipdeq_error_is_one_line_and_exit_2(monkeypatch, capsys, index):
    import lipdeq.cli

    cls = _user_error_classes()[index][0]

    def fail(args):
        raise cls("invalid configuration from preset 'p':\n  train.lr: must be > 0\n  model.alpha: must be < 1")

    monkeypatch.setattr(lipdeq.cli, "cmd_models", fail)
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == ("lipdeq models: error: invalid configuration from preset 'p': "
                   "train.lr: must be > 0; model.alpha: must be < 1\n")


@pytest.mark.parametrize("exc", [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 AssertionError("internal invariant"), ValueError("a bug, not a user error"),
                                 TypeError("unsupported operand")])
def test_programming_and_resource_errors_propagate(monkeypatch, exc):
    import lipdeq.cli

    def fail(args):
        raise exc

    monkeypatch.setattr(lipdeq.cli, "cmd_models", fail)
    with pytest.raises(type(exc), match=str(exc).split(".")[0]):
        main(["models"])


def test_out_of_memory_shows_its_traceback_and_exits_1():
    # The console script runs main() like this: an uncaught error prints its traceback, exit status 1.
    code = ("import lipdeq.cli as cli\n"
            "def boom(args):\n    raise RuntimeError('CUDA out of memory')\n"
            "cli.cmd_models = boom\nraise SystemExit(cli.main(['models']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "in boom" in proc.stderr
    assert proc.stderr.strip().endswith("RuntimeError: CUDA out of memory")


def test_os_error_names_the_path(tmp_path, capsys):
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("x")
    code = main(["train", "--config", "lipmdeq_tiny", "--out", str(not_a_dir / "run"), "--no-progress", *TINY])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(not_a_dir / "run") in err and "Not a directory" in err


def test_os_error_without_a_path_names_the_output_directory(monkeypatch, tmp_path, capsys):
    import errno

    import lipdeq.cli

    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lipdeq.cli, "cmd_train", disk_full)
    assert main(["train", "--config", "lipmdeq_tiny", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err == f"lipdeq train: error: No space left on device (while working in {str(tmp_path / 'run')!r})\n"


@pytest.mark.parametrize(
    "argv,message",
    [(["demo", "--steps", "0"], "--steps: value must be >= 1, got 0"),
     (["demo", "--seconds", "-1"], "--seconds: value must be > 0.0"),
     (["demo", "--steps", "many"], "--steps: expected an integer, got 'many'"),
     (["bench", "solvers", "--batch-size", "0"], "--batch-size: value must be >= 1"),
     (["train", "--config", "c", "--out", "o", "--resume", "--overwrite"], "not allowed with argument --resume"),
     (["train", "--config", "c", "--out", "o", "--device", "gpu"], "--device: unknown device 'gpu'"),
     (["eval", "--checkpoint", "c", "--device", "mps"], "--device: device 'mps' is not supported"),
     (["eval", "--checkpoint", "c", "--device", "cuda:7"], "--device: device 'cuda:7'")],
)
def test_bad_arguments_are_usage_errors(capsys, argv, message):
    if argv[-1] == "cuda:7":
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a CUDA device 7")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_model_is_one_line(capsys):
    assert main(["certify", "lipmdeq_tiyn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'lipmdeq_tiyn'" in err and "lipmdeq_tiny" in err


def test_cifar_subset_larger_than_the_split_is_one_line(tmp_path, capsys, real_cifar_dir):
    code = main(["train", "--config", "lipmdeq_tiny", "--out", str(tmp_path / "r"), "--data-dir",
                 str(real_cifar_dir), *TINY, "--set", "data.dataset=cifar10", "--set", "data.test_subset=10001"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "subset must be <= 10000" in err


def test_batch_larger_than_the_data_is_one_line(tmp_path, capsys):
    code = main(["train", "--config", "lipmdeq_tiny", "--out", str(tmp_path / "r"), "--no-progress", *TINY,
                 "--set", "data.train_subset=8"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leaves no batch" in err
