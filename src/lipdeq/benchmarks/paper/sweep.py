"""One-at-a-time sweep of the Lipschitz layer's knobs: certified bounds and a few training steps per point.

Each point trains through :func:`lipdeq.training.step.train_step`, the step of the trainer itself
(the same loss, non-finite policy, gradient clipping and precision), from the same initial seed on
the same batches, at the preset's base learning rate (no schedule: a few steps of a cosine over a
whole run would not move it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lipdeq.benchmarks.paper.compare import median, ratio
from lipdeq.benchmarks.paper.profiles import Profile
from lipdeq.benchmarks.paper.running import evaluate_snapshot, model_from_state, solution_summary
from lipdeq.data import BatchIterator, load_dataset
from lipdeq.training import step as training_step  # train_step looked up per call (tests count the calls)
from lipdeq.training.trainer import build_optimizer

__all__ = ["run_sweep", "sweep_points"]


def sweep_points(prof: Profile, reference: dict[str, float]) -> list[tuple[str, dict[str, float]]]:
    """``(label, changed knobs)`` of every point: the reference, then each knob's other values in turn."""
    points: list[tuple[str, dict[str, float]]] = [("reference", {})]
    for knob, values in prof.sweep_knobs:
        points += [(f"{knob}={v:g}", {knob: v}) for v in values if not math.isclose(v, reference[knob])]
    return points


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":  # kernels run asynchronously: time what ran, not what was queued
        torch.cuda.synchronize(dev)


def _train_point(model: Any, cfg: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 dev: torch.device) -> list[dict[str, Any]]:
    """Train ``model`` one step per batch; per step its time, loss, skip flag and solver statistics."""
    opt = build_optimizer(model, cfg)
    steps: list[dict[str, Any]] = []
    model.train()
    done = 0  # optimizer steps applied, the trainer's step counter
    for x, y in batches:
        x, y = x.to(dev), y.to(dev)
        _sync(dev)
        t0 = time.perf_counter()
        pretrain = done < cfg.train.pretrain_steps
        use_jac = training_step.use_jacobian_penalty(cfg.train, done, 0, pretrain)
        res = training_step.train_step(model, model, x, y, opt, cfg, pretrain=pretrain, use_jac=use_jac)
        _sync(dev)
        dt = time.perf_counter() - t0
        done += int(res.finite)
        sol = res.solution
        steps.append({"step_time": dt, "loss": float(res.loss), "skipped": not res.finite,
                      **solution_summary("forward", sol),
                      **solution_summary("backward", sol.backward if sol is not None else None)})
    return steps


def run_sweep(prof: Profile, config: Callable[..., Any], train_x: torch.Tensor, train_y: torch.Tensor,
              dev: torch.device, seed: int, base_step_time: float, base_inference: float, base_name: str,
              log: Callable[[str], None], calib: Sequence[torch.Tensor]) -> dict[str, Any]:
    """One-at-a-time sweep around the reference Lipschitz settings (results.json's ``sweep``).

    ``config(preset, overrides)`` builds a run configuration as the rest of the bench does;
    ``base_step_time`` / ``base_inference`` are the baseline's figures the speed-ups are taken against.
    """
    ref = config(prof.sweep_preset)
    reference = {k: getattr(ref.model, k) for k, _ in prof.sweep_knobs}
    d = ref.data
    test_x, test_y = load_dataset(d.dataset, "test", data_dir=d.data_dir, subset=prof.sweep_test_subset, seed=seed)
    loader = BatchIterator(train_x, train_y, ref.train.batch_size, shuffle=True, augment=d.augment, seed=seed + 3,
                           drop_last=True)
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) == prof.sweep_steps:
            break
    rows = []
    for label, change in sweep_points(prof, reference):
        cfg = config(prof.sweep_preset, [f"model.{k}={v}" for k, v in change.items()])
        model = model_from_state(cfg, None, dev, seed)
        hyper = model.lipschitz_bound(mode="hyper").value
        cert_init = model.lipschitz_bound().value
        steps = _train_point(model, cfg, batches, dev)
        ev = evaluate_snapshot(model, test_x, test_y, prof.eval_batch_size, dev, calib)
        step_time = median([s["step_time"] for s in steps[1:]] or [steps[0]["step_time"]])
        row = {
            "point": label, **{k: change.get(k, reference[k]) for k in reference},
            "hyper_bound": hyper, "hyper_certified": bool(hyper < 1.0),
            "certificate_init": cert_init, "certificate_trained": ev["certificate"],
            "step_time": step_time, "train_step_speedup": ratio(base_step_time, step_time),
            "skipped_steps": sum(s["skipped"] for s in steps),
            "first_step": {k: v for k, v in steps[0].items() if k.endswith(("_mean", "_p95", "_max", "_frac"))},
            "last_step": {k: v for k, v in steps[-1].items() if k.endswith(("_mean", "_p95", "_max", "_frac"))},
            "accuracy": ev["accuracy"], "accuracy_se": ev["accuracy_se"],
            "inference_s_per_image": ev["seconds_per_image"],
            "inference_speedup": ratio(base_inference, ev["seconds_per_image"]),
        }
        rows.append(row)
        log(f"  sweep {label}: hyper {hyper:.3f}, cert {ev['certificate']:.3f}, "
            f"fwd {row['last_step'].get('forward_nstep_mean', float('nan')):.1f}, step {step_time:.2f} s")
    return {"preset": prof.sweep_preset, "steps": prof.sweep_steps, "baseline": base_name,
            "baseline_step_time": base_step_time, "baseline_inference_s_per_image": base_inference,
            "test_images": int(test_x.shape[0]), "reference": reference,
            "points": rows}
