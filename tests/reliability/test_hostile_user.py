"""What a careful, slightly hostile new user broke (issue 14), one test per fault; each failed before its fix.

Rows of docs/FAULTS.md name these tests.
"""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from lipdeq.configs import load_config
from lipdeq.errors import LipdeqError
from lipdeq.models import create_model
from lipdeq.solvers import SolverWarning, solve
from lipdeq.training import evaluate_checkpoint, load_checkpoint, train

from .conftest import SMALL_MODEL, copy_run, tiny_overrides


# ---------------------------------------------------------------- 1. a stale certificate
def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lipmdeq_tiny", channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4).eval()


def test_certificate_follows_writes_through_data():
    model = _tiny_model()
    before = model.lipschitz_bound().value
    with torch.no_grad():
        for p in model.layer.parameters():
            p.data.mul_(4)  # .data writes do not bump the autograd version counter
    fresh = _tiny_model()
    fresh.load_state_dict(model.state_dict())
    expected = fresh.lipschitz_bound().value
    assert expected > 2 * before  # the edit matters
    assert model.lipschitz_bound().value == pytest.approx(expected, rel=1e-12)


def test_certificate_follows_vector_to_parameters():
    model = _tiny_model()
    model.lipschitz_bound()
    params = list(model.layer.parameters())
    vec = torch.nn.utils.parameters_to_vector(params)
    torch.nn.utils.vector_to_parameters(vec * 3, params)
    fresh = _tiny_model()
    fresh.load_state_dict(model.state_dict())
    assert model.lipschitz_bound().value == pytest.approx(fresh.lipschitz_bound().value, rel=1e-12)


def test_certificate_of_non_finite_weights_is_infinite_not_a_crash():
    model = _tiny_model()
    with torch.no_grad():
        next(model.layer.parameters()).data.fill_(float("nan"))
    cert = model.lipschitz_bound()
    assert cert.value == math.inf and "NaN" in cert.reason


def test_zero_lipschitz_constant_is_accepted_for_a_constant_map():
    """Weights blown up by a huge learning rate can make every capped weight exactly 0: the layer is then
    constant and its certificate 0, which the solver used to refuse ("must lie in (0, 1)")."""
    c = torch.randn(3, 5, dtype=torch.float64)
    sol = solve(lambda z: c.expand_as(z), torch.zeros(3, 5, dtype=torch.float64), tol=1e-12, lipschitz=0.0)
    assert bool(sol.converged.all()) and torch.equal(sol.value, c)
    assert torch.equal(sol.error_bound, torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------- 2. a state without a batch dimension
def _coupled_system(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A *= 0.9 / torch.linalg.matrix_norm(A, ord=2)
    return A, torch.randn(n, generator=g, dtype=torch.float64)


def test_one_dimensional_state_is_refused_with_the_fix():
    A, b = _coupled_system()
    with pytest.raises(ValueError, match=r"batch dimension.*unsqueeze\(0\)"):
        solve(lambda z: A @ z + b, torch.zeros(8, dtype=torch.float64), method="anderson", tol=1e-8, lipschitz=0.9)


@pytest.mark.parametrize("method", ["anderson", "picard", "broyden"])
def test_batch_coupling_never_gives_a_silent_false_bound(method):
    """f mixes the samples of the batch (the 1-D case reshaped wrongly): per-sample stopping and the
    per-sample error bounds rest on an assumption f breaks; the solver must say so, not report a bound
    below the true error."""
    A, b = _coupled_system()
    z_star = torch.linalg.solve(torch.eye(8, dtype=torch.float64) - A, b)
    # a (8, 1) state whose "samples" are the entries of one vector that f couples
    coupled = lambda z: (A @ z.reshape(-1) + b).reshape(z.shape)  # noqa: E731
    with pytest.warns(SolverWarning, match="couple"):
        sol = solve(coupled, torch.zeros(8, 1, dtype=torch.float64), method=method, tol=1e-8, lipschitz=0.9,
                    stop_mode="abs", max_iter=200)
    err = (sol.value.reshape(-1) - z_star).abs()
    # whatever it reports must not be a certificate below the truth
    assert sol.error_bound is None or bool((sol.error_bound >= err).all()) or not bool(sol.converged.any())


def test_per_sample_map_is_not_flagged():
    A, b = _coupled_system()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        sol = solve(lambda z: z @ A.T + b, torch.zeros(4, 8, dtype=torch.float64), method="anderson", tol=1e-10,
                    lipschitz=0.9, stop_mode="abs", max_iter=200)
    assert bool(sol.converged.all())


def test_a_sample_whose_norm_overflowed_is_not_read_as_coupling():
    """A sample stopped on an overflowing ||f(z)|| keeps an infinite residual: that is not a moving one."""
    import warnings

    def f(z):
        out = 0.9 * z + 1.0
        out[0] = z[0] * 1e30 + 1e30
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        sol = solve(f, torch.zeros(2, 3), method="picard", tol=1e-6, stop_mode="abs", max_iter=50)
    assert [int(s) for s in sol.status] == [2, 1]  # DIVERGED, MAX_ITER


# ---------------------------------------------------------------- 3. evaluation overrides change the model
def test_eval_refuses_overrides_that_change_the_model(trained_run):
    with pytest.raises(LipdeqError, match=r"model\.relu_slope"):
        evaluate_checkpoint(trained_run, overrides=["model.relu_slope=1.0"])
    with pytest.raises(LipdeqError, match=r"model\.conv_cap"):
        evaluate_checkpoint(trained_run, overrides=["model.conv_cap=50.0"])


def test_eval_accepts_data_and_solver_overrides(trained_run):
    stored = evaluate_checkpoint(trained_run, overrides=["data.test_subset=16"])
    assert stored["num_images"] == 16
    tighter = evaluate_checkpoint(trained_run, overrides=["data.test_subset=16", "model.f_thres=12"])
    assert tighter["certificate"] == stored["certificate"]


# ---------------------------------------------------------------- 4. resume ignores the stored configuration
@pytest.mark.parametrize("change, key", [
    (["model.conv_cap=50.0", "model.relu_slope=1.0"], "model.conv_cap"),
    (["train.batch_size=32"], "train.batch_size"),
    (["train.seed=7"], "train.seed"),
    (["data.train_subset=64"], "data.train_subset"),
])
def test_resume_refuses_changes_that_alter_the_run(trained_run, tmp_path, change, key):
    run = copy_run(trained_run, tmp_path / "run")
    before = load_checkpoint(run).step
    with pytest.raises(LipdeqError, match=key.replace(".", r"\.")):
        train(load_config("lipmdeq_tiny", tiny_overrides(4, change)), run, resume=True, progress=False)
    assert load_checkpoint(run).step == before  # nothing was written


def test_resume_accepts_safe_changes(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    result = train(load_config("lipmdeq_tiny", tiny_overrides(3, ["train.log_every=2"])), run, resume=True,
                   progress=False)
    assert result.step == 3


def test_resume_with_nothing_to_resume_is_an_error(tmp_path):
    with pytest.raises(LipdeqError, match="nothing to resume"):
        train(load_config("lipmdeq_tiny", tiny_overrides(1)), tmp_path / "typo", resume=True, progress=False)
    assert not (tmp_path / "typo" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- 6-8. the demo
SHRINK = [*SMALL_MODEL[:4], "data.train_subset=32", "data.test_subset=16", "train.num_threads=1"]


def test_demo_does_not_overwrite_a_training_run(trained_run, tmp_path):
    from lipdeq.demo import run_demo

    out = tmp_path / "runs"
    user_run = copy_run(trained_run, out / "lipmdeq_tiny")
    before = sorted(p.relative_to(user_run) for p in user_run.rglob("*"))
    with pytest.raises(LipdeqError, match="lipmdeq_tiny"):
        run_demo(out, steps=1, extra_overrides=SHRINK)
    assert sorted(p.relative_to(user_run) for p in user_run.rglob("*")) == before


@pytest.mark.parametrize("kwargs", [{"seconds_per_model": 0.0}, {"seconds_per_model": -5.0},
                                    {"seconds_per_model": math.nan}, {"steps": 0}, {"steps": -1}])
def test_demo_refuses_budgets_that_are_not_budgets(tmp_path, kwargs):
    from lipdeq.demo import run_demo

    with pytest.raises(LipdeqError, match="seconds|steps"):
        run_demo(tmp_path, extra_overrides=SHRINK, **kwargs)
    assert not any(tmp_path.iterdir())


def test_demo_cli_refuses_zero_seconds(capsys):
    from lipdeq.cli import main

    try:
        code = main(["demo", "--seconds", "0"])
    except SystemExit as exit_:  # argparse refuses it while parsing
        code = exit_.code
    assert code == 2
    assert "seconds" in capsys.readouterr().err


def test_demo_stops_on_a_signal_and_writes_no_result(tmp_path, monkeypatch):
    """SIGINT during the first model: no second model, no summary, no plot, a non-zero outcome."""
    import lipdeq.demo as demo

    trained: list[str] = []
    real_train = demo.train

    def train_then_signal(cfg, out, **kw):
        trained.append(cfg.model.name)
        on_step = kw.get("on_step")

        def step_and_interrupt(rec):
            if on_step is not None:
                on_step(rec)
            signal.raise_signal(signal.SIGINT)

        return real_train(cfg, out, **{**kw, "on_step": step_and_interrupt})

    monkeypatch.setattr(demo, "train", train_then_signal)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path, steps=5, extra_overrides=SHRINK)
    assert trained == ["lipmdeq_tiny"]
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "demo.png").exists()


# ---------------------------------------------------------------- 9. devices
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_device_is_an_error(device):
    from lipdeq.training.distributed import setup_distributed

    with pytest.raises(LipdeqError, match="device"):
        setup_distributed(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error_in_train_and_eval(trained_run):
    from lipdeq.training.distributed import setup_distributed

    with pytest.raises(LipdeqError, match="CUDA"):
        setup_distributed("cuda:1")
    with pytest.raises(LipdeqError, match="CUDA"):
        evaluate_checkpoint(trained_run, device="cuda")


# ---------------------------------------------------------------- 10. a small YAML that costs minutes
def test_alias_bomb_is_rejected_quickly_and_briefly(tmp_path):
    import tracemalloc

    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 9):  # 9**9 = 387,420,489 leaves if expanded
        levels.append(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
                      f"*a{i - 1}, *a{i - 1}, *a{i - 1}]")
    text = "base: lipmdeq_tiny\nx:\n" + "\n".join("  " + line for line in levels) + "\nmodel:\n  channels: *a8\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert path.stat().st_size < 1000
    tracemalloc.start()
    try:
        with pytest.raises(LipdeqError) as info:
            load_config(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(str(info.value)) < 2000
    assert peak < 50 * 2**20


def test_deeply_nested_wrong_value_is_shortened_without_materialising(tmp_path):
    path = tmp_path / "nested.yaml"
    path.write_text("base: lipmdeq_tiny\nmodel:\n  final_channels: " + "[" * 50 + "1" + "]" * 50 + "\n")
    with pytest.raises(LipdeqError, match="model.final_channels") as info:
        load_config(path)
    assert len(str(info.value)) < 2000


# ---------------------------------------------------------------- also: wrong num_classes, model input checks
def test_labels_outside_num_classes_fail_before_training(tmp_path):
    cfg = load_config("lipmdeq_tiny", tiny_overrides(1, ["model.num_classes=3"]))
    with pytest.raises(LipdeqError, match="num_classes"):
        train(cfg, tmp_path / "run", progress=False)
    # the corrected rerun is not blocked by leftovers
    train(load_config("lipmdeq_tiny", tiny_overrides(1)), tmp_path / "run", progress=False)


@pytest.mark.parametrize("make, match", [
    (lambda: torch.zeros(0, 3, 32, 32), "empty"),
    (lambda: torch.zeros(2, 3, 32, 32, dtype=torch.float64), "dtype"),
    (lambda: torch.zeros(2, 3, 32, 32, device="meta"), "device"),
])
def test_model_input_checks(make, match):
    model = create_model("lipmdeq_tiny", channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4)
    with pytest.raises(ValueError, match=match):
        model(make())


def test_meta_json_errors_name_the_file(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    metas = sorted((run / "checkpoints").rglob("meta.json"))
    assert metas
    meta = json.loads(metas[0].read_text())
    meta["step"] = "three"
    metas[0].write_text(json.dumps(meta))
    with pytest.raises(LipdeqError, match="meta.json"):
        load_checkpoint(metas[0].parent)
    metas[0].unlink()
    with pytest.raises(LipdeqError, match="meta.json"):
        load_checkpoint(metas[0].parent)


def test_run_stopped_before_its_first_checkpoint_restarts_on_resume(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LipdeqError, match="num_classes"):  # a run directory set up, then no checkpoint
        train(load_config("lipmdeq_tiny", tiny_overrides(1, ["model.num_classes=3"])), run, progress=False)
    (run / "metrics.jsonl").write_text("")  # as if killed before the first record
    with pytest.warns(UserWarning, match="no checkpoint yet"):
        result = train(load_config("lipmdeq_tiny", tiny_overrides(1)), run, resume=True, progress=False)
    assert result.step == 1


def test_resume_keeps_config_yaml_in_step_with_the_run(trained_run, tmp_path):
    from lipdeq.training.rundir import CONFIG_FILE

    run = copy_run(trained_run, tmp_path / "run")
    train(load_config("lipmdeq_tiny", tiny_overrides(3)), run, resume=True, progress=False)
    assert load_config(run / CONFIG_FILE).train.max_steps == 3
    with pytest.raises(LipdeqError, match=r"train\.batch_size"):
        train(load_config("lipmdeq_tiny", tiny_overrides(4, ["train.batch_size=32"])), run, resume=True,
              progress=False)
    assert load_config(run / CONFIG_FILE).train.max_steps == 3  # a refused resume does not rewrite it


def test_signal_during_the_final_evaluation_stops_within_a_batch(tmp_path, monkeypatch):
    """Ctrl-C during the final evaluation used to wait for the whole evaluation (minutes for MDEQ)."""
    import lipdeq.training.trainer as trainer

    seen: list[dict] = []
    real_evaluate = trainer.evaluate

    def evaluate_after_a_signal(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # arrives as the evaluation starts
        out = real_evaluate(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(trainer, "evaluate", evaluate_after_a_signal)
    result = train(load_config("lipmdeq_tiny", tiny_overrides(2, ["train.eval_batch_size=8"])), tmp_path / "run",
                   progress=False)
    assert seen and seen[0]["interrupted"] and seen[0]["num_images"] == 0
    assert result.stopped_by == "signal:SIGINT" and result.final_eval == {}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] == "eval"]  # a partial evaluation is not a result
    assert load_checkpoint(tmp_path / "run").step == 2  # the final checkpoint is still written
