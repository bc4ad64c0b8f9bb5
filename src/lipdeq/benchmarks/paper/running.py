"""Training with snapshots, and what is measured on each snapshot: evaluations, probes, traces.

Every model is trained by :func:`lipdeq.training.train` with every step logged, so the elapsed
training time (the sum of step times: the clock of ``train.max_seconds``) is known at every step;
the snapshots are copies of the weights in the trainer's own checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lipdeq.benchmarks.memory import measure_training_step
from lipdeq.benchmarks.paper.compare import last_common_step, median
from lipdeq.benchmarks.paper.profiles import Profile
from lipdeq.configs import config_from_dict
from lipdeq.gradients import fixed_point
from lipdeq.models import MultiscaleDEQ
from lipdeq.solvers import Solution
from lipdeq.training import evaluate, load_checkpoint, train
from lipdeq.training.evaluate import recalibrate_batchnorm
from lipdeq.training.rundir import CHECKPOINT_DIR

__all__ = [
    "BenchData",
    "TrainedRun",
    "choose_evals",
    "evaluate_snapshot",
    "expected_steps",
    "measure_run",
    "model_from_state",
    "probe",
    "residual_traces",
    "solution_summary",
    "train_with_snapshots",
]

_RECORD_KEYS = ("step", "loss", "accuracy", "step_time", "forward_nstep_mean", "backward_nstep_mean",
                "forward_rel_residual_max", "backward_rel_residual_max", "forward_converged_frac",
                "backward_converged_frac", "pretrain")


@dataclass
class BenchData:
    """The fixed tensors every model is measured on (the same for all, so the figures compare)."""

    train_x: torch.Tensor  # uint8 training images (the trainer draws its batches from the same set)
    train_y: torch.Tensor
    test_x: torch.Tensor  # uint8 test subset of the evaluations
    test_y: torch.Tensor
    probe_x: torch.Tensor  # normalised training batch of the probes, on the device
    probe_y: torch.Tensor
    trace_x: torch.Tensor  # normalised test batch of the residual traces, on the device
    trace_y: torch.Tensor
    calib: list[torch.Tensor]  # normalised batches for the BatchNorm re-estimation (may be empty)


@dataclass
class TrainedRun:
    """One model's training run: its per-step records and the snapshots taken along it."""

    name: str
    cfg: Any
    steps: int = 0
    train_seconds: float = 0.0
    stopped_by: str = ""
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    snapshots: dict[int, tuple[float, Path]] = dataclasses.field(default_factory=dict)  # step -> (elapsed, file)


def solution_summary(prefix: str, sol: Solution | None) -> dict[str, float]:
    """:meth:`Solution.summary` of ``sol``, or nothing when there was no solve (an unrolled forward)."""
    return {} if sol is None else sol.summary(prefix)


def model_from_state(cfg: Any, state: dict[str, torch.Tensor] | None, device: torch.device, seed: int) -> Any:
    """The model of ``cfg`` with the weights ``state`` (None: the trainer's initial weights of ``seed``)."""
    torch.manual_seed(seed)  # as the trainer builds its model: the init of step 0
    model = MultiscaleDEQ(cfg.model)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device)


def probe(model: Any, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, Any]:
    """One forward + backward on a fixed training batch with fixed dropout masks (no update)."""
    torch.manual_seed(seed)
    model.train()
    m = measure_training_step(model, x, y)
    model.zero_grad(set_to_none=True)
    out = {
        "saved_tensor_bytes": m["saved_tensor_bytes"],
        "cuda_peak_bytes": m["cuda_peak_bytes"],
        "step_seconds": m["seconds"],
    }
    out.update(solution_summary("forward", m["forward"]))
    out.update(solution_summary("backward", m["backward"]))
    return out


def evaluate_snapshot(model: Any, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                      device: torch.device, calib: Sequence[torch.Tensor] = ()) -> dict[str, Any]:
    """Accuracy (with its binomial standard error), inference time and certificate of ``model``."""
    recalibrate_batchnorm(model, calib)
    model.eval()
    cert = model.lipschitz_bound().value  # a one-off per set of weights: computed and cached before timing
    ev = evaluate(model, images, labels, batch_size=batch_size, device=device)
    n = max(ev["num_images"], 1)
    keep = ("accuracy", "loss", "num_images", "seconds_per_image", "forward_nstep_mean", "forward_nstep_p95",
            "forward_rel_residual_max", "forward_rel_residual_mean")
    out = {k: ev[k] for k in keep if k in ev}
    out["accuracy_se"] = math.sqrt(max(ev["accuracy"] * (1 - ev["accuracy"]), 0.0) / n)
    out["certificate"] = cert
    if "status_counts" in ev:
        out["forward_converged_frac"] = ev["status_counts"].get("converged", 0) / n
    return out


def residual_traces(model: Any, x: torch.Tensor, y: torch.Tensor, iters: int) -> dict[str, list[list[float]]]:
    """Forward and backward (adjoint) relative residual against iteration for one batch.

    Eval mode (no dropout); the model's solver with tolerance 1e-10, so that both solves run
    ``iters`` iterations; the adjoint solve is the IFT backward of the cross-entropy. Returns
    ``{"forward": T x B, "backward": T x B}`` lists (row t: after evaluation t + 1).
    """
    model.eval()
    cfg = model.cfg
    with model.cached_weights():
        f, z0 = model.fixed_point_problem(x)
        z, sol = fixed_point(f, z0, solver=cfg.solver, backward="ift", f_tol=1e-10, b_tol=1e-10,
                             f_max_iter=iters, b_max_iter=iters, stop_mode="rel", return_trace=True)
    loss = F.cross_entropy(model.head(model.layer.unpack(z)), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    bwd = sol.backward
    return {
        "forward": sol.rel_trace.double().cpu().tolist(),
        "backward": bwd.rel_trace.double().cpu().tolist() if bwd is not None and bwd.rel_trace is not None else [],
    }


def _save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path))


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def expected_steps(cfg: Any, n_train: int) -> int:
    """The optimizer steps a run of ``cfg`` on ``n_train`` images takes (epochs, or the step cap)."""
    per_epoch = n_train // cfg.train.batch_size
    total = cfg.train.epochs * per_epoch
    return min(total, cfg.train.max_steps) if cfg.train.max_steps is not None else total


def train_with_snapshots(
    name: str, cfg: Any, run_dir: Path, every: int, targets: set[int], device: str | None,
) -> TrainedRun:
    """Train ``cfg`` into ``run_dir``, keeping the weights of every ``every``-th step and of ``targets``.

    The checkpoint interval is the greatest common divisor of both, so that each snapshot is a copy
    of the trainer's own checkpoint at that step (checked), not a re-run.
    """
    every = max(int(every), 1)
    ck_every = every
    for t in targets:
        ck_every = math.gcd(ck_every, int(t))
    cfg = config_from_dict(cfg.to_dict(), [f"train.checkpoint_every_steps={ck_every}"])
    run = TrainedRun(name, cfg)
    snap_dir = run_dir / "snapshots"
    if snap_dir.exists():
        shutil.rmtree(snap_dir)
    elapsed = 0.0

    def on_step(rec: dict[str, Any]) -> None:
        nonlocal elapsed
        elapsed += rec["step_time"]
        step = int(rec["step"])
        run.records.append({**{k: rec[k] for k in _RECORD_KEYS if k in rec}, "elapsed": elapsed})
        if step % every == 0 or step in targets:
            ck = load_checkpoint(run_dir / CHECKPOINT_DIR)
            if ck.step != step:
                raise RuntimeError(f"{name}: expected the checkpoint of step {step}, found step {ck.step}")
            path = snap_dir / f"step_{step:08d}.safetensors"
            _save_state(ck.model_state, path)
            run.snapshots[step] = (elapsed, path)

    result = train(cfg, run_dir, overwrite=True, progress=False, on_step=on_step, device=device)
    run.steps, run.train_seconds, run.stopped_by = result.step, result.train_seconds, result.stopped_by
    if result.step not in run.snapshots and result.step > 0:
        ck = load_checkpoint(run_dir / CHECKPOINT_DIR)
        path = snap_dir / f"step_{ck.step:08d}.safetensors"
        _save_state(ck.model_state, path)
        run.snapshots[ck.step] = (result.train_seconds, path)
    return run


def choose_evals(steps: Sequence[int], required: set[int], limit: int | None) -> list[int]:
    """At most ``limit`` snapshot steps to evaluate: all of ``required``, the rest spread evenly."""
    steps = sorted(steps)
    if limit is None or len(steps) <= limit:
        return steps
    chosen = {s for s in steps if s in required}
    rest = [s for s in steps if s not in chosen]
    free = max(limit - len(chosen), 0)
    if free and rest:
        if free > 1:
            idx = sorted({round(i * (len(rest) - 1) / (free - 1)) for i in range(free)})
        else:
            idx = [len(rest) - 1]
        chosen.update(rest[i] for i in idx)
    return sorted(chosen)


def measure_run(run: TrainedRun, *, is_lipschitz: bool, others: Sequence[TrainedRun], prof: Profile,
                data: BenchData, dev: torch.device, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Evaluations, probes (init, middle, end), certificates and residual traces of one trained run.

    ``others`` are the runs of the other kind (the baselines of a Lipschitz model and vice versa):
    the last snapshot step both runs share, at most the shorter run's length (normally the shorter
    run's step count), is always evaluated, for the equal-steps comparison.
    """
    final = max(run.snapshots)
    middle = min(run.snapshots, key=lambda s: (abs(s - final / 2), s))
    required = {final, middle}
    for o in others:
        common = last_common_step(run.snapshots, o.snapshots, min(run.steps, o.steps))
        if common is not None:
            required.add(common)
    eval_steps = choose_evals(list(run.snapshots), required, prof.max_evals)
    log(f"evaluating {run.name} at steps {eval_steps}; probing at 0, {middle}, {final}")
    init_model = model_from_state(run.cfg, None, dev, seed)
    entry: dict[str, Any] = {
        "preset": run.name,
        "kind": "lipschitz" if is_lipschitz else "baseline",
        "parameters": init_model.num_parameters(),
        "parameters_f": init_model.num_parameters("f"),
        "hyper_bound": init_model.lipschitz_bound(mode="hyper").value,
        "certificate_init": init_model.lipschitz_bound().value,
        "steps": run.steps,
        "train_seconds": run.train_seconds,
        "stopped_by": run.stopped_by,
        "step_time_trained": median([x["step_time"] for x in run.records[len(run.records) // 2:]]),
        "step_time_all": median([x["step_time"] for x in run.records[1:]]),
        "probes": {"init": {"step": 0, "elapsed": 0.0, **probe(init_model, data.probe_x, data.probe_y, seed + 2)}},
        "evals": [],
        "records": run.records,
    }
    del init_model
    for s in sorted(set(eval_steps) | {middle, final}):
        elapsed, path = run.snapshots[s]
        state = _load_state(path)
        if s in eval_steps:
            model = model_from_state(run.cfg, state, dev, seed)
            ev = evaluate_snapshot(model, data.test_x, data.test_y, prof.eval_batch_size, dev, data.calib)
            entry["evals"].append({"step": s, "elapsed": elapsed, **ev})
        if s in (middle, final):
            model = model_from_state(run.cfg, state, dev, seed)
            label = "end" if s == final else "middle"
            entry["probes"][label] = {"step": s, "elapsed": elapsed,
                                      **probe(model, data.probe_x, data.probe_y, seed + 2)}
            if s == final:
                entry["certificate_final"] = model.lipschitz_bound().value
                log(f"  residual traces of trained {run.name}")
                model = model_from_state(run.cfg, state, dev, seed)
                recalibrate_batchnorm(model, data.calib)
                entry["traces"] = residual_traces(model, data.trace_x, data.trace_y, prof.trace_iters)
    end_eval = entry["evals"][-1]
    entry["inference_s_per_image"] = end_eval["seconds_per_image"]
    entry["accuracy_final"] = end_eval["accuracy"]
    end_probe = entry["probes"]["end"]
    entry["peak_memory"] = {
        "cuda_peak_bytes": end_probe["cuda_peak_bytes"],
        "saved_tensor_bytes": end_probe["saved_tensor_bytes"],
    }
    return entry
