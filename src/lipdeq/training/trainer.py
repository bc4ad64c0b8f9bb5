"""The training loop: one short loop with DDP, bf16 autocast, exact resume and a non-finite policy.

Rank 0 writes everything (metrics, checkpoints); every rank runs the same loop. Checkpoints hold
the weights, optimizer and schedule, RNG and data-order state, so ``resume=True`` continues
mid-epoch exactly where the run stopped (bit-identical on CPU).
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lipdeq.configs import ConfigError, RunConfig, config_from_dict
from lipdeq.data import BatchIterator, load_dataset
from lipdeq.errors import LipdeqError
from lipdeq.models import MultiscaleDEQ
from lipdeq.solvers import SolverWarning
from lipdeq.training.checkpoint import (
    capture_rng_state,
    find_latest,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from lipdeq.training.compat import RESUME_SAFE, check_compatible
from lipdeq.training.distributed import (
    DistContext,
    all_ranks_true,
    all_reduce_sum,
    cleanup_distributed,
    setup_distributed,
)
from lipdeq.training.evaluate import evaluate
from lipdeq.training.precise_bn import precise_bn_batches
from lipdeq.training.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    RunDirError,
    config_written_by_lipdeq,
    prepare_run_dir,
    write_config,
)
from lipdeq.training.step import train_step, use_jacobian_penalty


class NonFiniteTrainingError(LipdeqError, RuntimeError):
    """Raised after ``train.max_nonfinite_in_row`` consecutive steps with a non-finite value."""


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    out_dir: Path
    step: int
    epoch: int
    stopped_by: str
    final_eval: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0
    checkpoint: Path | None = None
    train_seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False)
    """The trained model (in memory, on its device; the unwrapped module under DDP)."""


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str, lr: float, min_lr: float) -> float:
    """Multiplier of the base lr at optimizer step ``step``: linear warm-up, then per-step cosine
    from ``lr`` to ``min_lr`` over ``total_steps`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total_steps - warmup, 1), 1.0)
    return (min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))) / lr


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """Adam or SGD over all parameters, as the run configuration says."""
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


class _MetricsWriter:
    """metrics.jsonl (always) and TensorBoard (when installed), rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.file = open(out_dir / METRICS_FILE, "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / TENSORBOARD_DIR))
            except Exception:  # tensorboard is optional
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class _SolverWarningGate:
    """Re-entrant context around each forward and backward: the first SolverWarning of a run is shown,
    later ones are only counted (``solver_warnings`` in metrics.jsonl; every step's solver statistics
    are logged anyway). Other warnings pass through unchanged."""

    def __init__(self) -> None:
        self.count = 0
        self._catcher: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []

    def __enter__(self) -> _SolverWarningGate:
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._catcher.__exit__(*exc)
        for w in self._caught:
            if issubclass(w.category, SolverWarning):
                self.count += 1
                if self.count > 1:
                    continue
                message = f"{w.message} (later solver warnings of this run are counted in metrics.jsonl)"
                warnings.warn_explicit(message, w.category, w.filename, w.lineno)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class _StopSignal:
    """Turns SIGINT / SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` as ``cfg.train`` says, writing into ``out_dir``.

    Works in one process or under ``torchrun`` (DDP). ``resume`` continues from the latest
    checkpoint in ``out_dir``; ``overwrite`` allows reusing a directory that holds another run.
    ``on_step`` receives each logged training record (used by the demo and benchmarks).
    """
    out_dir = Path(out_dir)
    ctx = setup_distributed(device)
    try:
        if resume and find_latest(out_dir / CHECKPOINT_DIR) is None:
            if not _holds_a_run(out_dir):
                # most often a typo in --out: starting a new run there would look like a resumed one
                raise RunDirError(f"nothing to resume in {out_dir}: it holds no lipdeq run (no checkpoint, no "
                                  f"{METRICS_FILE}, no {CONFIG_FILE}); check --out, or drop --resume to start "
                                  "a new run")
            # a run that was stopped before its first checkpoint (a preempted job): start it again
            warnings.warn(f"{out_dir} holds a run with no checkpoint yet: starting it again from step 0",
                          stacklevel=2)
            resume, overwrite = False, True
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            # rank 0 locks the directory and writes config.yaml (the resolved configuration) first; a resumed
            # run writes it only once the configuration is known to be compatible with the checkpoint's
            with prepare_run_dir(out_dir, resume=resume, overwrite=overwrite,
                                 config=None if resume else cfg.to_dict()):
                return _train(cfg, out_dir, ctx, resume, progress, on_step)
        return _train(cfg, out_dir, ctx, resume, progress, on_step)
    finally:
        cleanup_distributed()


def _holds_a_run(out_dir: Path) -> bool:
    """True if ``out_dir`` has files that lipdeq writes into every run directory."""
    return (out_dir / METRICS_FILE).exists() or config_written_by_lipdeq(out_dir / CONFIG_FILE)


def _check_labels(labels: torch.Tensor, num_classes: int, split: str) -> None:
    """Refuse labels outside ``[0, num_classes)`` before anything is trained or written (the loss would
    fail with an IndexError deep inside cross-entropy, after the run directory was set up)."""
    if not labels.numel():
        return
    low, high = (int(v) for v in torch.aminmax(labels))
    if low < 0 or high >= num_classes:
        raise ConfigError(f"model.num_classes={num_classes} but the {split} labels range over [{low}, {high}]: "
                          f"set model.num_classes to at least {high + 1}")


def _train(
    cfg: RunConfig,
    out_dir: Path,
    ctx: DistContext,
    resume: bool,
    progress: bool,
    on_step: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    t, d = cfg.train, cfg.data
    if t.num_threads is not None:
        torch.set_num_threads(t.num_threads)
    if t.batch_size % ctx.world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {ctx.world_size} processes")
    dev = ctx.device
    torch.manual_seed(t.seed)

    train_x, train_y = load_dataset(d.dataset, "train", data_dir=d.data_dir, subset=d.train_subset, seed=t.seed)
    test_x, test_y = load_dataset(d.dataset, "test", data_dir=d.data_dir, subset=d.test_subset, seed=t.seed)
    _check_labels(train_y, cfg.model.num_classes, "training")
    _check_labels(test_y, cfg.model.num_classes, "test")
    loader = BatchIterator(
        train_x, train_y, t.batch_size // ctx.world_size, shuffle=True, augment=d.augment,
        seed=t.seed, drop_last=True, rank=ctx.rank, world_size=ctx.world_size,
    )

    model = MultiscaleDEQ(cfg.model).to(dev)
    if t.channels_last:
        model.use_channels_last()
    if t.compile:  # f only: the solver loop calls it up to f_thres + b_thres times per step
        model.compile_f(t.compile_mode)
    optimizer = build_optimizer(model, cfg)
    total_steps = t.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, t.warmup_steps, t.schedule, t.lr, t.min_lr)
    )
    step, skipped, nonfinite_in_row = 0, 0, 0
    ckpt_dir = out_dir / CHECKPOINT_DIR
    latest = find_latest(ckpt_dir) if resume else None
    if latest is not None:  # (train() has turned a resume without checkpoint into an error or a fresh start)
        ck = load_checkpoint(latest, expected_model_name=cfg.model.name, map_location=dev)
        # The saved position counts batches of the stored size in the stored data order, and the weights
        # belong to the stored model: only changes that extend or observe the run are allowed.
        stored = config_from_dict(ck.config, what=f"configuration stored in {ck.path}")
        check_compatible(stored.to_dict(), cfg.to_dict(), allowed=RESUME_SAFE, what="resuming",
                         source=str(ck.path))
        model.load_state_dict(ck.model_state)
        optimizer.load_state_dict(ck.optimizer_state)
        extra = ck.extra_state
        schedule.load_state_dict(extra["scheduler"])
        loader.load_state_dict(extra["data"])  # every rank is at the same position
        step, skipped = ck.step, extra.get("skipped_steps", 0)
        restore_rng_state(ck.rng_state)
    if resume and ctx.is_main:
        own = out_dir / CONFIG_FILE
        if not own.exists() or config_written_by_lipdeq(own):  # never replace a file of the user's
            write_config(out_dir, cfg.to_dict())

    net: nn.Module = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    writer = _MetricsWriter(out_dir, ctx.is_main)
    use_amp = t.amp == "bf16"
    # Precise BN before each evaluation (rank 0 only): a fixed selection of un-augmented training images,
    # drawn from a private generator; evaluate() puts the BatchNorm statistics and the RNG back, so the
    # checkpoints and the training trajectory are those of a run without it.
    calib = (precise_bn_batches(train_x, t.eval_precise_bn, batch_size=t.batch_size, seed=t.seed, device=dev)
             if ctx.is_main else [])
    max_steps = t.max_steps if t.max_steps is not None else total_steps
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        total = None if t.max_seconds is not None else min(max_steps, total_steps)  # a time budget: no step total
        bar = tqdm(total=total, initial=step, desc=cfg.model.name, dynamic_ncols=True)

    def checkpoint(tag: str = "last") -> Path | None:
        # Every rank, at every checkpoint: the running certificate starts afresh here, as it does in a
        # run resumed from this checkpoint, so both see the same bounds (hence solver budgets) from now on.
        running = getattr(model, "running_certificate", None)
        if running is not None:
            running.reset()
        if not ctx.is_main:
            return None
        return save_checkpoint(
            ckpt_dir, model=model, optimizer=optimizer, config=cfg.to_dict(),
            step=step, epoch=loader.epoch,
            extra_state={"scheduler": schedule.state_dict(), "data": loader.state_dict(), "skipped_steps": skipped},
            rng_state=capture_rng_state(), tag=tag,
        )

    stopped_by = "epochs"
    train_seconds = 0.0  # wall-clock spent in training steps (train.max_seconds budget)
    out_of_time = False
    last_ckpt: Path | None = None
    final_eval: dict[str, Any] = {}
    gate = _SolverWarningGate()
    with _StopSignal() as stop:

        def stopping() -> bool:
            return stop.received is not None

        while step < max_steps and loader.epoch < t.epochs:
            epoch = loader.epoch
            net.train()
            for x, y in loader:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                t0 = time.perf_counter()
                pretrain = step < t.pretrain_steps
                use_jac = use_jacobian_penalty(t, step, epoch, pretrain)
                result = train_step(model, net, x, y, optimizer, cfg, pretrain=pretrain, use_jac=use_jac,
                                    scheduler=schedule, ctx=ctx, warning_gate=gate)
                logits, ce, jac = result.logits, result.ce, result.jac
                if not result.finite:  # no update was applied and the buffers are as before the step
                    skipped += 1
                    nonfinite_in_row += 1
                    if nonfinite_in_row >= t.max_nonfinite_in_row:
                        raise NonFiniteTrainingError(
                            f"{nonfinite_in_row} consecutive steps with a non-finite loss, gradient or fixed "
                            f"point (step {step}); no update was applied and the last checkpoint in {ckpt_dir} "
                            "holds finite weights. Lower train.lr or check the data."
                        )
                    continue
                nonfinite_in_row = 0
                step += 1
                dt = time.perf_counter() - t0
                train_seconds += dt
                if t.checkpoint_every_steps is not None and step % t.checkpoint_every_steps == 0:
                    last_ckpt = checkpoint() or last_ckpt
                if bar is not None:
                    bar.update(1)
                if step % t.log_every == 0 or step == max_steps:
                    acc = float((logits.argmax(1) == y).float().mean())
                    sums = all_reduce_sum([float(ce.detach()), acc], ctx)
                    record = {
                        "kind": "train", "step": step, "epoch": epoch, "loss": sums[0] / ctx.world_size,
                        "accuracy": sums[1] / ctx.world_size, "lr": schedule.get_last_lr()[0],
                        "step_time": dt, "images_per_s": x.shape[0] * ctx.world_size / dt,
                        "pretrain": pretrain, "skipped_steps": skipped, "solver_warnings": gate.count,
                        **model.solver_stats(),
                    }
                    if jac is not None:
                        record["jac_loss"] = float(jac.detach())
                    writer.write(record)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}",
                            f=f"{record.get('forward_nstep_mean', 0):.1f}",
                            b=f"{record.get('backward_nstep_mean', 0):.1f}",
                        )
                    if on_step is not None:
                        on_step(record)
                out_of_time = t.max_seconds is not None and all_ranks_true(train_seconds >= t.max_seconds, ctx)
                if stop.received or step >= max_steps or out_of_time:
                    break
            if stop.received:
                stopped_by = f"signal:{stop.received}"
                break
            if step >= max_steps:
                stopped_by = "max_steps"
                break
            if out_of_time:
                stopped_by = "max_seconds"
                break
            if (epoch + 1) % t.eval_every_epochs == 0 and ctx.is_main:
                final_eval = evaluate(model, test_x, test_y, batch_size=t.eval_batch_size, device=dev, amp=use_amp,
                                      should_stop=stopping, precise_bn=calib)
                if final_eval.get("interrupted"):  # a partial evaluation is not a result
                    final_eval = {}
                else:
                    writer.write({"kind": "eval", "step": step, "epoch": epoch, **_scalars(final_eval)})
            if (epoch + 1) % t.checkpoint_every_epochs == 0:
                last_ckpt = checkpoint() or last_ckpt
        if bar is not None:
            bar.close()
        if ctx.is_main and not stop.received:
            final_eval = evaluate(model, test_x, test_y, batch_size=t.eval_batch_size, device=dev, amp=use_amp,
                                  should_stop=stopping, precise_bn=calib)
            if final_eval.get("interrupted"):  # SIGINT/SIGTERM during the final evaluation: stop now
                final_eval = {}
            else:
                final_eval["certificate"] = model.lipschitz_bound().value
                writer.write({"kind": "eval", "step": step, "epoch": loader.epoch, **_scalars(final_eval)})
        if stop.received:
            stopped_by = f"signal:{stop.received}"
        last_ckpt = checkpoint() or last_ckpt
    writer.close()
    return TrainResult(out_dir, step, loader.epoch, stopped_by, final_eval, skipped, last_ckpt, train_seconds, model)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
