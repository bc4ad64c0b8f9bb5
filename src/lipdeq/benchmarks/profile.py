"""Where a training step and an inference batch spend their time: ``lipdeq bench profile``.

One model of a preset (default lipmdeq_tiny, batch 32, the current thread count) runs ``warmup``
then ``steps`` timed training steps (the trainer's :func:`~lipdeq.training.step.train_step`) and as
many pairs of eval-mode forwards (the first after the step's weight change, then the same weights
again, which is what inference and evaluation loops run), on one fixed random batch. Each phase is
timed by wall-clock hooks, with a device synchronisation at every boundary, and reported as the
median over the timed steps:

========================  ==================================================================
``cap``                   computing the parametrised weights of every conv (weight norm and the
                          operator-norm caps: DFT blocks, power iteration, sigma), once per forward
``certificate``           the Lipschitz constant the forward uses (training: the running
                          certificate; eval: the FFT certificate, cached while the weights stay)
``stem``                  the stem and the injection module
``solve``                 the graph-free evaluations of f, and the solver's own work around them
                          (``solve_outside_f``)
``graph_step``            the evaluation of f that carries the graph (the certified budget's last
                          step, or the residual path's re-evaluation at z*)
``head``                  the classification head
``backward_adjoint``      the adjoint solve's vector-Jacobian products (and its solver work)
``backward_rest``         back-propagation through f's graph, the head, the stem and the caps
``optimizer``             the Adam update and the rest of the step (the loss, the non-finite checks)
========================  ==================================================================

The sum of the phases is the measured step. The f-evaluation and vector-Jacobian-product counts
come from :meth:`~lipdeq.models.MultiscaleDEQ.solver_stats`. The running certificate's refresh (exact
FFT norms, once every ``model.certificate_refresh`` steps) does not show in a median step; it is
timed on its own and amortised into ``certificate_share``.

Absolute seconds on a shared machine drift with its speed, so each step is followed by one timed
evaluation of a fixed yardstick, the map of ``lipdeq bench solvers`` (plain ``torch.nn`` convolutions
and GroupNorm of MDEQ-tiny's state size at batch 32, code that this library's changes never touch):
the step and the inference batch are also reported in yardstick units, comparable across days.
:data:`ISSUE11_TARGETS` are the absolute targets of issue 11 in those units, at the yardstick's
time when they were set (15.6 ms per evaluation: docs/RESULTS.md, ``lipdeq bench solvers``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipdeq.benchmarks.solvers import build_problem
from lipdeq.configs import load_config
from lipdeq.models import MultiscaleDEQ
from lipdeq.solvers import SolverWarning
from lipdeq.training.device import resolve_device
from lipdeq.training.step import train_step
from lipdeq.training.trainer import build_optimizer

__all__ = ["ISSUE11_TARGETS", "PHASES", "format_report", "run"]

# Issue 11's absolute targets (lipmdeq_tiny, batch 32, one thread): 0.6 s per training step and 0.18 s
# per inference batch, set when the yardstick took 15.6 ms per evaluation; in yardstick units.
ISSUE11_YARDSTICK_S = 0.0156
ISSUE11_TARGETS = {"train": 0.6 / ISSUE11_YARDSTICK_S, "infer": 0.18 / ISSUE11_YARDSTICK_S}

PHASES = ("cap", "certificate", "stem", "solve", "graph_step", "head", "backward_adjoint", "backward_rest",
          "optimizer")


class _Clock:
    """Accumulates wall-clock per phase between hook calls (nested phases are subtracted from their parent)."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.totals: dict[str, float] = {}
        self.stack: list[tuple[str, float, float]] = []  # (phase, start, time of nested phases)

    def _now(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return time.perf_counter()

    def start(self, phase: str) -> None:
        self.stack.append((phase, self._now(), 0.0))

    def stop(self) -> None:
        phase, t0, nested = self.stack.pop()
        dt = self._now() - t0
        self.totals[phase] = self.totals.get(phase, 0.0) + dt - nested
        if self.stack:
            p, s, n = self.stack[-1]
            self.stack[-1] = (p, s, n + dt)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop()


def _hook_module(module: nn.Module, clock: _Clock, name: str | None, handles: list) -> None:
    """Time every call of ``module`` as ``name`` (None: ``graph_step`` or ``f_eval`` by grad mode)."""

    def pre(*_: Any) -> None:
        clock.start(name or ("graph_step" if torch.is_grad_enabled() else "f_eval"))

    def post(*_: Any) -> None:
        clock.stop()

    handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


@contextlib.contextmanager
def _instrumented(model: MultiscaleDEQ, clock: _Clock) -> Iterator[None]:
    handles: list = []
    for part, name in ((model.stem, "stem"), (model.injection, "stem"), (model.head, "head"), (model.layer, None)):
        if part is not None:
            _hook_module(part, clock, name, handles)
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                _hook_module(plist, clock, "cap", handles)
    running, bound = model.running_certificate, model.lipschitz_bound
    grad = torch.autograd.grad

    def timed_running(*args: Any, **kw: Any):
        with clock.phase("certificate"):
            return type(running).__call__(running, *args, **kw)

    def timed_bound(*args: Any, **kw: Any):
        with clock.phase("certificate"):
            return bound(*args, **kw)

    def timed_grad(*args: Any, **kw: Any):
        with clock.phase("vjp"):
            return grad(*args, **kw)

    model.running_certificate = _Callable(timed_running, running)
    model.lipschitz_bound = timed_bound  # type: ignore[method-assign]
    torch.autograd.grad = timed_grad
    try:
        yield
    finally:
        torch.autograd.grad = grad
        model.running_certificate = running
        del model.lipschitz_bound
        for h in handles:
            h.remove()


class _Callable:
    """Stands in for the running certificate while timed (its call timed, its attributes passed on)."""

    def __init__(self, call: Any, inner: Any) -> None:
        self._call, self._inner = call, inner

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self._call(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _train_phases(model, x, y, opt, cfg, clock: _Clock) -> dict[str, float]:
    clock.totals = {}
    real_forward = model.forward

    def forward(*args: Any, **kw: Any):
        with clock.phase("forward"):
            return real_forward(*args, **kw)

    model.forward = forward  # type: ignore[method-assign]
    real_backward = torch.Tensor.backward

    def timed_backward(self: torch.Tensor, *args: Any, **kw: Any) -> None:
        with clock.phase("backward"):
            real_backward(self, *args, **kw)

    torch.Tensor.backward = timed_backward  # type: ignore[method-assign]
    try:
        t0 = clock._now()
        train_step(model, model, x, y, opt, cfg, pretrain=False, use_jac=False)
        total = clock._now() - t0
    finally:
        torch.Tensor.backward = real_backward  # type: ignore[method-assign]
        del model.forward
    t = clock.totals
    out = {
        "cap": t.get("cap", 0.0), "certificate": t.get("certificate", 0.0), "stem": t.get("stem", 0.0),
        "solve": t.get("f_eval", 0.0) + t.get("forward", 0.0), "solve_f": t.get("f_eval", 0.0),
        "solve_outside_f": t.get("forward", 0.0),
        "graph_step": t.get("graph_step", 0.0), "head": t.get("head", 0.0),
        "backward_adjoint": t.get("vjp", 0.0), "backward_rest": t.get("backward", 0.0),
    }
    out["optimizer"] = total - sum(out[p] for p in PHASES if p != "optimizer")
    out["total"] = total
    return out


def _infer_phases(model, x, clock: _Clock) -> dict[str, float]:
    clock.totals = {}
    with torch.no_grad():
        t0 = clock._now()
        with clock.phase("forward"):
            model(x)
        total = clock._now() - t0
    t = clock.totals
    out = {
        "cap": t.get("cap", 0.0), "certificate": t.get("certificate", 0.0), "stem": t.get("stem", 0.0),
        "solve": t.get("f_eval", 0.0) + t.get("forward", 0.0), "solve_f": t.get("f_eval", 0.0),
        "solve_outside_f": t.get("forward", 0.0), "graph_step": 0.0, "head": t.get("head", 0.0),
    }
    out["total"] = total
    return out


def run(
    preset: str = "lipmdeq_tiny",
    *,
    batch_size: int = 32,
    steps: int = 5,
    warmup: int = 2,
    device: str | None = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """Profile ``preset`` (see the module docstring); returns medians per phase and the solver counts."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    dev = resolve_device(device)
    cfg = load_config(preset, [*overrides, f"train.batch_size={batch_size}", "train.pretrain_steps=0"])
    torch.manual_seed(seed)
    model = MultiscaleDEQ(cfg.model).to(dev)
    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    size = cfg.model.image_size
    x = torch.randn(batch_size, cfg.model.in_channels, size, size, generator=gen).to(dev)
    y = torch.randint(0, cfg.model.num_classes, (batch_size,), generator=gen).to(dev)
    clock = _Clock(dev)
    yard_f, yard_z = build_problem(32, seed, dev)
    with torch.no_grad():
        yard_z = yard_f(yard_z)  # a state away from 0
    yardstick: list[float] = []
    train: list[dict[str, float]] = []
    infer: list[dict[str, float]] = []
    first: list[dict[str, float]] = []
    counts: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        with _instrumented(model, clock):
            for i in range(warmup + steps):
                model.train()
                phases = _train_phases(model, x, y, opt, cfg, clock)
                stats = model.solver_stats()
                model.eval()
                fphases = _infer_phases(model, x, clock)  # the first after a weight change
                iphases = _infer_phases(model, x, clock)  # the same weights again (what inference runs)
                with torch.no_grad():
                    t0 = clock._now()
                    yard_f(yard_z)
                    yard_s = clock._now() - t0
                if i >= warmup:
                    yardstick.append(yard_s)
                    train.append(phases)
                    infer.append(iphases)
                    first.append(fphases)
                    counts = {"train_forward_f_evals": stats.get("forward_f_evals", float("nan")),
                              "train_backward_vjps": stats.get("backward_vjps", float("nan")),
                              "infer_forward_f_evals": model.solver_stats().get("forward_f_evals", float("nan"))}
    med = {k: statistics.median(r[k] for r in train) for k in train[0]}
    imed = {k: statistics.median(r[k] for r in infer) for k in infer[0]}
    fmed = {k: statistics.median(r[k] for r in first) for k in first[0]}
    # The refresh (exact FFT norms) happens once every certificate_refresh steps, so the median step
    # does not show it: time it on its own and amortise it.
    model.train()
    refresh_s = []
    for _ in range(3):
        with model.cached_weights():
            model.running_certificate.reset()
            t0 = clock._now()
            model.running_certificate(training=True)
            refresh_s.append(clock._now() - t0)
    n = cfg.model.certificate_refresh
    refresh = statistics.median(refresh_s)
    amortised = (refresh + (n - 1) * med["certificate"]) / n if cfg.model.is_lipschitz else 0.0
    yard = statistics.median(yardstick)
    return {"preset": preset, "batch_size": batch_size, "steps": steps, "device": str(dev),
            "yardstick_s": yard, "train_units": med["total"] / yard, "infer_units": imed["total"] / yard,
            "threads": torch.get_num_threads(), "budget": cfg.model.budget,
            "certificate_refresh": n, "train": med, "infer": imed, "infer_first": fmed, **counts,
            "certificate_refresh_s": refresh if cfg.model.is_lipschitz else 0.0,
            "certificate_amortised_s": amortised,
            "certificate_share": amortised / (med["total"] - med["certificate"] + amortised)}


def format_report(r: dict[str, Any]) -> str:
    """The profile as a table (seconds, and the share of the step)."""
    lines = [f"{r['preset']}, batch {r['batch_size']}, {r['threads']} thread(s), {r['device']}, budget "
             f"{r['budget']} (certificate refresh every {r['certificate_refresh']} steps); medians of "
             f"{r['steps']} steps", f"{'phase':<22}{'train step (s)':>16}{'share':>8}{'inference (s)':>16}"]
    tr, inf = r["train"], r["infer"]
    for p in PHASES:
        i = inf.get(p)
        lines.append(f"{p:<22}{tr[p]:>16.4f}{tr[p] / tr['total']:>8.1%}" + (f"{i:>16.4f}" if i is not None else ""))
        if p == "solve":
            lines.append(f"{'  of which outside f':<22}{tr['solve_outside_f']:>16.4f}{'':>8}"
                         f"{inf['solve_outside_f']:>16.4f}")
    lines.append(f"{'total':<22}{tr['total']:>16.4f}{1.0:>8.1%}{inf['total']:>16.4f}")
    fi = r["infer_first"]
    lines.append(f"inference columns: the same weights again; the first batch after a weight change takes "
                 f"{fi['total']:.4f} s (cap {fi['cap']:.4f}, certificate {fi['certificate']:.4f})")
    lines.append(f"f evaluations: train {r['train_forward_f_evals']:.1f} (backward vjps "
                 f"{r['train_backward_vjps']:.1f}), inference {r['infer_forward_f_evals']:.1f}")
    lines.append(f"certificate: refresh (exact FFT norms) {r['certificate_refresh_s']:.4f} s every "
                 f"{r['certificate_refresh']} steps, update {tr['certificate']:.4f} s per step; amortised "
                 f"{r['certificate_amortised_s']:.4f} s = {r['certificate_share']:.1%} of a training step "
                 "(at that schedule; early refreshes, when the bound's drift would raise the budget, and "
                 "those of checkpoints come on top)")
    lines.append(f"yardstick (the bench solvers map, one evaluation at batch 32): {1e3 * r['yardstick_s']:.1f} ms; "
                 f"training step {r['train_units']:.1f} units, inference {r['infer_units']:.1f} units (issue 11's "
                 f"targets: {ISSUE11_TARGETS['train']:.1f} and {ISSUE11_TARGETS['infer']:.1f}, that is 0.6 s and "
                 f"0.18 s at {1e3 * ISSUE11_YARDSTICK_S:.1f} ms)")
    return "\n".join(lines)
