"""One model trained for a wall-clock budget, with snapshots of its weights along the way.

The loop is the trainer's own pieces (:func:`lipdeq.training.step.train_step`, the optimizer of
:func:`lipdeq.training.trainer.build_optimizer`, the preset's batch size, augmentation and data
order from :class:`lipdeq.data.BatchIterator`, the cosine of
:func:`lipdeq.training.trainer.lr_factor`) with two differences that a time budget needs:

- the cosine's horizon is the **budget's training time**, not a step count: the learning rate of a
  step is set from the training seconds spent so far, so it reaches ``min_lr`` exactly when the
  budget ends whatever the step time does (MDEQ's steps change cost as its solver works harder,
  and two runs sharing a machine may see its load change); a step-count horizon would need a
  step-time estimate made before training, and would end early or never on a wrong estimate;
- MDEQ's pretraining (unrolled steps) takes the same *fraction* of the budget's time as the
  preset's ``pretrain_steps`` takes of its epochs (3000 of 50 x 390 steps, about 15%, for
  ``mdeq_tiny``): the preset's step count would be the whole budget on a CPU.

The clock is the sum of step times (forward, backward and update; no data loading, no snapshot
writing), the clock of ``train.max_seconds``; the run stops at the first step that ends past the
budget. Snapshots are written when the clock passes a requested time, outside the clock.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lipdeq.atomic import atomic_write
from lipdeq.benchmarks.paper.running import model_from_state
from lipdeq.configs import config_from_dict
from lipdeq.data import BatchIterator, load_dataset
from lipdeq.solvers import SolverWarning
from lipdeq.training.device import resolve_device
from lipdeq.training.step import train_step, use_jacobian_penalty
from lipdeq.training.trainer import NonFiniteTrainingError, build_optimizer, lr_factor

__all__ = ["RunSpec", "RUN_FILE", "schedule_factor", "train_for_budget"]

RUN_FILE = "run.json"
_SOLVER_KEYS = ("forward_nstep_mean", "forward_nstep_p95", "backward_nstep_mean", "backward_nstep_p95",
                "forward_rel_residual_max", "backward_rel_residual_max", "forward_converged_frac",
                "backward_converged_frac")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What one training process does (picklable: it crosses to a spawned process)."""

    name: str
    config: dict[str, Any]  # RunConfig.to_dict()
    budget_seconds: float
    eval_times: tuple[float, ...]  # snapshot times whose weights are evaluated along the curve
    match_times: tuple[float, ...]  # further snapshot times, candidates for the equal-epochs comparison
    pretrain_seconds: float
    out_dir: str
    device: str | None = None
    threads: int | None = None  # torch intra-op threads of this run (None: leave as is)


def schedule_factor(elapsed: float, budget: float, step: int, train_cfg: Any) -> float:
    """Multiplier of the base learning rate for the step that starts after ``elapsed`` seconds of
    training: the preset's schedule (cosine to ``min_lr``, or constant) over the budget's time, after
    the preset's linear warm-up of ``warmup_steps`` steps."""
    t = train_cfg
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    # lr_factor counts integer units: microseconds of training time stand for its steps
    return lr_factor(int(1e6 * elapsed), max(int(1e6 * budget), 1), 0, t.schedule, t.lr, t.min_lr)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":  # kernels run asynchronously: time what ran, not what was queued
        torch.cuda.synchronize(dev)


def _pop_passed(pending: list[float], elapsed: float) -> list[float]:
    passed = [t for t in pending if t <= elapsed]
    del pending[: len(passed)]
    return passed


def train_for_budget(spec: RunSpec, start: Callable[[], None] | None = None,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``spec``'s model for its budget; returns (and writes to ``out_dir/run.json``) its record.

    ``start`` is called once everything is loaded, just before the first step (the two-process mode
    waits there for the other run). The record: ``steps``, ``epochs`` (batches seen / batches per
    epoch), ``train_seconds``, ``skipped_steps``, per-step ``records`` and the ``snapshots``
    (``step``, ``epoch``, ``elapsed``, ``path``, ``nominal``: the requested evaluation times it
    covers, empty for a matching-only snapshot).
    """
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    cfg = config_from_dict(spec.config)
    t, d = cfg.train, cfg.data
    dev = resolve_device(spec.device)
    out = Path(spec.out_dir)
    snap_dir = out / "snapshots"
    snap_dir.mkdir(parents=True, exist_ok=True)
    train_x, train_y = load_dataset(d.dataset, "train", data_dir=d.data_dir, subset=d.train_subset, seed=t.seed)
    loader = BatchIterator(train_x, train_y, t.batch_size, shuffle=True, augment=d.augment, seed=t.seed,
                           drop_last=True)
    model = model_from_state(cfg, None, dev, t.seed)  # the trainer's initial weights of this seed
    optimizer = build_optimizer(model, cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    per_epoch = len(loader)
    eval_pending, match_pending = sorted(spec.eval_times), sorted(spec.match_times)
    budget = spec.budget_seconds
    elapsed, step, batches, skipped, in_row = 0.0, 0, 0, 0, 0
    records: list[dict[str, Any]] = []
    snapshots: list[dict[str, Any]] = []
    if start is not None:
        start()
    wall0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # MDEQ's solver runs at its caps: measured, not warned
        while elapsed < budget:
            for x, y in loader:
                factor = schedule_factor(elapsed, budget, step, t)
                for g, lr0 in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = lr0 * factor
                x, y = x.to(dev), y.to(dev)
                pretrain = elapsed < spec.pretrain_seconds
                use_jac = use_jacobian_penalty(t, step, loader.epoch, pretrain)
                _sync(dev)
                t0 = time.perf_counter()
                res = train_step(model, model, x, y, optimizer, cfg, pretrain=pretrain, use_jac=use_jac)
                _sync(dev)
                dt = time.perf_counter() - t0
                elapsed += dt  # a skipped (non-finite) step spent its time too
                batches += 1
                if not res.finite:
                    skipped += 1
                    in_row += 1
                    if in_row >= t.max_nonfinite_in_row:
                        raise NonFiniteTrainingError(f"{spec.name}: {in_row} consecutive non-finite steps "
                                                     f"(step {step}); lower train.lr or check the data")
                else:
                    step, in_row = step + 1, 0
                    stats = model.solver_stats()
                    records.append({
                        "step": step, "elapsed": elapsed, "epoch": batches / per_epoch, "step_time": dt,
                        "lr": optimizer.param_groups[0]["lr"], "loss": float(res.ce),
                        "accuracy": float((res.logits.argmax(1) == y).float().mean()), "pretrain": pretrain,
                        **{k: stats[k] for k in _SOLVER_KEYS if k in stats},
                    })
                nominal = _pop_passed(eval_pending, elapsed)
                matching = _pop_passed(match_pending, elapsed)
                if (nominal or matching or elapsed >= budget) and step > 0:
                    if elapsed >= budget:  # the last snapshot is always on the curve
                        nominal += eval_pending
                        eval_pending.clear()
                    if snapshots and snapshots[-1]["step"] == step:  # after a skipped step: the same weights
                        snapshots[-1]["nominal"] += nominal
                    else:
                        path = snap_dir / f"step_{step:08d}.safetensors"
                        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
                                  str(path))
                        snapshots.append({"step": step, "epoch": batches / per_epoch, "elapsed": elapsed,
                                          "path": str(path), "nominal": nominal})
                    if log is not None and nominal:
                        log(f"  {spec.name}: snapshot at {elapsed:.1f} s (step {step}, "
                            f"epoch {batches / per_epoch:.3f})")
                if elapsed >= budget:
                    break
    result = {
        "name": spec.name, "steps": step, "batches": batches, "epochs": batches / per_epoch,
        "steps_per_epoch": per_epoch, "train_images": int(train_x.shape[0]), "train_seconds": elapsed,
        "wall_seconds": time.perf_counter() - wall0, "skipped_steps": skipped,
        "pretrain_seconds": spec.pretrain_seconds, "threads": torch.get_num_threads(),
        "records": records, "snapshots": snapshots,
    }
    atomic_write(out / RUN_FILE, json.dumps(result).encode("utf-8"))  # IPC: Infinity and NaN round-trip
    return result

