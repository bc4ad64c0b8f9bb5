"""``lipdeq bench``: the paper's claim (speed-up at a minor accuracy cost) measured side by side.

Every model is trained by :func:`lipdeq.training.train` on the same data, seed and batch size.
Each training step is logged (``train.log_every=1``), so the elapsed training time (the sum of step
times, without evaluation or checkpoint writes: the clock of ``train.max_seconds``) is known at
every step; snapshots of the weights are taken along training from the trainer's checkpoints.
Then, per snapshot:

- **evaluation** (eval mode, no dropout) on a test subset: accuracy, inference time per image,
  forward iterations; the certificate is computed (and cached) before timing, as it is a one-off
  per set of weights, not a per-batch cost;
- **probe** at init, middle and end of training: one forward + backward pass on a fixed training
  batch (training mode, fixed dropout masks), giving per-sample forward and backward iterations
  (mean, 95th percentile), final residuals, and the step's memory (see
  :mod:`lipdeq.benchmarks.memory`).

Quick profile (2 CPU cores, < 10 minutes): ``mdeq_tiny`` and ``lipmdeq_tiny`` at batch 32 without
MDEQ pretraining; the baseline trains a fixed number of steps, the Lipschitz model trains for the
baseline's elapsed training time (equal wall-clock) and is also snapshotted at the baseline's step
count (equal steps). Full profile (GPU): ``mdeq_large``, ``mdeq_large_reg`` and ``lipmdeq_large``,
each trained as its preset says. Both profiles add a one-at-a-time sweep of the Lipschitz layer's
knobs (ReLU slope, conv cap, alpha, beta): each point's certified bounds and a few training steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lipdeq.benchmarks.memory import measure_training_step
from lipdeq.training.evaluate import recalibrate_batchnorm

__all__ = ["FULL", "PROFILES", "QUICK", "Profile", "format_markdown", "resolve_data", "run"]

SWEEP_KNOBS: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("relu_slope", (0.2, 0.4, 0.6, 0.8, 1.0)),
    ("conv_cap", (1.0, 2.0, 3.0)),
    ("alpha", (0.25, 0.5, 0.75)),
    ("beta", (0.15, 0.3, 0.6)),
)


@dataclass(frozen=True)
class Profile:
    """What a bench profile trains and measures (see the module docstring)."""

    name: str
    baselines: tuple[str, ...]
    lipschitz: tuple[str, ...]
    headline: tuple[str, str]  # (Lipschitz preset, baseline preset) of results.json's summary
    overrides: tuple[str, ...]  # applied to every model's preset
    baseline_max_steps: int | None  # None: the preset's epochs
    match_baseline_time: bool  # Lipschitz models train for the headline baseline's elapsed time
    snapshots: int  # snapshot intervals per run
    max_evals: int | None  # evaluated snapshots per model (None: all)
    test_subset: int | None
    eval_batch_size: int
    probe_batch_size: int
    sweep_preset: str
    sweep_knobs: tuple[tuple[str, tuple[float, ...]], ...]
    sweep_steps: int
    sweep_test_subset: int | None
    trace_iters: int
    memory_f_thres: tuple[int, ...]
    memory_batch_size: int
    train_subset: int | None = None
    bn_recalibration_batches: int = 0  # re-estimate BatchNorm statistics before each evaluation


QUICK = Profile(
    name="quick",
    baselines=("mdeq_tiny",),
    lipschitz=("lipmdeq_tiny",),
    headline=("lipmdeq_tiny", "mdeq_tiny"),
    overrides=("train.batch_size=32", "train.pretrain_steps=0", "train.eval_batch_size=100"),
    baseline_max_steps=16,
    match_baseline_time=True,
    snapshots=2,
    max_evals=3,
    test_subset=500,
    eval_batch_size=100,
    probe_batch_size=32,
    sweep_preset="lipmdeq_tiny",
    sweep_knobs=SWEEP_KNOBS,
    sweep_steps=4,
    sweep_test_subset=100,
    trace_iters=30,
    memory_f_thres=(5, 30),
    memory_batch_size=8,
    bn_recalibration_batches=4,
)

FULL = Profile(
    name="full",
    baselines=("mdeq_large", "mdeq_large_reg"),
    lipschitz=("lipmdeq_large",),
    headline=("lipmdeq_large", "mdeq_large"),
    overrides=(),
    baseline_max_steps=None,
    match_baseline_time=False,
    snapshots=20,
    max_evals=None,
    test_subset=None,
    eval_batch_size=256,
    probe_batch_size=128,
    sweep_preset="lipmdeq_large",
    sweep_knobs=SWEEP_KNOBS,
    sweep_steps=50,
    sweep_test_subset=2000,
    trace_iters=60,
    memory_f_thres=(5, 15, 30),
    memory_batch_size=32,
)

PROFILES = {"quick": QUICK, "full": FULL}

TARGETS = {"train_step_speedup": 4.75, "inference_speedup": 4.0, "equal_steps_drop": 0.01, "memory_ratio": 1.10}


# ---------------------------------------------------------------------------------------------- helpers
def _repo_shared_cifar() -> list[Path]:
    here = Path(__file__).resolve()
    candidates = [Path.cwd().parent / "shared" / "data" / "cifar-10-batches-py"]
    if len(here.parents) > 4:  # src/lipdeq/benchmarks/paper.py in a checkout
        candidates.insert(0, here.parents[4] / "shared" / "data" / "cifar-10-batches-py")
    return candidates


def resolve_data(data_dir: str | os.PathLike[str] | None) -> tuple[str, str | None, str]:
    """Which data the bench uses: ``(dataset, data_dir, how)``.

    An explicit ``data_dir`` wins; then ``$LIPDEQ_DATA_DIR``; then ``../shared/data`` beside the
    checkout (or the working directory); otherwise the embedded synthetic set.
    """
    if data_dir is not None:
        return "cifar10", str(data_dir), "--data-dir"
    if os.environ.get("LIPDEQ_DATA_DIR"):
        return "cifar10", None, "$LIPDEQ_DATA_DIR"
    for cand in _repo_shared_cifar():
        if (cand / "test_batch").is_file():
            return "cifar10", str(cand), "../shared/data beside the checkout"
    return "synthetic", None, "no CIFAR-10 found: embedded synthetic set"


def _p95(x: torch.Tensor) -> float:
    return float(torch.quantile(x.double().flatten(), 0.95)) if x.numel() else float("nan")


def _median(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else float("nan")


def _ratio(num: float | None, den: float | None) -> float:
    if num is None or den is None or not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return float("nan")
    return num / den


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _solution_stats(prefix: str, sol: Any) -> dict[str, float]:
    if sol is None:
        return {}
    ns, rel = sol.nstep.double(), sol.rel_residual.double()
    return {
        f"{prefix}_nstep_mean": float(ns.mean()),
        f"{prefix}_nstep_p95": _p95(ns),
        f"{prefix}_nstep_max": float(ns.max()),
        f"{prefix}_rel_residual_median": float(rel.median()),
        f"{prefix}_rel_residual_max": float(rel.max()),
        f"{prefix}_converged_frac": float(sol.converged.double().mean()),
    }


def _model_from_state(cfg: Any, state: dict[str, torch.Tensor] | None, device: torch.device, seed: int) -> Any:
    from lipdeq.models import MultiscaleDEQ

    torch.manual_seed(seed)  # as the trainer builds its model: the init of step 0
    model = MultiscaleDEQ(cfg.model)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device)


def _probe(model: Any, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, Any]:
    """One forward + backward on a fixed training batch with fixed dropout masks."""
    torch.manual_seed(seed)
    model.train()
    m = measure_training_step(model, x, y)
    model.zero_grad(set_to_none=True)
    out = {
        "saved_tensor_bytes": m["saved_tensor_bytes"],
        "cuda_peak_bytes": m["cuda_peak_bytes"],
        "step_seconds": m["seconds"],
    }
    out.update(_solution_stats("forward", m["forward"]))
    out.update(_solution_stats("backward", m["backward"]))
    return out


def _evaluate(model: Any, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
              calib: Sequence[torch.Tensor] = ()) -> dict:
    from lipdeq.training import evaluate

    recalibrate_batchnorm(model, calib)
    model.eval()
    cert = model.lipschitz_bound().value  # computed and cached before timing
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
    from lipdeq.gradients import fixed_point

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


# ---------------------------------------------------------------------------------------------- training
@dataclass
class _Run:
    name: str
    cfg: Any
    steps: int = 0
    train_seconds: float = 0.0
    stopped_by: str = ""
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    snapshots: dict[int, tuple[float, Path]] = dataclasses.field(default_factory=dict)  # step -> (elapsed, file)


_RECORD_KEYS = ("step", "loss", "accuracy", "step_time", "forward_nstep_mean", "backward_nstep_mean",
                "forward_rel_residual_max", "backward_rel_residual_max", "forward_converged_frac",
                "backward_converged_frac", "pretrain")


def _save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path))


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _expected_steps(cfg: Any, n_train: int) -> int:
    per_epoch = n_train // cfg.train.batch_size
    total = cfg.train.epochs * per_epoch
    return min(total, cfg.train.max_steps) if cfg.train.max_steps is not None else total


def _train_with_snapshots(
    name: str, cfg: Any, run_dir: Path, every: int, targets: set[int], device: str | None,
) -> _Run:
    from lipdeq.configs import config_from_dict
    from lipdeq.training import load_checkpoint, train

    every = max(int(every), 1)
    ck_every = every
    for t in targets:
        ck_every = math.gcd(ck_every, int(t))
    cfg = config_from_dict(cfg.to_dict(), [f"train.checkpoint_every_steps={ck_every}"])
    run = _Run(name, cfg)
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
            ck = load_checkpoint(run_dir / "checkpoints")
            if ck.step != step:
                raise RuntimeError(f"{name}: expected the checkpoint of step {step}, found step {ck.step}")
            path = snap_dir / f"step_{step:08d}.safetensors"
            _save_state(ck.model_state, path)
            run.snapshots[step] = (elapsed, path)

    result = train(cfg, run_dir, overwrite=True, progress=False, on_step=on_step, device=device)
    run.steps, run.train_seconds, run.stopped_by = result.step, result.train_seconds, result.stopped_by
    if result.step not in run.snapshots and result.step > 0:
        ck = load_checkpoint(run_dir / "checkpoints")
        path = snap_dir / f"step_{ck.step:08d}.safetensors"
        _save_state(ck.model_state, path)
        run.snapshots[ck.step] = (result.train_seconds, path)
    return run


def _choose_evals(steps: Sequence[int], required: set[int], limit: int | None) -> list[int]:
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


# ---------------------------------------------------------------------------------------------- main
def run(
    out_dir: Path,
    profile: str = "quick",
    data_dir: str | None = None,
    device: str | None = None,
    *,
    max_steps_override: int | None = None,
    overrides: Sequence[str] = (),
    profile_options: dict[str, Any] | None = None,
    num_threads: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the bench ``profile`` ("quick" or "full") and write results.json, results.md and plots.

    Args:
        out_dir: output directory (training runs go to ``out_dir/runs``).
        profile: "quick" (CPU-sized) or "full" (the GPU recipe).
        data_dir: CIFAR-10 directory; see :func:`resolve_data` for the fallbacks.
        device: "cpu", "cuda", ... (default: CUDA when available).
        max_steps_override: cap every model's training at this many steps (the baselines train
            exactly this many): a cheap run through the same code path, for tests and dry runs.
        overrides: extra ``key=value`` configuration overrides applied to every model.
        profile_options: replace fields of the :class:`Profile` (e.g. ``{"test_subset": 32}``).
        num_threads: torch CPU threads for the run (restored afterwards); default: leave as is
            (``OMP_NUM_THREADS`` or torch's default). On a machine shared with other processes one
            thread per process can be many times faster than oversubscribed cores.
        verbose: print progress and the final table.

    Returns:
        The results object written to ``results.json``.
    """
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    saved_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run(Path(out_dir), profile, data_dir, device, max_steps_override, overrides, profile_options,
                    verbose)
    finally:
        torch.set_num_threads(saved_threads)


def _run(
    out_dir: Path,
    profile: str,
    data_dir: str | None,
    device: str | None,
    max_steps_override: int | None,
    overrides: Sequence[str],
    profile_options: dict[str, Any] | None,
    verbose: bool,
) -> dict[str, Any]:
    from lipdeq.configs import load_config
    from lipdeq.data import load_dataset, to_float_normalized
    from lipdeq.solvers import SolverWarning

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {tuple(PROFILES)}, got {profile!r}")
    prof = dataclasses.replace(PROFILES[profile], **(profile_options or {}))
    if max_steps_override is not None and max_steps_override < 2:
        raise ValueError(f"max_steps_override must be >= 2, got {max_steps_override}")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset, ddir, how = resolve_data(data_dir)

    def log(msg: str) -> None:
        if verbose:
            rss = _max_rss_mib()
            mem = f" (max RSS {rss:.0f} MiB)" if rss is not None else ""
            print(f"[bench {time.perf_counter() - t_start:6.0f}s] {msg}{mem}", flush=True)

    common = [
        *prof.overrides,
        f"data.dataset={dataset}",
        f"data.data_dir={json.dumps(ddir)}",
        f"data.train_subset={json.dumps(prof.train_subset)}",
        "data.test_subset=32",  # the trainer's own final evaluation: a sanity check; ours is below
        "train.log_every=1",
        "train.eval_every_epochs=1000000",
        *overrides,
    ]
    if max_steps_override is not None:
        common.append(f"train.max_steps={4 * max_steps_override}")

    def config(preset: str, extra: Sequence[str] = ()) -> Any:
        return load_config(preset, [*common, *extra])

    ref_cfg = config(prof.headline[1])
    seed = ref_cfg.train.seed
    d = ref_cfg.data
    if d.dataset != dataset or d.data_dir != ddir:
        how = "set by the overrides"
    test_x, test_y = load_dataset(d.dataset, "test", data_dir=d.data_dir, subset=prof.test_subset, seed=seed)
    train_x, train_y = load_dataset(d.dataset, "train", data_dir=d.data_dir, subset=d.train_subset, seed=seed)
    n_train = train_x.shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    probe_idx = torch.randperm(n_train, generator=gen)[: prof.probe_batch_size]
    probe_x = to_float_normalized(train_x[probe_idx]).to(dev)
    probe_y = train_y[probe_idx].to(dev)
    calib_idx = torch.randperm(n_train, generator=gen)[: prof.bn_recalibration_batches * ref_cfg.train.batch_size]
    calib = [to_float_normalized(train_x[i]).to(dev) for i in calib_idx.split(ref_cfg.train.batch_size) if len(i)]
    trace_x = to_float_normalized(test_x[: prof.probe_batch_size]).to(dev)
    trace_y = test_y[: prof.probe_batch_size].to(dev)
    log(f"profile {prof.name}: dataset {d.dataset} ({how}), {n_train} training images, "
        f"{test_x.shape[0]} test images, device {dev}")

    results: dict[str, Any] = {
        "profile": prof.name,
        "dataset": d.dataset,
        "data_dir": d.data_dir,
        "data_source": how,
        "device": str(dev),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _command(prof.name, out_dir, data_dir, device, max_steps_override),
        "hardware": _hardware(dev),
        "settings": {
            "overrides": common,
            "test_images": int(test_x.shape[0]),
            "train_images": int(n_train),
            "bn_recalibration_images": sum(int(c.shape[0]) for c in calib),
            "batch_size": ref_cfg.train.batch_size,
            "profile": _json_safe(dataclasses.asdict(prof)),
        },
    }

    runs: dict[str, _Run] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # non-convergence is measured, not warned about
        # -------- baselines: a fixed number of steps (quick) or the preset (full)
        def lip_extra(base_seconds: float | None) -> list[str]:
            if prof.match_baseline_time:
                cap = "null" if max_steps_override is None else str(4 * max_steps_override)
                return [f"train.max_steps={cap}", f"train.max_seconds={base_seconds}"]
            return [] if max_steps_override is None else [f"train.max_steps={max_steps_override}"]

        lip_expected = {} if prof.match_baseline_time else {
            name: _expected_steps(config(name, lip_extra(None)), n_train) for name in prof.lipschitz}
        for name in prof.baselines:
            steps = max_steps_override if max_steps_override is not None else prof.baseline_max_steps
            cfg = config(name, [] if steps is None else [f"train.max_steps={steps}"])
            total = _expected_steps(cfg, n_train)
            targets = {min(total, n) for n in lip_expected.values()}
            every = max(total // prof.snapshots, 1)
            log(f"training {name}: {total} steps (snapshot every {every})")
            runs[name] = _train_with_snapshots(name, cfg, out_dir / "runs" / name, every, targets, device)
            log(f"  {name}: {runs[name].steps} steps in {runs[name].train_seconds:.1f} s of training")
        # -------- Lipschitz models: the baseline's elapsed time (quick) or the preset (full)
        head_base = runs[prof.headline[1]]
        for name in prof.lipschitz:
            cfg = config(name, lip_extra(head_base.train_seconds))
            targets = {runs[b].steps for b in prof.baselines}
            if prof.match_baseline_time:
                every = max(head_base.steps // prof.snapshots, 1)
                budget = f"{head_base.train_seconds:.1f} s (the {head_base.name} run's training time)"
            else:
                every = max(_expected_steps(cfg, n_train) // prof.snapshots, 1)
                budget = f"{_expected_steps(cfg, n_train)} steps"
            log(f"training {name}: {budget}")
            runs[name] = _train_with_snapshots(name, cfg, out_dir / "runs" / name, every, targets, device)
            log(f"  {name}: {runs[name].steps} steps in {runs[name].train_seconds:.1f} s of training")

        # -------- per model: evaluations, probes, certificates
        models: dict[str, Any] = {}
        for name, r in runs.items():
            is_lip = name in prof.lipschitz
            final = max(r.snapshots)
            middle = min(r.snapshots, key=lambda s: (abs(s - final / 2), s))
            required = {final, middle}
            if is_lip:
                required |= {max((s for s in r.snapshots if s <= runs[b].steps), default=min(r.snapshots))
                             for b in prof.baselines}
            else:
                required |= {max((s for s in r.snapshots if s <= runs[lp].steps), default=min(r.snapshots))
                             for lp in prof.lipschitz}
            eval_steps = _choose_evals(list(r.snapshots), required, prof.max_evals)
            log(f"evaluating {name} at steps {eval_steps}; probing at 0, {middle}, {final}")
            init_model = _model_from_state(r.cfg, None, dev, seed)
            entry: dict[str, Any] = {
                "preset": name,
                "kind": "lipschitz" if is_lip else "baseline",
                "parameters": init_model.num_parameters(),
                "parameters_f": init_model.num_parameters("f"),
                "hyper_bound": init_model.lipschitz_bound(mode="hyper").value,
                "certificate_init": init_model.lipschitz_bound().value,
                "steps": r.steps,
                "train_seconds": r.train_seconds,
                "stopped_by": r.stopped_by,
                "step_time_trained": _median([x["step_time"] for x in r.records[len(r.records) // 2:]]),
                "step_time_all": _median([x["step_time"] for x in r.records[1:]]),
                "probes": {"init": {"step": 0, "elapsed": 0.0, **_probe(init_model, probe_x, probe_y, seed + 2)}},
                "evals": [],
                "records": r.records,
            }
            del init_model
            for s in sorted(set(eval_steps) | {middle, final}):
                elapsed, path = r.snapshots[s]
                state = _load_state(path)
                if s in eval_steps:
                    model = _model_from_state(r.cfg, state, dev, seed)
                    ev = _evaluate(model, test_x, test_y, prof.eval_batch_size, dev, calib)
                    entry["evals"].append({"step": s, "elapsed": elapsed, **ev})
                if s in (middle, final):
                    model = _model_from_state(r.cfg, state, dev, seed)
                    label = "end" if s == final else "middle"
                    entry["probes"][label] = {"step": s, "elapsed": elapsed, **_probe(model, probe_x, probe_y,
                                                                                        seed + 2)}
                    if s == final:
                        entry["certificate_final"] = model.lipschitz_bound().value
                        log(f"  residual traces of trained {name}")
                        model = _model_from_state(r.cfg, state, dev, seed)
                        recalibrate_batchnorm(model, calib)
                        entry["traces"] = residual_traces(model, trace_x, trace_y, prof.trace_iters)
            end_eval = entry["evals"][-1]
            entry["inference_s_per_image"] = end_eval["seconds_per_image"]
            entry["accuracy_final"] = end_eval["accuracy"]
            end_probe = entry["probes"]["end"]
            entry["peak_memory"] = {
                "cuda_peak_bytes": end_probe["cuda_peak_bytes"],
                "saved_tensor_bytes": end_probe["saved_tensor_bytes"],
            }
            models[name] = entry
        results["models"] = models

        # -------- pairs: each Lipschitz model against each baseline
        results["pairs"] = [_compare(models[lp], models[b]) for lp in prof.lipschitz for b in prof.baselines]

        # -------- sweep of the Lipschitz layer
        log(f"sweep of {prof.sweep_preset}: one knob at a time, {prof.sweep_steps} steps per point")
        base_early = _median([x["step_time"] for x in runs[prof.headline[1]].records[1: prof.sweep_steps]])
        base_inference = models[prof.headline[1]]["inference_s_per_image"]
        results["sweep"] = _sweep(prof, config, train_x, train_y, dev, seed, base_early, base_inference,
                                  prof.headline[1], load_dataset, log, calib)

        # -------- memory against the forward cap
        log("memory bench (mdeq_tiny, one training step per forward cap)")
        from lipdeq.benchmarks import memory

        mem = memory.run(device=str(dev), f_thres=prof.memory_f_thres, batch_size=prof.memory_batch_size,
                         overrides=[o for o in overrides if o.startswith("model.")] if overrides else ())
        results["memory"] = mem

    results["summary"], results["targets"] = _summary_and_targets(results, prof)
    results["wall_seconds"] = time.perf_counter() - t_start
    results["hardware"]["max_rss_mib"] = _max_rss_mib()
    _plots(results, out_dir)
    md = format_markdown(results)
    (out_dir / "results.md").write_text(md, encoding="utf-8")
    (out_dir / "results.json").write_text(json.dumps(_json_safe(results), indent=1), encoding="utf-8")
    if verbose:
        print()
        print(md)
        print(f"written: {out_dir / 'results.json'}, {out_dir / 'results.md'}, plots in {out_dir}")
    return results


def _max_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


def _command(profile: str, out_dir: Path, data_dir: str | None, device: str | None, max_steps: int | None) -> str:
    env = os.environ.get("OMP_NUM_THREADS")
    parts = ([f"OMP_NUM_THREADS={env}"] if env else []) + ["lipdeq", "bench", f"--{profile}"]
    if data_dir:
        parts += ["--data-dir", str(data_dir)]
    if device:
        parts += ["--device", device]
    parts += ["--out", str(out_dir)]
    if max_steps is not None:
        parts.append(f"(python: max_steps_override={max_steps})")
    return " ".join(parts)


def _hardware(dev: torch.device) -> dict[str, Any]:
    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    try:
        hw["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    if dev.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(dev)
    return hw


def _eval_at(entry: dict[str, Any], *, max_step: int | None = None, max_elapsed: float | None = None) -> dict | None:
    """The last evaluation with ``step <= max_step`` / ``elapsed <= max_elapsed``."""
    ok = [e for e in entry["evals"] if (max_step is None or e["step"] <= max_step)
          and (max_elapsed is None or e["elapsed"] <= max_elapsed)]
    return ok[-1] if ok else None


def _compare(lip: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Speed-ups and accuracies of a Lipschitz model against a baseline."""
    n = min(lip["steps"], base["steps"])
    t = min(lip["train_seconds"], base["train_seconds"])
    lip_n, base_n = _eval_at(lip, max_step=n), _eval_at(base, max_step=n)
    # a run stops at the first step past its budget: allow one (median) step beyond t
    lip_t = _eval_at(lip, max_elapsed=t + lip["step_time_all"])
    base_t = _eval_at(base, max_elapsed=t + base["step_time_all"])
    half = [r["step_time"] for r in lip["records"] if n / 2 < r["step"] <= n]
    half_b = [r["step_time"] for r in base["records"] if n / 2 < r["step"] <= n]

    def acc(e: dict | None) -> dict[str, Any]:
        return {"accuracy": e["accuracy"], "accuracy_se": e["accuracy_se"], "step": e["step"],
                "elapsed": e["elapsed"]} if e else {"accuracy": float("nan")}

    return {
        "lipschitz": lip["preset"],
        "baseline": base["preset"],
        "train_step_speedup": _ratio(base["step_time_trained"], lip["step_time_trained"]),
        "train_step_speedup_equal_steps": _ratio(_median(half_b), _median(half)),
        "inference_speedup": _ratio(base["inference_s_per_image"], lip["inference_s_per_image"]),
        "inference_speedup_equal_steps": _ratio(base_n["seconds_per_image"] if base_n else None,
                                                lip_n["seconds_per_image"] if lip_n else None),
        "equal_steps": {"steps": n, "baseline": acc(base_n), "lipschitz": acc(lip_n)},
        "equal_wallclock": {"seconds": t, "baseline": acc(base_t), "lipschitz": acc(lip_t)},
    }


def _sweep(prof: Profile, config: Callable[..., Any], train_x: torch.Tensor, train_y: torch.Tensor,
           dev: torch.device, seed: int, base_step_time: float, base_inference: float, base_name: str,
           load_dataset: Callable[..., Any], log: Callable[[str], None],
           calib: Sequence[torch.Tensor]) -> dict[str, Any]:
    """One-at-a-time sweep around the reference Lipschitz settings."""
    from lipdeq.data import BatchIterator
    from lipdeq.training.trainer import build_optimizer

    ref = config(prof.sweep_preset)
    reference = {k: getattr(ref.model, k) for k, _ in prof.sweep_knobs}
    points: list[tuple[str, dict[str, float]]] = [("reference", {})]
    for knob, values in prof.sweep_knobs:
        points += [(f"{knob}={v:g}", {knob: v}) for v in values if not math.isclose(v, reference[knob])]
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
    for label, change in points:
        cfg = config(prof.sweep_preset, [f"model.{k}={v}" for k, v in change.items()])
        model = _model_from_state(cfg, None, dev, seed)
        hyper = model.lipschitz_bound(mode="hyper").value
        cert_init = model.lipschitz_bound().value
        opt = build_optimizer(model, cfg)
        steps = []
        model.train()
        for x, y in batches:
            x, y = x.to(dev), y.to(dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            sol = model.last_solution
            steps.append({"step_time": dt, "loss": float(loss.detach()), **_solution_stats("forward", sol),
                          **_solution_stats("backward", sol.backward)})
        ev = _evaluate(model, test_x, test_y, prof.eval_batch_size, dev, calib)
        step_time = _median([s["step_time"] for s in steps[1:]] or [steps[0]["step_time"]])
        row = {
            "point": label, **{k: change.get(k, reference[k]) for k in reference},
            "hyper_bound": hyper, "hyper_certified": bool(hyper < 1.0),
            "certificate_init": cert_init, "certificate_trained": ev["certificate"],
            "step_time": step_time, "train_step_speedup": _ratio(base_step_time, step_time),
            "first_step": {k: v for k, v in steps[0].items() if k.endswith(("_mean", "_p95", "_max", "_frac"))},
            "last_step": {k: v for k, v in steps[-1].items() if k.endswith(("_mean", "_p95", "_max", "_frac"))},
            "accuracy": ev["accuracy"], "accuracy_se": ev["accuracy_se"],
            "inference_s_per_image": ev["seconds_per_image"],
            "inference_speedup": _ratio(base_inference, ev["seconds_per_image"]),
        }
        rows.append(row)
        log(f"  sweep {label}: hyper {hyper:.3f}, cert {ev['certificate']:.3f}, "
            f"fwd {row['last_step'].get('forward_nstep_mean', float('nan')):.1f}, step {step_time:.2f} s")
    return {"preset": prof.sweep_preset, "steps": prof.sweep_steps, "baseline": base_name,
            "baseline_step_time": base_step_time, "baseline_inference_s_per_image": base_inference,
            "test_images": int(test_x.shape[0]), "reference": reference,
            "points": rows}


def _summary_and_targets(results: dict[str, Any], prof: Profile) -> tuple[dict[str, Any], dict[str, Any]]:
    lip_name, base_name = prof.headline
    pair = next(p for p in results["pairs"] if p["lipschitz"] == lip_name and p["baseline"] == base_name)
    wc, es = pair["equal_wallclock"], pair["equal_steps"]
    summary = {
        "profile": results["profile"],
        "dataset": results["dataset"],
        "device": results["device"],
        "date": results["date"],
        "command": results["command"],
        "baseline": base_name,
        "lipschitz": lip_name,
        "train_step_speedup": pair["train_step_speedup"],
        "inference_speedup": pair["inference_speedup"],
        "accuracy_baseline": wc["baseline"]["accuracy"],
        "accuracy_lipschitz": wc["lipschitz"]["accuracy"],
        "accuracy_basis": f"equal wall-clock ({wc['seconds']:.1f} s of training)",
        "accuracy_baseline_equal_steps": es["baseline"]["accuracy"],
        "accuracy_lipschitz_equal_steps": es["lipschitz"]["accuracy"],
        "equal_steps": es["steps"],
        "certificate_lipschitz": results["models"][lip_name].get("certificate_final"),
    }
    drop = es["baseline"]["accuracy"] - es["lipschitz"]["accuracy"]
    mem = results["memory"]

    def z(side: dict[str, Any]) -> float:
        se = math.hypot(side["lipschitz"].get("accuracy_se", float("nan")), side["baseline"].get("accuracy_se",
                                                                                              float("nan")))
        return (side["lipschitz"]["accuracy"] - side["baseline"]["accuracy"]) / se if se > 0 else float("nan")

    targets = {
        "train_step_speedup": {"target": f">= {TARGETS['train_step_speedup']}x", "measured": pair["train_step_speedup"],
                               "met": bool(pair["train_step_speedup"] >= TARGETS["train_step_speedup"])},
        "inference_speedup": {"target": f">= {TARGETS['inference_speedup']}x", "measured": pair["inference_speedup"],
                              "met": bool(pair["inference_speedup"] >= TARGETS["inference_speedup"])},
        "accuracy_equal_wallclock": {
            "target": "Lipschitz higher than the baseline",
            "measured": wc["lipschitz"]["accuracy"] - wc["baseline"]["accuracy"],
            "z": z(wc),
            "met": bool(wc["lipschitz"]["accuracy"] > wc["baseline"]["accuracy"]),
        },
        "accuracy_equal_steps": {
            "target": "Lipschitz at most 1 point below the baseline",
            "measured": -drop,
            "z": z(es),
            "met": bool(drop <= TARGETS["equal_steps_drop"] + 1e-12),
        },
        "memory_flat": {"target": f"ratio f_thres {mem['f_thres'][-1]} / {mem['f_thres'][0]} <= 1.10",
                        "measured": mem["ratio_ift"], "met": bool(mem["ratio_ift"] <= TARGETS["memory_ratio"])},
    }
    return summary, targets


# ---------------------------------------------------------------------------------------------- report
def _f(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf (none)"
    return format(v, spec)


def _bytes(v: int | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:.1f} MiB"


def format_markdown(results: dict[str, Any]) -> str:
    """results.md: the tables, with what each number is."""
    s, models, t = results["summary"], results["models"], results["targets"]
    names = list(models)
    hw = results["hardware"]
    st = results["settings"]
    lines = [
        f"# lipdeq bench — {results['profile']} profile",
        "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; wall time {results['wall_seconds']:.0f} s",
        f"- data: {results['dataset']} ({results['data_source']}); {st['train_images']} training images, "
        f"test subset of {st['test_images']} images (accuracy standard error about "
        f"{100 * math.sqrt(0.25 / max(st['test_images'], 1)):.1f} points); batch {st['batch_size']}",
        f"- device: {results['device']}; {hw['processor']}, {hw['cpu_count']} CPUs, {hw['torch_threads']} torch "
        f"threads, torch {hw['torch']}" + (f", GPU {hw['gpu']}" if "gpu" in hw else "")
        + (f"; load average at start {hw['load_average_at_start'][0]:.2f}" if "load_average_at_start" in hw else ""),
        "",
        f"## Headline: {s['lipschitz']} against {s['baseline']}",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| train-step speed-up >= 4.75x | {_f(t['train_step_speedup']['measured'], '.2f')}x | "
        f"{t['train_step_speedup']['met']} |",
        f"| inference speed-up >= 4x | {_f(t['inference_speedup']['measured'], '.2f')}x | "
        f"{t['inference_speedup']['met']} |",
        f"| accuracy higher at equal wall-clock | {_f(s['accuracy_lipschitz'])} vs {_f(s['accuracy_baseline'])} "
        f"({s['accuracy_basis']}; difference {_f(t['accuracy_equal_wallclock']['z'], '+.1f')} standard errors) | "
        f"{t['accuracy_equal_wallclock']['met']} |",
        f"| accuracy within 1 point at equal steps ({s['equal_steps']}) | "
        f"{_f(s['accuracy_lipschitz_equal_steps'])} vs {_f(s['accuracy_baseline_equal_steps'])} (difference "
        f"{_f(t['accuracy_equal_steps']['z'], '+.1f')} standard errors) | {t['accuracy_equal_steps']['met']} |",
        f"| training memory flat in f_thres (<= 1.10) | {_f(t['memory_flat']['measured'], '.3f')}x | "
        f"{t['memory_flat']['met']} |",
        "",
        "Speed-ups are baseline time / Lipschitz time. Train step: median step time over the second half of "
        "each model's own run (weights trained as far as this profile goes). Inference: seconds per test "
        "image of each model's final weights (eval mode). Accuracy at equal wall-clock: each model's last "
        "evaluated snapshot within the shorter run's training time (plus one step). Standard errors: binomial, "
        "from the test subset size; a difference within about 2 of them is not resolved by this test set."
        + (f" Before every evaluation the BatchNorm running statistics (stem and head) are re-estimated on "
           f"{st['bn_recalibration_images']} fixed training images (precise BN, same for every model): with "
           "the N(0, 0.01) init the activations' variances are about 1e-4, and running variances initialised "
           "to 1 with momentum 0.1 need hundreds of steps to forget that start, so eval-mode accuracy is near "
           "chance for the first ~100 steps without it." if st.get("bn_recalibration_images") else ""),
        "",
        "## Per model",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]

    def row(label: str, fn: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(models[n]) for n in names) + " |")

    row("parameters (all / in f)", lambda m: f"{m['parameters']:,} / {m['parameters_f']:,}")
    row("hyperparameter bound on Lip(f) (every conv at its cap)", lambda m: _f(m["hyper_bound"]))
    row("certified Lip(f) bound, weights: init / trained",
        lambda m: f"{_f(m['certificate_init'])} / {_f(m.get('certificate_final'))}")
    row("training steps / training seconds", lambda m: f"{m['steps']} / {m['train_seconds']:.1f}")
    row("train step time, median of 2nd half (s)", lambda m: _f(m["step_time_trained"]))
    row("inference per image, final weights (ms)", lambda m: _f(1e3 * m["inference_s_per_image"], ".2f"))
    row("test accuracy, final weights", lambda m: _f(m["accuracy_final"]))
    for phase in ("init", "middle", "end"):
        row(f"probe at {phase}: step", lambda m, p=phase: str(m["probes"][p]["step"]))
        row(f"  forward iterations mean / p95 ({phase})",
            lambda m, p=phase: f"{_f(m['probes'][p].get('forward_nstep_mean'), '.1f')} / "
                               f"{_f(m['probes'][p].get('forward_nstep_p95'), '.1f')}")
        row(f"  backward iterations mean / p95 ({phase})",
            lambda m, p=phase: f"{_f(m['probes'][p].get('backward_nstep_mean'), '.1f')} / "
                               f"{_f(m['probes'][p].get('backward_nstep_p95'), '.1f')}")
        row(f"  final rel. residual fwd / bwd, max over batch ({phase})",
            lambda m, p=phase: f"{_f(m['probes'][p].get('forward_rel_residual_max'), '.1e')} / "
                               f"{_f(m['probes'][p].get('backward_rel_residual_max'), '.1e')}")
        row(f"  converged fraction fwd / bwd ({phase})",
            lambda m, p=phase: f"{_f(m['probes'][p].get('forward_converged_frac'), '.2f')} / "
                               f"{_f(m['probes'][p].get('backward_converged_frac'), '.2f')}")
    row("peak memory of a training step: CUDA allocator", lambda m: _bytes(m["peak_memory"]["cuda_peak_bytes"])
        if m["peak_memory"]["cuda_peak_bytes"] is not None else "n/a (CPU)")
    row("saved-for-backward tensors of a training step", lambda m: _bytes(m["peak_memory"]["saved_tensor_bytes"]))
    lines += [
        "",
        "Probes: one forward + backward pass (no update) on a fixed training batch with fixed dropout masks, "
        "at the initial weights, the snapshot nearest the middle of training and the final weights; "
        "iterations are per-sample counts of f evaluations (mean, 95th percentile over the batch). "
        "Saved-for-backward: bytes of the distinct tensors autograd keeps for backward (parameters "
        "excluded), an honest proxy of activation memory on CPU, where no allocator peak is available.",
        "",
        "## Speed-ups and accuracy, each Lipschitz model against each baseline",
        "",
        "| Lipschitz | baseline | train step speed-up (trained / equal steps) | inference speed-up (final / equal "
        "steps) | accuracy at equal steps (steps): Lipschitz vs baseline | accuracy at equal wall-clock (s): "
        "Lipschitz vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["pairs"]:
        es, wc = p["equal_steps"], p["equal_wallclock"]
        lines.append(
            f"| {p['lipschitz']} | {p['baseline']} | {_f(p['train_step_speedup'], '.2f')}x / "
            f"{_f(p['train_step_speedup_equal_steps'], '.2f')}x | {_f(p['inference_speedup'], '.2f')}x / "
            f"{_f(p['inference_speedup_equal_steps'], '.2f')}x | {_f(es['lipschitz']['accuracy'])} (step "
            f"{es['lipschitz'].get('step', '-')}) vs {_f(es['baseline']['accuracy'])} (step "
            f"{es['baseline'].get('step', '-')}) | {_f(wc['lipschitz']['accuracy'])} (step "
            f"{wc['lipschitz'].get('step', '-')}, {_f(wc['lipschitz'].get('elapsed'), '.0f')} s) vs "
            f"{_f(wc['baseline']['accuracy'])} (step {wc['baseline'].get('step', '-')}, "
            f"{_f(wc['baseline'].get('elapsed'), '.0f')} s) |"
        )
    lines += ["", "## Evaluations along training", "",
              "| model | step | training s | accuracy | ms / image | forward iterations mean / p95 | certificate |",
              "|---|---|---|---|---|---|---|"]
    for n in names:
        for e in models[n]["evals"]:
            lines.append(
                f"| {n} | {e['step']} | {e['elapsed']:.1f} | {_f(e['accuracy'])} | "
                f"{_f(1e3 * e['seconds_per_image'], '.2f')} | {_f(e.get('forward_nstep_mean'), '.1f')} / "
                f"{_f(e.get('forward_nstep_p95'), '.1f')} | {_f(e['certificate'])} |"
            )
    sw = results["sweep"]
    lines += [
        "",
        f"## Sweep of the Lipschitz layer ({sw['preset']}, one knob at a time around {sw['reference']})",
        "",
        f"Each point: {sw['steps']} training steps from the same initial seed on the same batches; step time is "
        f"the median over steps 2..{sw['steps']}; speed-up against {sw['baseline']}'s median over its own steps "
        f"2..{sw['steps']} ({_f(sw['baseline_step_time'])} s); accuracy on {sw['test_images']} test images after "
        "these few steps is indicative only. Inference speed-up: against the final weights of "
        f"{sw['baseline']} ({_f(1e3 * sw.get('baseline_inference_s_per_image', float('nan')), '.2f')} ms / image). "
        "A hyperparameter bound >= 1 means the layer is not certified a priori (its current weights may still be).",
        "",
        "| point | hyper bound | certified a priori | weights bound init / trained | fwd iters first / last step "
        "(mean) | bwd iters first / last | step s | train speed-up | inference speed-up | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sw["points"]:
        fs, ls = r["first_step"], r["last_step"]
        lines.append(
            f"| {r['point']} | {_f(r['hyper_bound'])} | {'yes' if r['hyper_certified'] else 'not certified'} | "
            f"{_f(r['certificate_init'])} / {_f(r['certificate_trained'])} | "
            f"{_f(fs.get('forward_nstep_mean'), '.1f')} / {_f(ls.get('forward_nstep_mean'), '.1f')} | "
            f"{_f(fs.get('backward_nstep_mean'), '.1f')} / {_f(ls.get('backward_nstep_mean'), '.1f')} | "
            f"{_f(r['step_time'], '.2f')} | {_f(r['train_step_speedup'], '.2f')}x | "
            f"{_f(r.get('inference_speedup', float('nan')), '.2f')}x | {_f(r['accuracy'])} |"
        )
    mem = results["memory"]
    lines += [
        "",
        f"## Training memory against the forward cap ({mem['preset']}, batch {mem['batch_size']}, f_tol 1e-12)",
        "",
        "| backward | f_thres | saved-for-backward | CUDA peak | step s |",
        "|---|---|---|---|---|",
    ]
    for mode in ("ift", "unrolled"):
        for r in mem.get(mode, []):
            lines.append(f"| {'implicit (IFT)' if mode == 'ift' else 'unrolled (pretrain_layers = f_thres)'} | "
                         f"{r['f_thres']} | {_bytes(r['saved_tensor_bytes'])} | {_bytes(r['cuda_peak_bytes'])} | "
                         f"{r['seconds']:.2f} |")
    lines += [
        "",
        f"Ratio f_thres {mem['f_thres'][-1]} / {mem['f_thres'][0]}: implicit {_f(mem['ratio_ift'], '.3f')}x"
        + (f", unrolled control {_f(mem['ratio_unrolled'], '.2f')}x" if "ratio_unrolled" in mem else "")
        + f" ({mem['metric']}).",
        "",
        "Plots: `residuals.png` (forward and backward relative residual against iteration, trained models), "
        "`accuracy_vs_time.png`, `iterations.png` (solver iterations along training), `sweep.png` (speed-up and "
        "accuracy against the certified bound).",
    ]
    if results["profile"] == "quick":
        lines += [
            "",
            "What this does not show: a CPU, a few minutes, batch 32, no MDEQ pretraining, a test subset; "
            "accuracies are early-training figures with the standard error above, not converged ones; "
            "timings depend on the machine's load from other processes.",
        ]
    return "\n".join(lines) + "\n"


def _plots(results: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    # residual against iteration
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in models.items():
        for ax, key in zip(axes, ("forward", "backward")):
            tr = torch.tensor(m.get("traces", {}).get(key) or [[float("nan")]], dtype=torch.float64)
            it = torch.arange(1, tr.shape[0] + 1)
            med = tr.median(dim=1).values
            (line,) = ax.semilogy(it, med, label=f"{name} (median)")
            ax.fill_between(it, tr.min(dim=1).values, tr.max(dim=1).values, color=line.get_color(), alpha=0.2)
    for ax, key in zip(axes, ("forward", "backward (adjoint)")):
        ax.set(xlabel="solver iteration (f evaluations)", ylabel="relative residual", title=f"{key}, trained weights")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "residuals.png", dpi=100)
    plt.close(fig)
    # accuracy against wall-clock
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        ev = m["evals"]
        ax.plot([e["elapsed"] for e in ev], [e["accuracy"] for e in ev], "o-", label=name)
    for p in results["pairs"]:
        ax.axvline(p["equal_wallclock"]["seconds"], color="gray", ls=":", lw=1)
    ax.set(xlabel="training time (s, sum of step times)", ylabel="test accuracy", title="accuracy against wall-clock")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_time.png", dpi=100)
    plt.close(fig)
    # iterations along training
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        recs = [r for r in m["records"] if "forward_nstep_mean" in r]
        ax.plot([r["step"] for r in recs], [r["forward_nstep_mean"] for r in recs], label=f"{name} forward")
        ax.plot([r["step"] for r in recs], [r.get("backward_nstep_mean", float("nan")) for r in recs], ls="--",
                label=f"{name} backward")
    ax.set(xlabel="training step", ylabel="solver iterations (batch mean)", title="iterations along training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "iterations.png", dpi=100)
    plt.close(fig)
    # sweep
    pts = results["sweep"]["points"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in pts:
        x = r["certificate_trained"]
        face = "C0" if r["hyper_certified"] else "none"
        for ax, key in zip(axes, ("train_step_speedup", "accuracy")):
            y = r[key]
            if math.isfinite(x) and math.isfinite(y):
                ax.scatter([x], [y], facecolors=face, edgecolors="C0")
                ax.annotate(r["point"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set(xlabel="certified Lip(f) bound of the weights",
                ylabel=f"train-step speed-up vs {results['sweep']['baseline']}",
                title="speed-up against the certificate")
    axes[1].set(xlabel="certified Lip(f) bound of the weights", ylabel="test accuracy (few steps: indicative)",
                title="accuracy against the certificate (hollow: not certified a priori)")
    for ax in axes:
        ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "sweep.png", dpi=100)
    plt.close(fig)
