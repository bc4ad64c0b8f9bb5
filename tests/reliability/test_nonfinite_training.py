"""Non-finite values during training: injected NaN loss, NaN in f for one sample, Inf gradients and
NaN weights. Policy under test (lipdeq.training.trainer): the step is not applied, it is counted in
``skipped_steps`` (metrics.jsonl and the result), the run goes on, and ``train.max_nonfinite_in_row``
consecutive bad steps stop it with NonFiniteTrainingError; no checkpoint ever holds non-finite weights.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lipdeq.cli
import lipdeq.models.mdeq as mdeq_module
import lipdeq.training.step as step_module
import lipdeq.training.trainer as trainer_module
from lipdeq.configs import load_config
from lipdeq.training import CheckpointError, NonFiniteTrainingError, load_checkpoint, train


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (a finite loss with a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad * float("inf")


class Injector:
    """Monkeypatches the trainer so that attempt ``k`` (the k-th call of the training loss, from 0) can
    get a NaN loss, NaN in f for sample 0, an Inf gradient, or NaN weights after its optimizer step;
    records the parameters and buffers at the start of every attempt, and the optimizer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, nan_loss=(), nan_f=(), inf_grad=(), nan_weights=()):
        self.nan_loss, self.nan_f, self.inf_grad = set(nan_loss), set(nan_f), set(inf_grad)
        self.nan_weights = set(nan_weights)
        self.attempt = 0
        self.models: list[torch.nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.snapshots: list[dict[str, torch.Tensor]] = []
        inj = self

        class RecordingModel(trainer_module.MultiscaleDEQ):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                inj.models.append(self)

            def forward(self, *args, **kwargs):
                if self.training:  # the model state each training attempt starts from
                    state = {f"param:{n}": p.detach().clone() for n, p in self.named_parameters()}
                    state.update({f"buffer:{n}": b.detach().clone() for n, b in self.named_buffers()})
                    inj.snapshots.append(state)
                return super().forward(*args, **kwargs)

        def build_optimizer(model, cfg):
            opt = real_build(model, cfg)
            inj.optimizers.append(opt)
            real_step = opt.step

            def step(self, *args, **kwargs):
                out = real_step(*args, **kwargs)
                if inj.attempt - 1 in inj.nan_weights:  # the attempt whose loss was just computed
                    with torch.no_grad():
                        next(model.parameters()).view(-1)[0] = float("nan")
                return out

            opt.step = types.MethodType(step, opt)  # bound, as LambdaLR's step tracking expects
            return opt

        def cross_entropy(logits, y, *args, **kwargs):
            k = inj.attempt
            inj.attempt += 1
            if k in inj.inf_grad:
                logits = _InfGrad.apply(logits)
            loss = F.cross_entropy(logits, y, *args, **kwargs)
            return loss * float("nan") if k in inj.nan_loss else loss

        def fixed_point(f, z0, **kwargs):
            if inj.models and inj.models[-1].training and inj.attempt in inj.nan_f:
                def f_nan(z):
                    out = f(z)
                    return torch.cat([out[:1] * float("nan"), out[1:]])

                return real_fixed_point(f_nan, z0, **kwargs)
            return real_fixed_point(f, z0, **kwargs)

        real_build = trainer_module.build_optimizer
        real_fixed_point = mdeq_module.fixed_point
        monkeypatch.setattr(trainer_module, "MultiscaleDEQ", RecordingModel)
        monkeypatch.setattr(trainer_module, "build_optimizer", build_optimizer)
        monkeypatch.setattr(step_module, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
        monkeypatch.setattr(mdeq_module, "fixed_point", fixed_point)

    def same(self, a: int, b: int) -> bool:
        """Whether parameters and buffers at the start of attempts ``a`` and ``b`` are bitwise equal."""
        return all(torch.equal(self.snapshots[a][n], self.snapshots[b][n]) for n in self.snapshots[a])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


@pytest.mark.filterwarnings("ignore::lipdeq.solvers.SolverWarning")
def test_bad_steps_are_skipped_counted_and_the_run_goes_on(tmp_path, monkeypatch, overrides) -> None:
    """Attempts 1 (NaN loss), 3 (NaN in f for one sample: status NON_FINITE) and 4 (Inf gradient) are
    skipped: 5 steps take 8 attempts, and a skipped attempt leaves parameters AND buffers bitwise as
    they were. Regression: the forward of attempt 3 used to leave NaN in the head's BatchNorm running
    statistics (the step was skipped but the buffers kept the NaN), so the run crashed at its final
    checkpoint ("refusing to save a checkpoint: non-finite values in head...running_mean")."""
    bad = {1, 3, 4}
    inj = Injector(monkeypatch, nan_loss={1}, nan_f={3}, inf_grad={4})
    cfg = load_config("lipmdeq_tiny", overrides(5, ["train.grad_clip=1.0"]))
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 5 and result.skipped_steps == 3 and result.stopped_by == "max_steps"
    assert inj.attempt == 8
    for k in range(7):  # model state at the start of attempt k+1 vs k: unchanged exactly when k was bad
        assert inj.same(k, k + 1) == (k in bad), k
    # Adam took exactly one step per applied update
    opt = inj.optimizers[-1]
    assert {int(s["step"]) for s in opt.state.values()} == {5}
    records = [r for r in _records(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    # attempts 0 2 5 6 7 are steps 1..5; the count is logged with the next applied step
    assert [r["skipped_steps"] for r in records] == [0, 1, 3, 3, 3]
    assert all(all(v == v for v in r.values() if isinstance(v, float)) for r in records)  # no NaN logged
    ck = load_checkpoint(tmp_path / "run" / "checkpoints")
    assert ck.step == 5 and ck.extra_state["skipped_steps"] == 3 and _all_finite(ck.model_state)
    assert result.final_eval["accuracy"] == result.final_eval["accuracy"]  # eval (running stats) not NaN


def test_consecutive_bad_steps_stop_with_a_clear_error_and_a_finite_checkpoint(
    tmp_path, monkeypatch, overrides, capsys
) -> None:
    """Three NaN losses in a row with ``max_nonfinite_in_row=3``: the CLI exits 2 naming the policy; the
    checkpoint on disk is the last applied step's, finite; the lock is released, and the run resumes."""
    Injector(monkeypatch, nan_loss={2, 3, 4})
    run = tmp_path / "run"
    sets = overrides(6, ["train.max_nonfinite_in_row=3", "train.checkpoint_every_steps=1"])
    argv = ["train", "--config", "lipmdeq_tiny", "--out", str(run), "--no-progress"]
    code = lipdeq.cli.main(argv + [a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 consecutive steps with a non-finite loss, gradient or fixed point" in err
    assert "Lower train.lr or check the data" in err and str(run / "checkpoints") in err
    ck = load_checkpoint(run / "checkpoints")
    assert ck.step == 2 and _all_finite(ck.model_state)
    assert not (run / ".lock").exists()
    monkeypatch.undo()  # the fault is gone: resuming completes the run
    result = train(load_config("lipmdeq_tiny", sets), run, resume=True, progress=False)
    assert result.step == 6


def test_nonfinite_error_is_raised_by_the_library(tmp_path, monkeypatch, overrides) -> None:
    Injector(monkeypatch, inf_grad={0, 1})
    cfg = load_config("lipmdeq_tiny", overrides(4, ["train.max_nonfinite_in_row=2"]))
    with pytest.raises(NonFiniteTrainingError, match=r"2 consecutive steps .*\(step 0\)"):
        train(cfg, tmp_path / "run", progress=False)


@pytest.mark.filterwarnings("ignore::lipdeq.solvers.SolverWarning")
def test_nan_weights_never_reach_a_checkpoint(tmp_path, monkeypatch, overrides) -> None:
    """An optimizer step that writes NaN into a weight (attempt 2): the periodic checkpoint after it is
    refused (CheckpointError names the tensor) and the one on disk stays the finite step-2 checkpoint."""
    Injector(monkeypatch, nan_weights={2})
    run = tmp_path / "run"
    cfg = load_config("lipmdeq_tiny", overrides(6, ["train.checkpoint_every_steps=1"]))
    with pytest.raises(CheckpointError, match=r"refusing to save a checkpoint: non-finite values \(nan/inf\) in "):
        train(cfg, run, progress=False)
    ck = load_checkpoint(run / "checkpoints")
    assert ck.step == 2 and _all_finite(ck.model_state)
    assert not (run / ".lock").exists()
