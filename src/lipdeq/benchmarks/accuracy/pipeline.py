"""The time-to-accuracy profile from end to end: data, the two trainings, the evaluations, the outputs."""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lipdeq.atomic import atomic_write
from lipdeq.benchmarks.accuracy.report import format_report, write_plot
from lipdeq.benchmarks.accuracy.running import EvalJob, run_evaluations, train_runs
from lipdeq.benchmarks.accuracy.summary import eval_grid, interval_means, nearest_epoch, summarize
from lipdeq.benchmarks.accuracy.training import RunSpec
from lipdeq.benchmarks.paper.pipeline import _hardware
from lipdeq.checks import check_int, check_real
from lipdeq.configs import load_config
from lipdeq.data import DATA_DIR_ENV, DataError, load_dataset, resolve_data_dir
from lipdeq.jsonsafe import json_safe
from lipdeq.models import MultiscaleDEQ
from lipdeq.optional import pyplot
from lipdeq.training import precise_bn_batches
from lipdeq.training.device import resolve_device

__all__ = ["DEFAULT_MODELS", "PLOT_FILE", "REPORT_FILE", "RESULTS_FILE", "run"]

DEFAULT_MODELS = ("lipmdeq_tiny", "mdeq_tiny")
RESULTS_FILE, REPORT_FILE, PLOT_FILE = "results.json", "report.txt", "accuracy.png"


def _all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run(
    out_dir: str | os.PathLike[str],
    *,
    minutes: float = 40.0,
    eval_images: int = 1000,
    final_images: int = 10000,
    evals: int = 10,
    data_dir: str | os.PathLike[str] | None = None,
    models: Sequence[str] = DEFAULT_MODELS,
    mode: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    batch_size: int | None = None,
    bn_images: int = 256,
    spacing: str = "geometric",
    pretrain_fraction: float | None = None,
    match_snapshots: int = 100,
    overrides: Sequence[str] = (),
    train_subset: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the time-to-accuracy profile (see :mod:`lipdeq.benchmarks.accuracy`) and write its outputs.

    Args:
        out_dir: results.json, report.txt, accuracy.png; the runs and their snapshots in ``runs/``.
        minutes: training budget per model (sum of step times).
        eval_images / final_images: test images of the curve's evaluations (the first N of the test
            split) and of the final evaluation of each model (0: no final evaluation).
        evals: evaluated snapshots per run (the issue asks for at least 8).
        data_dir: the CIFAR-10 directory, else ``$LIPDEQ_DATA_DIR``; with neither, a DataError.
        models: ``(Lipschitz preset, baseline preset)``.
        mode: ``"parallel"`` (both at once, one process each) or ``"sequential"``; default parallel
            on a CPU, sequential on CUDA (one device).
        threads: torch threads per run (and per evaluation worker); default 1 in parallel mode, all
            cores in sequential mode.
        batch_size: training batch size of both models (default: the presets').
        bn_images: training images of the precise-BN re-estimation before each evaluation.
        spacing: ``"geometric"`` or ``"linear"`` evaluation times (:func:`.summary.eval_grid`).
        pretrain_fraction: fraction of the budget that a model whose preset pretrains (MDEQ)
            trains unrolled; default the preset's ``pretrain_steps`` over its epochs' steps. A
            preset without pretraining (the Lipschitz ones) never pretrains.
        match_snapshots: further snapshots per run, evenly spaced in time, among which the
            equal-epochs comparison picks its point (resolution: budget / this).
        overrides: ``key=value`` configuration overrides applied to both models.
        train_subset: the first N training images instead of all (tests only: the profile is about
            the full set).
        verbose: print progress and the report.

    Returns:
        The object written to results.json.
    """
    t_start = time.perf_counter()
    budget = 60.0 * check_real("minutes", minutes, above=0.0)
    check_int("eval_images", eval_images, minimum=1)
    check_int("final_images", final_images, minimum=0)
    check_int("evals", evals, minimum=2)
    check_int("bn_images", bn_images, minimum=1)
    check_int("match_snapshots", match_snapshots, minimum=0)
    for name, value in (("threads", threads), ("batch_size", batch_size), ("train_subset", train_subset)):
        if value is not None:
            check_int(name, value, minimum=1)
    if pretrain_fraction is not None:
        check_real("pretrain_fraction", pretrain_fraction, above=0.0, inclusive=True, below=1.0, below_inclusive=True)
    models = list(models)
    if len(models) != 2 or models[0] == models[1]:
        raise ValueError(f"models must be two different presets (Lipschitz, baseline), got {models}")
    lip, base = models
    dev = resolve_device(device)
    mode = mode or ("parallel" if dev.type == "cpu" else "sequential")
    if mode not in ("parallel", "sequential"):
        raise ValueError(f"mode must be 'parallel' or 'sequential', got {mode!r}")
    threads = threads or (1 if mode == "parallel" else _all_cores())
    ddir = resolve_data_dir(data_dir)
    if ddir is None:
        raise DataError(f"lipdeq bench accuracy measures real CIFAR-10 and has no synthetic fallback: pass "
                        f"--data-dir DIR (the folder that holds cifar-10-batches-py) or set {DATA_DIR_ENV}=DIR")
    pyplot()  # the figure needs matplotlib: say so now, not after the trainings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if verbose:
            print(f"[accuracy {time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    common = ["data.dataset=cifar10", f"data.data_dir={json.dumps(str(ddir))}",
              f"data.train_subset={json.dumps(train_subset)}",
              *([f"train.batch_size={batch_size}"] if batch_size is not None else []), *overrides]
    cfgs = {n: load_config(n, common) for n in models}
    for n, c in cfgs.items():
        if c.data.dataset != "cifar10":
            raise DataError(f"{n}: the overrides set data.dataset={c.data.dataset!r}; this profile measures CIFAR-10")
    ref = cfgs[lip].train
    sets = {"subset": load_dataset("cifar10", "test", data_dir=ddir, subset=eval_images)}
    if final_images:
        sets["final"] = load_dataset("cifar10", "test", data_dir=ddir, subset=final_images)
    train_x, _ = load_dataset("cifar10", "train", data_dir=ddir, subset=train_subset)
    n_train = int(train_x.shape[0])
    # the same fixed training images for every evaluation of both models (the trainer's selection rule)
    calib = precise_bn_batches(train_x, bn_images, batch_size=ref.batch_size, seed=ref.seed)
    del train_x  # each run loads its own copy
    log(f"CIFAR-10 from {ddir}: {n_train} training images, {sets['subset'][0].shape[0]} test images per curve "
        f"point, {final_images} at the end; {budget:.0f} s of training per model, {mode}, {threads} thread(s)")

    shutil.rmtree(out / "runs" / "eval", ignore_errors=True)
    grid = eval_grid(budget, evals, spacing)
    match = [budget * j / match_snapshots for j in range(1, match_snapshots + 1)]
    specs = []
    for n, c in cfgs.items():
        per_epoch = max(n_train // c.train.batch_size, 1)
        share = min(c.train.pretrain_steps / (c.train.epochs * per_epoch), 1.0)
        frac = pretrain_fraction if pretrain_fraction is not None and share > 0 else share
        run_dir = out / "runs" / n
        if run_dir.exists():  # an earlier run's snapshots and start signals
            shutil.rmtree(run_dir)
        specs.append(RunSpec(n, c.to_dict(), budget, tuple(grid), tuple(match), frac * budget, str(run_dir),
                             None if device is None else str(dev), threads))
    t_train = time.perf_counter()
    saved_threads = torch.get_num_threads()
    try:
        runs = train_runs(specs, mode, log)
        t_eval = time.perf_counter()
        log("trainings done: " + "; ".join(f"{n} {r['steps']} steps, {r['epochs']:.3f} epochs in "
                                            f"{r['train_seconds']:.1f} s" for n, r in runs.items()))
        jobs, equal = _jobs(runs, cfgs, final_images > 0)
        log(f"{len(jobs)} evaluations (precise BN on {sum(int(c.shape[0]) for c in calib)} training images each)")
        if mode == "sequential":
            torch.set_num_threads(threads)
        results_list = run_evaluations(jobs, sets, calib, workers=len(specs) if mode == "parallel" else 1,
                                       threads=threads, device=None if device is None else str(dev),
                                       work_dir=out / "runs" / "eval", log=log, verbose=verbose)
    finally:
        torch.set_num_threads(saved_threads)
    t_done = time.perf_counter()
    by_key = {(r["name"], r["step"], r["images"]): r for r in results_list}
    _remove_unused_snapshots(runs, by_key)

    entries = {n: _entry(n, "lipschitz" if n == lip else "baseline", cfgs[n], runs[n], by_key, final_images > 0)
               for n in models}
    eq_set = "final" if final_images else "subset"
    equal_epochs = {"epoch": equal["epoch"], "set_by": equal["set_by"],
                    **{n: by_key[(n, equal[n], eq_set)] for n in models}}
    summary, targets = summarize(entries, lip, base, equal_epochs)
    results: dict[str, Any] = {
        "profile": "accuracy",
        "command": _command({"minutes": f"{minutes:g}", "eval-images": eval_images, "final-images": final_images,
                             "evals": evals, "models": ",".join(models), "mode": mode, "threads": threads,
                             "batch-size": batch_size, "bn-images": bn_images, "spacing": spacing,
                             "pretrain-fraction": pretrain_fraction, "epoch-snapshots": match_snapshots,
                             "data-dir": data_dir, "device": device, "out": out}, overrides, train_subset),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "dataset": "cifar10", "data_dir": str(ddir), "device": str(dev), "mode": mode,
        "hardware": _hardware(dev),
        "settings": {
            "budget_seconds": budget, "eval_images": int(sets["subset"][0].shape[0]), "final_images": final_images,
            "evals": evals, "spacing": spacing, "eval_grid": grid, "match_snapshots": match_snapshots,
            "threads_per_run": threads, "bn_images": sum(int(c.shape[0]) for c in calib), "train_images": n_train,
            "schedule_horizon": "time (the budget's training seconds)", "overrides": common,
        },
        "models": entries,
        "summary": summary,
        "targets": targets,
        "evaluation": _eval_costs(results_list, models, t_done - t_eval, mode, len(specs)),
        "phase_seconds": {"setup": t_train - t_start, "training": t_eval - t_train, "evaluation": t_done - t_eval},
    }
    results["wall_seconds"] = time.perf_counter() - t_start
    write_plot(results, out / PLOT_FILE)
    text = format_report(results)
    atomic_write(out / REPORT_FILE, text.encode("utf-8"))
    results["wall_seconds"] = time.perf_counter() - t_start
    atomic_write(out / RESULTS_FILE, json.dumps(json_safe(results), indent=1).encode("utf-8"))
    if verbose:
        print()
        print(text)
        print(f"written: {out / RESULTS_FILE}, {out / REPORT_FILE}, {out / PLOT_FILE}")
    return results


def _jobs(runs: dict[str, dict[str, Any]], cfgs: dict[str, Any], final: bool) -> tuple[list[EvalJob], dict]:
    """The evaluations: each run's curve snapshots on the subset, its last snapshot on the final
    images, and the equal-epochs point: the run with fewer epochs at the end sets the epoch, the other
    run's snapshot nearest that epoch is evaluated on the same images as the first run's last one."""
    jobs: dict[tuple[str, int, str], EvalJob] = {}

    def add(name: str, snap: dict[str, Any], images: str) -> None:
        recs = runs[name]["records"]
        cost = statistics.median(r["step_time"] for r in recs) if recs else 1.0
        jobs.setdefault((name, snap["step"], images), EvalJob(name, cfgs[name].to_dict(), snap["path"], images,
                                                              snap["step"], snap["epoch"], snap["elapsed"], cost))

    for n, r in runs.items():
        for s in r["snapshots"]:
            if s["nominal"]:
                add(n, s, "subset")
        if final:
            add(n, r["snapshots"][-1], "final")
    slow = min(runs, key=lambda n: runs[n]["epochs"])
    fast = next(n for n in runs if n != slow)
    target = runs[slow]["epochs"]
    pick = nearest_epoch(runs[fast]["snapshots"], target)
    images = "final" if final else "subset"
    add(slow, runs[slow]["snapshots"][-1], images)
    add(fast, pick, images)
    return list(jobs.values()), {"epoch": target, "set_by": slow, slow: runs[slow]["snapshots"][-1]["step"],
                                 fast: pick["step"]}


def _entry(name: str, role: str, cfg: Any, run: dict[str, Any], by_key: dict, final: bool) -> dict[str, Any]:
    """results.json's record of one model: its run, its curve (subset evaluations with the training
    iterations since the previous point) and its final evaluation."""
    points = sorted((by_key[(name, s["step"], "subset")] for s in run["snapshots"] if s["nominal"]),
                    key=lambda e: e["step"])
    iters = interval_means(run["records"], [e["step"] for e in points])
    curve = [{**e, "train_forward_nstep_mean": it["forward_nstep_mean"],
              "train_backward_nstep_mean": it["backward_nstep_mean"]} for e, it in zip(points, iters)]
    torch.manual_seed(cfg.train.seed)
    model = MultiscaleDEQ(cfg.model)
    keep = ("steps", "batches", "epochs", "steps_per_epoch", "train_images", "train_seconds", "wall_seconds",
            "skipped_steps", "pretrain_seconds", "threads")
    times = [r["step_time"] for r in run["records"]]
    return {
        "preset": name, "role": role, "parameters": model.num_parameters(),
        "hyper_bound": model.lipschitz_bound(mode="hyper").value,
        "batch_size": cfg.train.batch_size, "augment": cfg.data.augment,
        **{k: run[k] for k in keep},
        "step_time_median": statistics.median(times) if times else math.nan,
        "curve": curve,
        "final": by_key[(name, run["snapshots"][-1]["step"], "final")] if final else None,
        "records": run["records"],
    }


def _remove_unused_snapshots(runs: dict[str, dict[str, Any]], by_key: dict) -> None:
    """Delete the snapshots no evaluation used (the equal-epochs candidates not picked)."""
    used = {(name, step) for name, step, _ in by_key}
    for n, r in runs.items():
        for s in r["snapshots"]:
            if (n, s["step"]) not in used:
                Path(s["path"]).unlink(missing_ok=True)


def _eval_costs(results: list[dict[str, Any]], models: Sequence[str], seconds: float, mode: str,
                workers: int) -> dict[str, Any]:
    """How long the evaluations took, per model: inference seconds per image and whole-job seconds
    (precise BN, certificate, inference) per image set, to size a longer run from a short one."""
    per: dict[str, Any] = {}
    for n in models:
        mine = [r for r in results if r["name"] == n]
        per[n] = {
            "seconds_per_image": statistics.median(r["seconds_per_image"] for r in mine),
            "job_seconds": {k: [r["job_seconds"] for r in mine if r["images"] == k] for k in ("subset", "final")},
        }
    return {"seconds": seconds, "jobs": len(results), "workers": workers if mode == "parallel" else 1,
            "per_model": per}


def _command(options: dict[str, Any], overrides: Sequence[str], train_subset: int | None) -> str:
    """The ``lipdeq bench accuracy`` command line that repeats this run (every option spelled out)."""
    env = os.environ.get("OMP_NUM_THREADS")
    parts = [*([f"OMP_NUM_THREADS={env}"] if env else []), "lipdeq", "bench", "accuracy"]
    for key, value in options.items():
        if value is not None:
            parts += [f"--{key}", str(value)]
    for o in overrides:
        parts += ["--set", o]
    if train_subset is not None:
        parts.append(f"(python: train_subset={train_subset})")
    return " ".join(parts)
