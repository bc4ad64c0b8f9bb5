"""The bench from end to end: data, training of every model, measurements, sweep, memory, outputs."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lipdeq.benchmarks import memory
from lipdeq.benchmarks.paper.compare import compare_pair, median, summary_and_targets
from lipdeq.benchmarks.paper.plots import write_plots
from lipdeq.benchmarks.paper.profiles import PROFILES, Profile
from lipdeq.benchmarks.paper.report import format_markdown
from lipdeq.benchmarks.paper.running import BenchData, TrainedRun, expected_steps, measure_run, train_with_snapshots
from lipdeq.benchmarks.paper.sweep import run_sweep
from lipdeq.checks import check_int
from lipdeq.configs import load_config
from lipdeq.data import DATA_DIR_ENV, load_dataset, resolve_data_dir, to_float_normalized
from lipdeq.jsonsafe import json_safe
from lipdeq.optional import pyplot
from lipdeq.solvers import SolverWarning
from lipdeq.training.device import resolve_device
from lipdeq.training.precise_bn import precise_bn_batches

__all__ = ["resolve_data", "run"]

NO_DATA_DIR = "no --data-dir and no $LIPDEQ_DATA_DIR: the embedded synthetic set, not CIFAR-10"


def resolve_data(data_dir: str | os.PathLike[str] | None) -> tuple[str, str | None, str]:
    """Which data the bench uses: ``(dataset, data_dir, how)``.

    An explicit ``data_dir`` wins; then ``$LIPDEQ_DATA_DIR`` (left to the data loader, so the
    directory is ``None`` here); with neither, the embedded synthetic set, and ``how`` says so (it is
    logged and written to results.json's ``data_source`` and results.md). No other place is searched.
    """
    if data_dir is not None and str(data_dir) != "":
        return "cifar10", str(data_dir), "--data-dir"
    if resolve_data_dir(None) is not None:
        return "cifar10", None, f"${DATA_DIR_ENV}"
    return "synthetic", None, NO_DATA_DIR


def run(
    out_dir: str | os.PathLike[str],
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
        data_dir: CIFAR-10 directory; see :func:`resolve_data` for what is used without it.
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
    if num_threads is not None:
        check_int("num_threads", num_threads, minimum=1)
    saved_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run(Path(out_dir), profile, data_dir, device, max_steps_override, overrides, profile_options,
                    verbose)
    finally:
        torch.set_num_threads(saved_threads)


def _load_data(prof: Profile, ref_cfg: Any, dev: torch.device) -> BenchData:
    """The training set and the fixed batches (probe, BatchNorm calibration, traces) of every model."""
    seed, d = ref_cfg.train.seed, ref_cfg.data
    test_x, test_y = load_dataset(d.dataset, "test", data_dir=d.data_dir, subset=prof.test_subset, seed=seed)
    train_x, train_y = load_dataset(d.dataset, "train", data_dir=d.data_dir, subset=d.train_subset, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    probe_idx = torch.randperm(train_x.shape[0], generator=gen)[: prof.probe_batch_size]
    batch = ref_cfg.train.batch_size
    return BenchData(
        train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
        probe_x=to_float_normalized(train_x[probe_idx]).to(dev), probe_y=train_y[probe_idx].to(dev),
        trace_x=to_float_normalized(test_x[: prof.probe_batch_size]).to(dev),
        trace_y=test_y[: prof.probe_batch_size].to(dev),
        calib=precise_bn_batches(train_x, prof.bn_recalibration_batches * batch, batch_size=batch, seed=seed,
                                 device=dev),  # the trainer's selection of images (train.eval_precise_bn)
    )


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
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {tuple(PROFILES)}, got {profile!r}")
    prof = dataclasses.replace(PROFILES[profile], **(profile_options or {}))
    if max_steps_override is not None:
        check_int("max_steps_override", max_steps_override, minimum=2)
    pyplot()  # the figures need matplotlib: say so now, not after hours of training
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dev = resolve_device(device)
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
        "train.eval_precise_bn=0",  # the sanity check above needs no precise BN; our evaluations re-estimate
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
    data = _load_data(prof, ref_cfg, dev)
    n_train = data.train_x.shape[0]
    log(f"profile {prof.name}: dataset {d.dataset} ({how}), {n_train} training images, "
        f"{data.test_x.shape[0]} test images, device {dev}")

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
            "test_images": int(data.test_x.shape[0]),
            "train_images": int(n_train),
            "bn_recalibration_images": sum(int(c.shape[0]) for c in data.calib),
            "batch_size": ref_cfg.train.batch_size,
            "profile": json_safe(dataclasses.asdict(prof)),
        },
    }

    runs: dict[str, TrainedRun] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # non-convergence is measured, not warned about
        # -------- baselines: a fixed number of steps (quick) or the preset (full)
        def lip_extra(base_seconds: float | None) -> list[str]:
            if prof.match_baseline_time:
                cap = "null" if max_steps_override is None else str(4 * max_steps_override)
                return [f"train.max_steps={cap}", f"train.max_seconds={base_seconds}"]
            return [] if max_steps_override is None else [f"train.max_steps={max_steps_override}"]

        lip_expected = {} if prof.match_baseline_time else {
            name: expected_steps(config(name, lip_extra(None)), n_train) for name in prof.lipschitz}
        for name in prof.baselines:
            steps = max_steps_override if max_steps_override is not None else prof.baseline_max_steps
            cfg = config(name, [] if steps is None else [f"train.max_steps={steps}"])
            total = expected_steps(cfg, n_train)
            targets = {min(total, n) for n in lip_expected.values()}
            every = max(total // prof.snapshots, 1)
            log(f"training {name}: {total} steps (snapshot every {every})")
            runs[name] = train_with_snapshots(name, cfg, out_dir / "runs" / name, every, targets, device)
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
                every = max(expected_steps(cfg, n_train) // prof.snapshots, 1)
                budget = f"{expected_steps(cfg, n_train)} steps"
            log(f"training {name}: {budget}")
            runs[name] = train_with_snapshots(name, cfg, out_dir / "runs" / name, every, targets, device)
            log(f"  {name}: {runs[name].steps} steps in {runs[name].train_seconds:.1f} s of training")

        # -------- per model: evaluations, probes, certificates
        models: dict[str, Any] = {}
        for name, r in runs.items():
            is_lip = name in prof.lipschitz
            others = [runs[o] for o in (prof.baselines if is_lip else prof.lipschitz)]
            models[name] = measure_run(r, is_lipschitz=is_lip, others=others, prof=prof, data=data, dev=dev,
                                       seed=seed, log=log)
        results["models"] = models

        # -------- pairs: each Lipschitz model against each baseline
        results["pairs"] = [compare_pair(models[lp], models[b]) for lp in prof.lipschitz for b in prof.baselines]

        # -------- sweep of the Lipschitz layer
        log(f"sweep of {prof.sweep_preset}: one knob at a time, {prof.sweep_steps} steps per point")
        base_early = median([x["step_time"] for x in runs[prof.headline[1]].records[1: prof.sweep_steps]])
        base_inference = models[prof.headline[1]]["inference_s_per_image"]
        results["sweep"] = run_sweep(prof, config, data.train_x, data.train_y, dev, seed, base_early, base_inference,
                                     prof.headline[1], log, data.calib)

        # -------- memory against the forward cap
        log("memory bench (mdeq_tiny, one training step per forward cap)")
        mem = memory.run(device=str(dev), f_thres=prof.memory_f_thres, batch_size=prof.memory_batch_size,
                         overrides=[o for o in overrides if o.startswith("model.")] if overrides else ())
        results["memory"] = mem

    results["summary"], results["targets"] = summary_and_targets(results, prof.headline)
    results["wall_seconds"] = time.perf_counter() - t_start
    results["hardware"]["max_rss_mib"] = _max_rss_mib()
    write_plots(results, out_dir)
    md = format_markdown(results)
    (out_dir / "results.md").write_text(md, encoding="utf-8")
    (out_dir / "results.json").write_text(json.dumps(json_safe(results), indent=1), encoding="utf-8")
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
