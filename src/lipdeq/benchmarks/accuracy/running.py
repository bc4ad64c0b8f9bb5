"""The two trainings (two processes at once, or one after the other) and the evaluations of their snapshots.

Two-process mode: one worker process per model (``python -m lipdeq.benchmarks.accuracy.worker``,
a fresh interpreter: no forked thread pools, and nothing of the caller's script is re-imported),
one torch thread each. Each worker loads its data, says it is ready and waits for the start signal,
which is given when both are ready, so that their training steps overlap from the first to about
the last and both see the same machine. Evaluations start only when both trainings have ended, so
one model's evaluation never slows the other's training; they run in worker processes too, the
jobs split between them by estimated cost (longest first, each to the least loaded worker).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import lipdeq
from lipdeq.benchmarks.accuracy.training import RUN_FILE, RunSpec, train_for_budget
from lipdeq.benchmarks.paper.running import evaluate_snapshot, model_from_state
from lipdeq.configs import config_from_dict
from lipdeq.training.device import resolve_device

__all__ = ["ERROR_FILE", "EvalJob", "evaluate_job", "partition", "run_evaluations", "train_runs"]

ERROR_FILE = "error.txt"
READY_FILE, GO_FILE = "ready", "go"
START_TIMEOUT = 1800.0  # seconds to wait for the workers to load their data


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """One evaluation: the snapshot at ``path`` of model ``name`` on the image set ``images``."""

    name: str
    config: dict[str, Any]
    path: str
    images: str  # "subset" (the curve's fixed subset) or "final"
    step: int
    epoch: float
    elapsed: float
    cost: float = 1.0  # relative cost per image, to balance the workers


def _worker_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(lipdeq.__file__).resolve().parents[1])  # the workers import this very copy of lipdeq
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # the thread pools a fresh interpreter starts with
    return env


def _spawn(kind: str, spec_file: Path, threads: int | None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lipdeq.benchmarks.accuracy.worker", kind, str(spec_file)],
                            env=_worker_env(threads))


def _failure(name: str, proc: subprocess.Popen, folder: Path) -> str:
    err = folder / ERROR_FILE
    tail = err.read_text(encoding="utf-8").strip().splitlines()[-1] if err.exists() else "no traceback"
    return f"{name} (exit code {proc.returncode}: {tail}; see {err})"


def _wait_all(procs: Sequence[subprocess.Popen], names: Sequence[str], folders: Sequence[Path], what: str) -> None:
    """Wait for every worker; one failing stops the others, and the error names it."""
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # reached with live workers only after a failure or an interruption here
            if p.poll() is None:
                p.terminate()
                p.wait()
    failed = [_failure(n, p, f) for n, p, f in zip(names, procs, folders) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{what} failed: " + "; ".join(failed))


def _train_parallel(specs: Sequence[RunSpec]) -> None:
    folders = [Path(s.out_dir) for s in specs]
    procs = []
    for s, f in zip(specs, folders):
        f.mkdir(parents=True, exist_ok=True)
        spec_file = f / "spec.json"
        spec_file.write_text(json.dumps(dataclasses.asdict(s)), encoding="utf-8")
        procs.append(_spawn("train", spec_file, s.threads))
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not all((f / READY_FILE).exists() for f in folders):
            if any(p.poll() is not None for p in procs):
                break  # a worker failed while loading: _wait_all names it and stops the other
            if time.monotonic() > deadline:
                for p in procs:
                    p.terminate()
                raise RuntimeError(f"the training workers were not ready within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
        else:
            for f in folders:  # the start signal: each worker polls for its own file
                (f / GO_FILE).touch()
    finally:
        _wait_all(procs, [s.name for s in specs], folders, "training")
    for f in folders:
        for name in (READY_FILE, GO_FILE):
            (f / name).unlink(missing_ok=True)


def train_runs(specs: Sequence[RunSpec], mode: str, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Train every spec, in worker processes at once (``"parallel"``) or one after the other in this
    process (``"sequential"``); returns each run's record (see :func:`train_for_budget`)."""
    if mode == "sequential":
        for s in specs:
            log(f"training {s.name} for {s.budget_seconds:.0f} s ({s.threads or torch.get_num_threads()} threads)")
            train_for_budget(s, log=log)
    elif mode == "parallel":
        log(f"training {', '.join(s.name for s in specs)} at the same time, {specs[0].budget_seconds:.0f} s each, "
            f"one process each ({specs[0].threads} thread(s))")
        _train_parallel(specs)
    else:
        raise ValueError(f"mode must be 'parallel' or 'sequential', got {mode!r}")
    return {s.name: json.loads((Path(s.out_dir) / RUN_FILE).read_text(encoding="utf-8")) for s in specs}


def evaluate_job(job: EvalJob, sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 calib: Sequence[torch.Tensor], device: str | None) -> dict[str, Any]:
    """Evaluate one snapshot on a fresh copy of the model: BatchNorm statistics re-estimated on
    ``calib`` (precise BN), then accuracy (with its standard error), solver statistics and the
    certificate (:func:`lipdeq.benchmarks.paper.running.evaluate_snapshot`)."""
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = config_from_dict(job.config)
    dev = resolve_device(device)
    model = model_from_state(cfg, load_file(job.path), dev, cfg.train.seed)
    x, y = sets[job.images]
    ev = evaluate_snapshot(model, x, y, cfg.train.eval_batch_size, dev, [c.to(dev) for c in calib])
    return {"name": job.name, "images": job.images, "step": job.step, "epoch": job.epoch, "elapsed": job.elapsed,
            **ev, "job_seconds": time.perf_counter() - t0,
            "job_cpu_seconds": time.process_time() - c0}  # with one thread: the wall time on an idle machine


def partition(costs: Sequence[float], workers: int) -> list[list[int]]:
    """Indices of ``costs`` split into ``workers`` lists: longest first, each to the least loaded."""
    loads = [0.0] * workers
    parts: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        w = min(range(workers), key=lambda k: (loads[k], k))
        parts[w].append(i)
        loads[w] += costs[i]
    return parts


def run_evaluations(jobs: Sequence[EvalJob], sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    calib: Sequence[torch.Tensor], *, workers: int, threads: int | None, device: str | None,
                    work_dir: Path, log: Callable[[str], None], verbose: bool = True) -> list[dict[str, Any]]:
    """Every job's :func:`evaluate_job` result; ``workers > 1``: in that many worker processes
    with ``threads`` threads each (``work_dir`` holds their inputs and outputs; with ``verbose``
    each worker prints a line per job)."""
    sizes = {k: int(v[0].shape[0]) for k, v in sets.items()}
    costs = [j.cost * sizes[j.images] for j in jobs]

    def note(r: dict[str, Any], k: int) -> None:
        log(f"  [{k}/{len(jobs)}] {r['name']} step {r['step']} on {r['num_images']} images: accuracy "
            f"{r['accuracy']:.3f}, {1e3 * r['seconds_per_image']:.1f} ms/image, {r['job_seconds']:.1f} s")

    if workers <= 1:
        done = []
        for i in partition(costs, 1)[0]:
            done.append(evaluate_job(jobs[i], sets, calib, device))
            note(done[-1], len(done))
        return done
    work_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{k}_{part}": v[j] for k, v in sets.items() for j, part in enumerate(("x", "y"))}
    tensors.update({f"calib_{i:04d}": c.cpu().contiguous() for i, c in enumerate(calib)})
    data_file = work_dir / "eval_data.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(data_file))
    procs, folders = [], []
    for w, idx in enumerate(partition(costs, workers)):
        folder = work_dir / f"worker_{w}"
        folder.mkdir(parents=True, exist_ok=True)
        spec = {"jobs": [dataclasses.asdict(jobs[i]) for i in idx], "data": str(data_file), "threads": threads,
                "device": device, "out": str(folder / "results.json"), "verbose": verbose}
        (folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        procs.append(_spawn("eval", folder / "spec.json", threads))
        folders.append(folder)
    log(f"  {len(jobs)} evaluations in {workers} worker processes ({threads} thread(s) each)")
    _wait_all(procs, [f.name for f in folders], folders, "evaluation")
    done = [r for f in folders for r in json.loads((f / "results.json").read_text(encoding="utf-8"))]
    data_file.unlink(missing_ok=True)
    return done


def load_eval_data(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """The image sets and precise-BN batches that :func:`run_evaluations` saved for its workers."""
    t = load_file(str(path))
    sets = {k[: -len("_x")]: (v, t[k[: -len("_x")] + "_y"]) for k, v in t.items() if k.endswith("_x")}
    calib = [t[k] for k in sorted(t) if k.startswith("calib_")]
    return sets, calib
