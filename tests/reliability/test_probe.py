"""Faults and bad inputs found by the second probe (issue 14, last item), one test per fault or family.

The broken or poorly handled ones failed before their fix; the handled-well ones pin the behaviour so
that a regression fails. Rows of docs/FAULTS.md ("Found by the second probe") name these tests.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lipdeq
from lipdeq.configs import ConfigError, load_config
from lipdeq.data import DataError
from lipdeq.data.cifar10 import load_cifar10
from lipdeq.errors import LipdeqError
from lipdeq.models import create_model
from lipdeq.solvers import Status, solve
from lipdeq.training import evaluate_checkpoint, load_checkpoint, train
from lipdeq.training.checkpoint import CheckpointError
from lipdeq.training.rundir import RunDirError

from .conftest import copy_run, tiny_overrides

SMALL = dict(channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4)


def _contraction(dtype=torch.float64):
    torch.manual_seed(0)
    A = torch.randn(8, 8, dtype=torch.float64)
    A *= 0.8 / torch.linalg.matrix_norm(A, ord=2)
    b = torch.randn(4, 8, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(8, dtype=torch.float64) - A, b.T).T
    return (lambda z: z @ A.T.to(z.dtype) + b.to(z.dtype)), z_star


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lipmdeq_tiny", **SMALL).eval()


# ================================================================== broken / handled poorly: fixed here


def test_checkpoints_path_that_is_a_file_is_refused_before_training(trained_run, tmp_path):
    # Was: --resume found no checkpoint in the file, trained from step 0, appended unsaved steps to
    # metrics.jsonl and died at the first save with "File exists" (exit 1): the work was lost.
    run = copy_run(trained_run, tmp_path / "run")
    import shutil

    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a directory")
    metrics_before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError, match=r"checkpoints.*not a directory"):
        train(load_config("lipmdeq_tiny", tiny_overrides(2)), run, resume=True, progress=False)
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    assert (run / "checkpoints").read_text() == "not a directory"  # --overwrite would not delete it either
    with pytest.raises(RunDirError, match=r"checkpoints.*not a directory"):
        train(load_config("lipmdeq_tiny", tiny_overrides(2)), run, overwrite=True, progress=False)
    assert (run / "checkpoints").read_text() == "not a directory"
    assert not (run / ".lock").exists()


@pytest.mark.parametrize("key, value", [("step", -5), ("epoch", -1), ("step", True)])
def test_meta_with_a_negative_or_boolean_position_is_refused(trained_run, tmp_path, key, value):
    # Was: a meta.json with step -5 resumed, trained, then crashed at the save with a ValueError traceback.
    run = copy_run(trained_run, tmp_path / "run")
    meta_path = run / "checkpoints" / "last" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta[key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"meta.json.*{key}"):
        load_checkpoint(run)


def _batch(path: Path, n: int = 10000) -> None:
    import numpy as np

    data = np.zeros((n, 3072), dtype=np.uint8)
    with open(path, "wb") as fh:
        pickle.dump({b"data": data, b"labels": [0] * n}, fh)


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_batch_path_that_is_not_a_regular_file_is_named_as_such(tmp_path, kind):
    # Was: "CIFAR-10 batch file ... is missing" for a directory or a /dev/zero symlink in its place.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    if kind == "directory":
        (folder / "data_batch_1").mkdir()
    else:
        (folder / "data_batch_1").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"data_batch_1.*not a regular file") as info:
        load_cifar10(tmp_path, "train", subset=10)
    assert "missing" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["anderson", "broyden", "picard"])
def test_solve_in_half_precision(dtype, method):
    # Was: Anderson (and Broyden) raised NotImplementedError "lu_cpu" not implemented for 'Half'.
    f, z_star = _contraction()
    sol = solve(f, torch.zeros(4, 8, dtype=dtype), method=method, tol=1e-2, max_iter=60)
    assert sol.value.dtype == dtype
    assert bool(torch.isfinite(sol.value).all())
    assert all(s == Status.CONVERGED for s in sol.statuses())
    err = (sol.value.double() - z_star).norm(dim=1) / z_star.norm(dim=1)
    assert float(err.max()) < 0.05


def test_solve_refuses_a_meta_z0():
    # Was: RuntimeError "Tensor.item() cannot be called on meta tensors" from inside the solver.
    with pytest.raises(ValueError, match="meta"):
        solve(lambda z: 0.5 * z, torch.zeros(4, 8, device="meta"))


def test_lipschitz_bound_refuses_an_unknown_mode():
    # Was: mode="bogus" returned a certificate labelled mode='bogus' (the weights' bound).
    with pytest.raises(ValueError, match=r"bogus.*hyper.*weights|bogus.*weights.*hyper"):
        _tiny_model().lipschitz_bound(mode="bogus")


def test_evaluate_checkpoint_refuses_a_string_of_overrides(trained_run):
    # Was: the string was iterated letter by letter: "override 'd' has no '='".
    with pytest.raises(ConfigError, match=r"sequence.*data.test_subset=8"):
        evaluate_checkpoint(trained_run, overrides="data.test_subset=8")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_is_refused_with_the_remedy(dtype):
    # Was: NotImplementedError "addmm_impl_cpu_" for 'ComplexHalf' / view_as_complex errors from the cap.
    model = _tiny_model().to(dtype)
    with pytest.raises(ValueError, match=rf"{str(dtype).split('.')[-1]}.*(autocast|float32)"):
        model(torch.randn(2, 3, 32, 32, dtype=dtype))


def test_empty_config_name_is_named_as_empty():
    with pytest.raises(ConfigError, match="empty"):
        load_config("")


def test_config_from_dict_refuses_a_string_of_overrides():
    from lipdeq.configs import config_from_dict

    data = load_config("lipmdeq_tiny").to_dict()
    with pytest.raises(ConfigError, match="sequence"):
        config_from_dict(data, "train.lr=0.1")


# ================================================================== handled well: pinned


_YAML_CASES = {
    "loop": ("base: other.yaml\n", "'base' chain loops"),
    "self": ("base: case.yaml\n", "'base' chain loops"),
    "python_tag": ("base: lipmdeq_tiny\ntrain:\n  lr: !!python/object/apply:os.system ['true']\n", "constructor"),
    "tab": ("base: lipmdeq_tiny\ntrain:\n\tmax_steps: 1\n", r"line 3.*'\\t'"),
    "yes_for_enum": ("base: lipmdeq_tiny\ntrain:\n  amp: on\n", "train.amp.*bool"),
    "base_list": ("base: [lipmdeq_tiny]\n", "'base' must be a preset name"),
    "duplicate_base": ("base: lipmdeq_tiny\nbase: mdeq_tiny\n", "duplicate key 'base'"),
    "two_documents": ("base: lipmdeq_tiny\n---\ntrain: {max_steps: 1}\n", "another document"),
    "date": ("base: lipmdeq_tiny\ntrain:\n  lr: 2024-01-01\n", "train.lr.*date"),
    "int_key": ("base: lipmdeq_tiny\n1: 2\n", "mapping key 1 is not a string"),
    "float_for_int": ("base: lipmdeq_tiny\ntrain:\n  max_steps: 1e1\n", "train.max_steps: expected int"),
}


@pytest.mark.parametrize("case", sorted(_YAML_CASES))
def test_yaml_edge_cases_are_named(tmp_path, case):
    text, match = _YAML_CASES[case]
    (tmp_path / "other.yaml").write_text("base: case.yaml\n")
    (tmp_path / "case.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "case.yaml")


def test_yaml_spellings_that_are_accepted(tmp_path):
    (tmp_path / "a.yaml").write_bytes(b"\xef\xbb\xbfbase: lipmdeq_tiny\ntrain:\n  lr: 1e-3\n  max_steps: 1_000\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert cfg.train.lr == 0.001 and cfg.train.max_steps == 1000  # BOM, 1e-3 is a float, 1_000 an int
    (tmp_path / "b.yaml").write_text("base: lipmdeq_tiny\ntrain:\n  max_steps: ~\n")
    assert load_config(tmp_path / "b.yaml").train.max_steps is None


@pytest.mark.parametrize("override, match", [
    ("train.max_steps=true", "expected int, got bool"),
    ("model=5", "model: expected mapping"),
    ("model.channels=[8,8,8]", "head_channels has 2 entries but channels has 3"),
    ("model.num_groups=3", "not divisible by num_groups=3"),
])
def test_override_edge_cases_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("lipmdeq_tiny", [*tiny_overrides(1), override])


def test_override_with_spaces_around_key_and_value():
    assert load_config("lipmdeq_tiny", [" train.lr = 0.1"]).train.lr == 0.1


@pytest.mark.parametrize("fault, match", [
    ("latest_traversal", "not a valid 'latest' pointer"),
    ("latest_empty", "not a valid 'latest' pointer"),
    ("only_hidden_tag", "holds no lipdeq checkpoint"),
    ("safetensors_file", "is not a checkpoint"),
    ("only_config_yaml", "holds no lipdeq checkpoint"),
    ("shape_mismatch", "weights do not fit model"),
])
def test_run_directory_faults_are_named(trained_run, tmp_path, fault, match):
    run = copy_run(trained_run, tmp_path / "run")
    ck = run / "checkpoints"
    target: Path = run
    if fault == "latest_traversal":
        (ck / "latest").write_text(json.dumps({"tag": "../../elsewhere", "step": 2, "epoch": 0}))
    elif fault == "latest_empty":
        (ck / "latest").write_text("")
    elif fault == "only_hidden_tag":
        (ck / "latest").unlink()
        (ck / "last").rename(ck / ".hidden")
    elif fault == "safetensors_file":
        target = ck / "last" / "model.safetensors"
    elif fault == "only_config_yaml":
        import shutil

        shutil.rmtree(ck)
        (run / "metrics.jsonl").unlink()
    elif fault == "shape_mismatch":  # meta.json (not checksummed itself) edited to another width
        meta_path = ck / "last" / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["config"]["model"]["channels"] = [16, 16]
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(LipdeqError, match=match):
        evaluate_checkpoint(target, overrides=["data.test_subset=8"])


def test_symlinked_run_and_tag_directories_evaluate(trained_run, tmp_path):
    (tmp_path / "link").symlink_to(trained_run)
    ck = copy_run(trained_run, tmp_path / "run") / "checkpoints"
    (ck / "other").symlink_to(trained_run / "checkpoints" / "last")
    (ck / "latest").write_text(json.dumps({"tag": "other", "step": 2, "epoch": 0}))
    for path in (tmp_path / "link", ck.parent):
        assert evaluate_checkpoint(path, overrides=["data.test_subset=8"])["step"] == 2


def test_latest_pointer_step_is_not_trusted_over_meta(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "checkpoints" / "latest").write_text(json.dumps({"tag": "last", "step": 999, "epoch": 5}))
    assert load_checkpoint(run).step == 2
    result = train(load_config("lipmdeq_tiny", tiny_overrides(3)), run, resume=True, progress=False)
    assert result.step == 3


def test_empty_batch_file_and_missing_test_batch_fail_before_training(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"")
    with pytest.raises(DataError, match=r"data_batch_1.*(truncated|corrupt)"):
        load_cifar10(folder, "train", subset=10)
    _batch(folder / "data_batch_1")
    cfg = load_config("lipmdeq_tiny", [*tiny_overrides(2), "data.dataset=cifar10",
                                       f"data.data_dir={json.dumps(str(tmp_path / 'data'))}"])
    with pytest.raises(DataError, match="test_batch.*missing"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("call, exc, match", [
    (lambda f, z0: solve(f, z0.to(torch.complex64)), TypeError, "floating-point"),
    (lambda f, z0: solve(f, z0, tol=torch.tensor(1e-6)), TypeError, "tol must be a real number"),
    (lambda f, z0: solve(f, z0, max_iter=True), TypeError, "max_iter must be an int"),
    (lambda f, z0: solve(f, z0, method="newton"), ValueError, "valid methods"),
    (lambda f, z0: solve(lambda z: z.to("meta"), z0), TypeError, "preserve dtype and device"),
    (lambda f, z0: lipdeq.fixed_point(lambda z: (z,), z0), TypeError, "must return a torch.Tensor"),
])
def test_solver_api_misuse_is_named(call, exc, match):
    f, _ = _contraction()
    with pytest.raises(exc, match=match):
        call(f, torch.zeros(4, 8, dtype=torch.float64))


def test_solver_api_odd_but_valid_inputs():
    f, z_star = _contraction()
    base = solve(f, torch.zeros(4, 8, dtype=torch.float64), tol=1e-8, stop_mode="abs").value
    assert torch.allclose(base, z_star, atol=1e-6)
    noncontig = solve(f, torch.zeros(8, 4, dtype=torch.float64).T, tol=1e-8, stop_mode="abs").value
    assert torch.equal(noncontig, base)
    with torch.inference_mode():
        assert torch.equal(solve(f, torch.zeros(4, 8, dtype=torch.float64), tol=1e-8, stop_mode="abs").value, base)
    sol = solve(f, torch.zeros(4, 8, dtype=torch.float64, requires_grad=True), tol=1e-8, stop_mode="abs")
    assert not sol.value.requires_grad
    torch.manual_seed(1)
    W = torch.nn.Parameter(0.1 * torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    g = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            z, _ = lipdeq.fixed_point(g, torch.zeros(4, 8))
        assert not z.requires_grad
    z, _ = lipdeq.fixed_point(g, torch.zeros(4, 8), f_tol=1e-6, b_tol=1e-6)
    loss = z.sum()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)  # a second backward over the same graph gives the same gradient


def test_model_memory_layouts_and_grad_modes_give_the_same_logits():
    model = _tiny_model()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5)
    assert torch.allclose(model(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)), ref, atol=1e-5)
    assert model(x[:1].expand(2, 3, 32, 32)).shape == (2, 10)
    with torch.inference_mode():
        assert torch.allclose(model(x), ref, atol=1e-5)
    with pytest.raises(ValueError, match="32x32 images, got 33x33"):
        model(torch.randn(2, 3, 33, 33))
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['chanels'\]"):
        create_model("lipmdeq_tiny", chanels=[8, 8])


def _cli(run: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "lipdeq", "train", "--config", "lipmdeq_tiny", "--out", str(run), "--no-progress"]
    for item in tiny_overrides(400, sets):
        cmd += ["--set", item]
    return cmd


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _default_sigint() -> None:
    """Run in the child before exec: a test process started in the background inherits SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler, so the signal would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_startup_leaves_no_lock_and_no_traceback(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=_default_sigint)
    time.sleep(1.0)  # inside the imports and the set-up
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert "Traceback" not in err
    # 130 (the CLI caught KeyboardInterrupt) or -SIGINT: seen once on a loaded machine after "interrupted" was
    # printed; both are the conventional outcomes of SIGINT, and what matters is no traceback and no lock
    interrupted = proc.returncode in (130, -signal.SIGINT)
    assert interrupted or (proc.returncode == 0 and '"stopped_by": "signal:SIGINT"' in out), (out, err)
    assert not (run / ".lock").exists()


def test_second_sigint_does_not_break_the_final_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode in (0, 130), err
    ck = load_checkpoint(run)  # whatever the second signal did, the checkpoint on disk is complete
    assert 1 <= ck.step < 400
    assert not (run / ".lock").exists()


def test_eval_while_training_reads_only_complete_checkpoints(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run, "train.max_steps=30", "train.checkpoint_every_steps=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    seen = []
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / "checkpoints" / "latest").exists():
            seen.append(load_checkpoint(run).step)  # raises CheckpointError on a torn checkpoint
        time.sleep(0.02)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert seen and seen == sorted(seen)
