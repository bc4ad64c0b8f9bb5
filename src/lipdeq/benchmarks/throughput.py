"""Training and inference throughput of one preset: images/s, peak memory, solver iterations.

One measurement builds the preset's model (optionally channels-last, optionally with f compiled),
runs ``warmup`` training steps (the compile happens in the first), then ``train_steps`` timed
training steps (:func:`lipdeq.training.step.train_step`, the trainer's step: forward solve, IFT
backward, Adam update; the Jacobian penalty on the steps where the preset's coin says so) and
``infer_batches`` timed eval-mode forwards, all on one fixed random batch. Times are wall-clock with
a device synchronisation around each step; the rates use the median step. MDEQ pretraining
(unrolled steps) is not measured: every step is an equilibrium step.

``python -m lipdeq.benchmarks.throughput PRESET [options]`` prints one JSON record (the GPU bench
runs the compiled rows this way, in a subprocess with a timeout, so a slow compile cannot overrun
its deadline). ``--compare-compile`` instead times an eager and a compiled copy of the same model
step by step, interleaved (:func:`compare_compile`), so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from lipdeq.configs import load_config
from lipdeq.models import MultiscaleDEQ
from lipdeq.solvers import SolverWarning
from lipdeq.training.device import resolve_device
from lipdeq.training.step import train_step, use_jacobian_penalty
from lipdeq.training.trainer import build_optimizer

__all__ = ["compare_compile", "measure", "main"]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def measure(
    preset: str,
    *,
    batch_size: int = 128,
    amp: str = "none",
    compile: bool = False,
    compile_mode: str = "default",
    compile_backend: str = "inductor",
    channels_last: bool = False,
    device: str | None = None,
    warmup: int = 2,
    train_steps: int = 5,
    infer_batches: int = 3,
    overrides: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """Measure one configuration of ``preset`` (see the module docstring); returns a JSON-safe dict.

    Keys: the settings, ``train_images_per_s``, ``infer_images_per_s``, ``train_step_s`` (median),
    ``infer_batch_s`` (median), ``first_step_s`` (includes compilation), ``train_peak_bytes`` /
    ``infer_peak_bytes`` (``torch.cuda.max_memory_allocated`` above nothing reset, CUDA only, else
    None), ``forward_iters`` / ``backward_iters`` (mean f evaluations of the timed training steps'
    solves), ``infer_forward_iters``, ``jac_steps`` (timed steps with the Jacobian penalty) and
    ``finite`` (every step applied its update).
    """
    if warmup < 1 or train_steps < 1 or infer_batches < 1:
        raise ValueError(f"warmup, train_steps and infer_batches must be >= 1, got {warmup}, {train_steps}, "
                         f"{infer_batches}")
    dev = resolve_device(device)
    cfg = load_config(preset, [*overrides, f"train.amp={amp}", f"train.batch_size={batch_size}",
                               "train.pretrain_steps=0"])
    torch.manual_seed(seed)
    model = MultiscaleDEQ(cfg.model).to(dev)
    if channels_last:
        model.use_channels_last()
    if compile:
        model.compile_f(compile_mode, backend=compile_backend)
    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    size = cfg.model.image_size
    x = torch.randn(batch_size, cfg.model.in_channels, size, size, generator=gen).to(dev)
    y = torch.randint(0, cfg.model.num_classes, (batch_size,), generator=gen).to(dev)
    times, fwd, bwd, jac_steps, finite = [], [], [], 0, True
    first = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # the baselines run at their caps by design
        for step in range(warmup + train_steps):
            timed = step >= warmup
            if step == warmup:
                _peak_reset(dev)
            use_jac = use_jacobian_penalty(cfg.train, step, 0, False)
            model.train()
            _sync(dev)
            t0 = time.perf_counter()
            res = train_step(model, model, x, y, opt, cfg, pretrain=False, use_jac=use_jac)
            _sync(dev)
            dt = time.perf_counter() - t0
            first = dt if step == 0 else first
            finite = finite and res.finite
            if timed:
                times.append(dt)
                jac_steps += int(use_jac)
                sol = model.last_solution
                fwd.append(sol.n_f_evals)
                bwd.append(sol.backward.n_f_evals if sol.backward is not None else 0)
        train_peak = _peak(dev)
        model.eval()
        infer, infer_iters = [], []
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            model(x)  # warm-up (and compilation of the eval-mode graph)
            _peak_reset(dev)
            for _ in range(infer_batches):
                _sync(dev)
                t0 = time.perf_counter()
                model(x)
                _sync(dev)
                infer.append(time.perf_counter() - t0)
                infer_iters.append(model.last_solution.n_f_evals)
        infer_peak = _peak(dev)
    step_s, batch_s = statistics.median(times), statistics.median(infer)
    return {
        "preset": preset, "batch_size": batch_size, "amp": amp, "compile": compile,
        "compile_mode": compile_mode if compile else None, "channels_last": channels_last, "device": str(dev),
        "threads": torch.get_num_threads(),
        "train_images_per_s": batch_size / step_s, "infer_images_per_s": batch_size / batch_s,
        "train_step_s": step_s, "infer_batch_s": batch_s, "first_step_s": first,
        "train_peak_bytes": train_peak, "infer_peak_bytes": infer_peak,
        "forward_iters": statistics.fmean(fwd), "backward_iters": statistics.fmean(bwd),
        "infer_forward_iters": statistics.fmean(infer_iters), "jac_steps": jac_steps, "finite": finite,
    }


def compare_compile(
    preset: str, *, batch_size: int = 32, steps: int = 10, device: str | None = None, mode: str = "default",
    backend: str = "inductor", overrides: Sequence[str] = (), seed: int = 0,
) -> dict[str, Any]:
    """Median training-step and eval-forward times of an eager model and a compiled copy, alternating
    one step of each (after one warm-up step each: the compilation); the graphs compiled in all."""
    from torch._dynamo.utils import counters

    dev = resolve_device(device)
    cfg = load_config(preset, [*overrides, f"train.batch_size={batch_size}", "train.pretrain_steps=0"])
    torch.manual_seed(seed)
    models = {"eager": MultiscaleDEQ(cfg.model).to(dev)}
    models["compiled"] = MultiscaleDEQ(cfg.model).to(dev)
    models["compiled"].load_state_dict(models["eager"].state_dict())
    models["compiled"].compile_f(mode, backend=backend)
    opts = {k: build_optimizer(m, cfg) for k, m in models.items()}
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size, generator=gen)
    y = torch.randint(0, cfg.model.num_classes, (batch_size,), generator=gen)
    x, y = x.to(dev), y.to(dev)
    train_s: dict[str, list[float]] = {k: [] for k in models}
    eval_s: dict[str, list[float]] = {k: [] for k in models}
    first: dict[str, float] = {}
    graphs_after_warmup = 0
    for i in range(steps + 1):
        for k, m in models.items():
            m.train()
            _sync(dev)
            t0 = time.perf_counter()
            train_step(m, m, x, y, opts[k], cfg, pretrain=False, use_jac=False)
            _sync(dev)
            dt = time.perf_counter() - t0
            m.eval()
            with torch.no_grad():
                _sync(dev)
                t1 = time.perf_counter()
                m(x)
                _sync(dev)
            if i == 0:
                first[k] = time.perf_counter() - t0
            else:
                train_s[k].append(dt)
                eval_s[k].append(time.perf_counter() - t1)
        if i == 0:
            graphs_after_warmup = counters["stats"]["unique_graphs"]
    med = {k: (statistics.median(train_s[k]), statistics.median(eval_s[k])) for k in models}
    return {
        "preset": preset, "batch_size": batch_size, "steps": steps, "device": str(dev), "mode": mode,
        "backend": backend, "threads": torch.get_num_threads(),
        "train_step_s": {k: v[0] for k, v in med.items()}, "eval_forward_s": {k: v[1] for k, v in med.items()},
        "train_speedup": med["eager"][0] / med["compiled"][0], "eval_speedup": med["eager"][1] / med["compiled"][1],
        "first_step_and_eval_s": first, "graphs_after_warmup": graphs_after_warmup,
        "graphs_at_end": counters["stats"]["unique_graphs"],
    }


def main(argv: list[str] | None = None) -> int:
    """Command line of ``python -m lipdeq.benchmarks.throughput``: one JSON record on stdout."""
    p = argparse.ArgumentParser(prog="python -m lipdeq.benchmarks.throughput", description=__doc__.split("\n")[0])
    p.add_argument("preset")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--infer-batches", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--compare-compile", action="store_true", help="eager vs compiled, interleaved")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.compare_compile:
        print(json.dumps(compare_compile(a.preset, batch_size=a.batch_size, steps=a.train_steps, device=a.device,
                                         mode=a.compile_mode, backend=a.compile_backend, overrides=a.set)))
        return 0
    record = measure(a.preset, batch_size=a.batch_size, amp=a.amp, compile=a.compile, compile_mode=a.compile_mode,
                     compile_backend=a.compile_backend, channels_last=a.channels_last, device=a.device,
                     warmup=a.warmup, train_steps=a.train_steps, infer_batches=a.infer_batches, overrides=a.set)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
