"""``lipdeq bench gpu``: the large presets on one CUDA device, in at most 8 minutes (issue 13).

In order, each item only when the global deadline still allows it (otherwise it is recorded as
"skipped: time", never overrun):

1. the CUDA tests (``tests/training/test_cuda.py``, pytest in a subprocess with a timeout);
2. eager throughput of lipmdeq_large, mdeq_large and mdeq_large_reg at batch 128 in float32 and
   bf16 (:func:`lipdeq.benchmarks.throughput.measure`), and the bf16-vs-float32 logits difference
   of each on a fixed batch;
3. training peak memory at f_thres 30 against 5 (:func:`lipdeq.benchmarks.memory.run`);
4. time outside f per solver iteration, checking convergence every iteration and every 4th;
5. the compiled throughput rows, each in a subprocess whose timeout is the time left, while enough
   remains for the training;
6. lipmdeq_large and mdeq_large trained for an equal wall-clock budget (150 s each by default, less if
   the deadline needs it) on CIFAR-10 in bf16, without MDEQ pretraining, then evaluated on the full
   test set; then any compiled row skipped before, if time is left.

``dry_run=True`` runs the same code path at narrow widths, a few steps and synthetic data, in
seconds on the CPU (the test suite runs it). Writes ``results.json`` and ``results.md`` into the
output directory; the targets of the issue get verdicts (:mod:`lipdeq.benchmarks.gpu_report`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lipdeq.atomic import atomic_write
from lipdeq.benchmarks import memory
from lipdeq.benchmarks.gpu_report import format_report, verdicts
from lipdeq.benchmarks.throughput import measure
from lipdeq.configs import load_config
from lipdeq.data.cifar10 import locate_batches_dir, resolve_data_dir
from lipdeq.errors import LipdeqError
from lipdeq.jsonsafe import json_safe
from lipdeq.models import MultiscaleDEQ
from lipdeq.solvers import SolverWarning, solve
from lipdeq.training import train
from lipdeq.training.device import resolve_device

__all__ = ["BUDGET_S", "DRY_RUN", "FULL", "NoCudaError", "Plan", "run"]

BUDGET_S = 480.0
PRESETS = ("lipmdeq_large", "mdeq_large", "mdeq_large_reg")
TRAINED = ("lipmdeq_large", "mdeq_large")
TEST_FILE = Path(__file__).resolve().parents[3] / "tests" / "training" / "test_cuda.py"
_NARROW = ("model.channels=[8,8]", "model.head_channels=[4,4]", "model.final_channels=16", "model.num_groups=4")


class NoCudaError(LipdeqError, RuntimeError):
    """``lipdeq bench gpu`` was asked to run without a CUDA device (and without ``--dry-run``)."""


@dataclass(frozen=True)
class Plan:
    """What a run measures and how long each item is expected to take (for the deadline)."""

    overrides: tuple[str, ...]  # applied to every model (the dry run's narrow widths)
    batch_size: int
    warmup: int
    train_steps: int
    infer_batches: int
    eager_rows: tuple[tuple[str, str], ...]  # (preset, amp) in order
    bf16_presets: tuple[str, ...]  # bf16-vs-float32 logits
    compile_rows: tuple[tuple[str, str], ...]  # (preset, amp), most wanted first
    compile_backend: str
    eager_row_s: float  # expected seconds of one eager throughput row
    compile_row_s: float  # at least this much must be left to start a compiled row
    memory_batch_size: int
    train_seconds: float
    min_train_seconds: float
    train_overhead_s: float  # per trained model: data, evaluation on the test set, checkpoint
    train_overrides: tuple[str, ...]
    test_args: tuple[str, ...]
    tests_timeout_s: float
    solve_repeats: int


FULL = Plan(
    overrides=(), batch_size=128, warmup=2, train_steps=5, infer_batches=3,
    eager_rows=tuple((p, a) for p in PRESETS for a in ("none", "bf16")), bf16_presets=PRESETS,
    compile_rows=(("lipmdeq_large", "bf16"), ("mdeq_large", "bf16"), ("lipmdeq_large", "none"),
                  ("mdeq_large", "none"), ("mdeq_large_reg", "bf16"), ("mdeq_large_reg", "none")),
    compile_backend="inductor", eager_row_s=20.0, compile_row_s=60.0, memory_batch_size=128,
    train_seconds=150.0, min_train_seconds=60.0, train_overhead_s=30.0,
    train_overrides=("data.dataset=cifar10", "data.train_subset=null", "data.test_subset=null"),
    test_args=(), tests_timeout_s=150.0, solve_repeats=3,
)
DRY_RUN = Plan(
    # bf16 is emulated (slow) on most CPUs: one bf16 row, the rest in float32
    overrides=(*_NARROW, "model.f_thres=4", "model.b_thres=4"), batch_size=4, warmup=1, train_steps=1,
    infer_batches=1, eager_rows=(("lipmdeq_large", "none"), ("lipmdeq_large", "bf16"), ("mdeq_large", "none"),
                                 ("mdeq_large_reg", "none")), bf16_presets=("lipmdeq_large",),
    compile_rows=(("lipmdeq_large", "none"),), compile_backend="eager", eager_row_s=0.5, compile_row_s=1.0,
    memory_batch_size=2, train_seconds=1.0, min_train_seconds=0.1, train_overhead_s=1.0,
    train_overrides=("data.dataset=synthetic", "data.train_subset=8", "data.test_subset=8", "train.batch_size=4",
                     "train.eval_batch_size=8", "train.max_steps=2"),
    test_args=("-k", "not on_cpu"), tests_timeout_s=60.0, solve_repeats=1,  # the CUDA cases: they skip
)


class _Clock:
    """The global deadline; ``allows(s)``: at least ``s`` seconds are left."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget = time.monotonic(), budget_s

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def _item(record: dict[str, Any], dev: torch.device) -> Iterator[None]:
    """Record a failure of one item (an untested GPU path must not cost the rest of the run)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - reported in the results, the run goes on
        record["note"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _run_tests(plan: Plan, clock: _Clock, reserve: float, out_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(TEST_FILE), *plan.test_args]
    rec: dict[str, Any] = {"command": " ".join(["python", *cmd[1:]])}
    if not TEST_FILE.is_file():
        rec["note"] = f"skipped: {TEST_FILE} not found (run from a checkout of the repository)"
        return rec
    timeout = min(plan.tests_timeout_s, clock.left() - reserve)
    if timeout < 5.0:
        rec["note"] = "skipped: time"
        return rec
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=TEST_FILE.parents[2])
        text, rec["returncode"] = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        out = err.stdout or b""
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        rec["note"] = f"timed out after {timeout:.0f} s (counts cover the tests finished by then)"
    atomic_write(out_dir / "tests.log", text.encode())
    for outcome in ("passed", "failed", "skipped", "error"):
        rec["errors" if outcome == "error" else outcome] = len(re.findall(rf"::\S+ {outcome.upper()}", text))
    return rec


def _fixed_batch(n: int, dev: torch.device) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1234)).to(dev)


def _bf16_logit_difference(preset: str, plan: Plan, dev: torch.device) -> float:
    """Largest per-sample relative l2 difference of bf16-autocast logits from float32 ones (eval mode)."""
    cfg = load_config(preset, list(plan.overrides))
    torch.manual_seed(0)
    model = MultiscaleDEQ(cfg.model).to(dev).eval()
    x = _fixed_batch(plan.batch_size, dev)
    with torch.no_grad():
        ref = model(x).double()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            low = model(x).double()
    return float(((low - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)).max())


def _outside_f(preset: str, plan: Plan, dev: torch.device) -> dict[str, Any]:
    """Per solver iteration of an eval-mode forward solve: wall time minus the time of one f evaluation
    (measured back to back, one synchronisation per batch of calls), with convergence checked every
    iteration (``check_every_1``) and every 4th (``check_every_4``)."""
    cfg = load_config(preset, list(plan.overrides))
    torch.manual_seed(0)
    model = MultiscaleDEQ(cfg.model).to(dev).eval()
    x = _fixed_batch(plan.batch_size, dev)
    out: dict[str, Any] = {}
    with torch.no_grad(), model.cached_weights():
        f, z0 = model.fixed_point_problem(x)
        f(z0)
        _sync(dev)
        n = 10 if plan is FULL else 2
        t0 = time.perf_counter()
        for _ in range(n):
            f(z0)
        _sync(dev)
        f_s = (time.perf_counter() - t0) / n
        for k in (1, 4):
            m = cfg.model
            kw = dict(method=m.solver, tol=m.f_tol, stop_mode=m.stop_mode, max_iter=m.f_thres, check_every=k)
            solve(f, z0, **kw)  # warm-up
            times, n_f = [], 0
            for _ in range(plan.solve_repeats):
                _sync(dev)
                t0 = time.perf_counter()
                sol = solve(f, z0, **kw)
                _sync(dev)
                times.append(time.perf_counter() - t0)
                n_f = sol.n_f_evals
            solve_s = statistics.median(times)
            out[f"check_every_{k}"] = {
                "solve_s": solve_s, "f_s": f_s, "f_evals": n_f,
                "outside_f_per_iter_s": max(solve_s / n_f - f_s, 0.0),
                "outside_f_fraction": max(1.0 - n_f * f_s / solve_s, 0.0),
            }
    return out


def _compiled_row(preset: str, amp: str, plan: Plan, dev: torch.device, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "lipdeq.benchmarks.throughput", preset, "--amp", amp, "--compile",
           "--compile-backend", plan.compile_backend, "--device", str(dev), "--batch-size", str(plan.batch_size),
           "--warmup", str(plan.warmup), "--train-steps", str(plan.train_steps),
           "--infer-batches", str(plan.infer_batches), *(a for o in plan.overrides for a in ("--set", o))]
    if dev.type == "cpu":
        cmd += ["--threads", str(torch.get_num_threads())]
    base = {"preset": preset, "amp": amp, "compile": True}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "note": f"skipped: time (compiling and measuring ran past {timeout:.0f} s)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {**base, "note": f"error: exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _train_one(preset: str, plan: Plan, dev: torch.device, data_dir: Path | None, budget: float,
               out_dir: Path) -> dict[str, Any]:
    overrides = [*plan.overrides, *plan.train_overrides, f"train.max_seconds={budget}", "train.pretrain_steps=0",
                 "train.amp=bf16", "train.eval_every_epochs=100000", "train.checkpoint_every_epochs=100000",
                 "train.log_every=50"]
    if data_dir is not None:
        overrides.append(f"data.data_dir={json.dumps(str(data_dir))}")
    cfg = load_config(preset, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        res = train(cfg, out_dir / "train" / preset, overwrite=True, device=str(dev), progress=False)
    ev = res.final_eval
    return {"budget_s": budget, "steps": res.step, "train_seconds": res.train_seconds, "stopped_by": res.stopped_by,
            "images_per_s": res.step * cfg.train.batch_size / max(res.train_seconds, 1e-9),
            "accuracy": ev.get("accuracy"), "test_images": ev.get("num_images"), "batch_size": cfg.train.batch_size}


def _environment(dev: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(dev), "device_name": name, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cuda": torch.version.cuda}


def run(
    out_dir: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    train_seconds: float | None = None,
    budget_s: float = BUDGET_S,
) -> dict[str, Any]:
    """Run the GPU bench (see the module docstring); returns the results dict that it also writes.

    Raises :class:`NoCudaError` without a CUDA device unless ``dry_run`` (which runs on the CPU
    unless ``device`` says otherwise).
    """
    if not dry_run and not torch.cuda.is_available():
        raise NoCudaError("lipdeq bench gpu needs a CUDA device, and torch.cuda.is_available() is False on this "
                          "machine; use --dry-run for the tiny CPU form of the same run")
    dev = resolve_device(device or ("cpu" if dry_run else "cuda"))
    if not dry_run and dev.type != "cuda":
        raise NoCudaError(f"lipdeq bench gpu runs on a CUDA device, not {device!r}; use --dry-run on the CPU")
    plan = DRY_RUN if dry_run else FULL
    clock = _Clock(budget_s)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"dry_run": dry_run, "budget_s": budget_s, "batch_size": plan.batch_size,
                               "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "environment": _environment(dev), "skipped": [], "throughput": []}
    skipped: list[str] = results["skipped"]
    data_path: Path | None = None
    can_train = True
    if not dry_run:
        try:
            data_path = locate_batches_dir(resolve_data_dir(data_dir, required=True))
        except LipdeqError as err:
            can_train = False
            skipped.append(f"training: {err}")
    per_model = plan.train_seconds if train_seconds is None else float(train_seconds)
    reserve = 2 * (min(plan.min_train_seconds, per_model) + plan.train_overhead_s) if can_train else 0.0

    results["tests"] = _run_tests(plan, clock, reserve, out)
    results["bf16_logits"] = {}
    for preset, amp in plan.eager_rows:
        row: dict[str, Any] = {"preset": preset, "amp": amp, "compile": False}
        if clock.allows(plan.eager_row_s + reserve):
            with _item(row, dev):
                row = measure(preset, batch_size=plan.batch_size, amp=amp, device=str(dev), warmup=plan.warmup,
                              train_steps=plan.train_steps, infer_batches=plan.infer_batches,
                              overrides=plan.overrides)
        else:
            row["note"] = "skipped: time"
        results["throughput"].append(row)
    for preset in plan.bf16_presets:
        diff: dict[str, Any] = {}
        if clock.allows(plan.eager_row_s / 2 + reserve):
            with _item(diff, dev):
                results["bf16_logits"][preset] = _bf16_logit_difference(preset, plan, dev)
        results["bf16_logits"].setdefault(preset, diff.get("note", "skipped: time"))

    mem: dict[str, Any] = {"preset": "lipmdeq_large", "f_thres": [5, 30]}
    if clock.allows(plan.eager_row_s + reserve):
        with _item(mem, dev), warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)
            m = memory.run(device=str(dev), f_thres=(5, 30), batch_size=plan.memory_batch_size,
                           preset="lipmdeq_large", overrides=plan.overrides, unrolled_control=False)
            mem.update(metric=m["metric"], values=[r[m["metric"]] for r in m["ift"]], ratio=m["ratio_ift"])
    else:
        mem["note"] = "skipped: time"
    results["memory"] = mem

    results["outside_f"] = {}
    for preset in TRAINED:
        rec: dict[str, Any] = {}
        if clock.allows(plan.eager_row_s + reserve):
            with _item(rec, dev), warnings.catch_warnings():
                warnings.simplefilter("ignore", SolverWarning)
                rec = _outside_f(preset, plan, dev)
        else:
            rec["note"] = "skipped: time"
        results["outside_f"][preset] = rec

    compiled: dict[tuple[str, str], dict[str, Any]] = {}

    def compile_pass(keep: float) -> None:
        for preset, amp in plan.compile_rows:
            if (preset, amp) in compiled and "note" not in compiled[preset, amp]:
                continue
            timeout = clock.left() - keep
            if timeout < plan.compile_row_s:
                compiled[preset, amp] = {"preset": preset, "amp": amp, "compile": True, "note": "skipped: time"}
                continue
            compiled[preset, amp] = _compiled_row(preset, amp, plan, dev, timeout)

    compile_pass(reserve)
    results["training"] = {}
    if can_train:
        budget = min(per_model, (clock.left() - 2 * plan.train_overhead_s) / 2)
        for preset in TRAINED:
            rec = {"budget_s": budget}
            if budget < min(plan.min_train_seconds, per_model) or not clock.allows(budget + plan.train_overhead_s):
                rec["note"] = "skipped: time"
            else:
                with _item(rec, dev):
                    rec = _train_one(preset, plan, dev, data_path, budget, out)
            results["training"][preset] = rec
    compile_pass(0.0)
    results["throughput"] += [compiled[k] for k in plan.compile_rows]
    for r in results["throughput"]:
        if "note" in r:
            skipped.append(f"{r['preset']} {r['amp']} compile={'on' if r['compile'] else 'off'}: {r['note']}")
    results["targets"] = verdicts(results)
    results["elapsed_s"] = clock.budget - clock.left()
    results = json_safe(results)
    atomic_write(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write(out / "results.md", format_report(results).encode())
    return results
