"""Training memory against the forward iteration cap: the implicit backward keeps it flat.

``lipdeq bench memory`` runs one training step (forward solve, cross-entropy, backward) of
``mdeq_tiny`` at each forward iteration cap ``f_thres`` with ``f_tol = 1e-12``, so that the cap, not
the tolerance, ends every forward solve. With the IFT backward the forward solve runs without a
graph, so the memory of the step must not grow with ``f_thres``. As a control that the measurement
can see growth, the same step is run through the unrolled (pretraining) forward with
``pretrain_layers = f_thres``, whose graph holds every layer application.

What is measured:

- CUDA: ``torch.cuda.max_memory_allocated`` during the step, minus the allocation before it
  (after ``reset_peak_memory_stats``): the peak of the caching allocator, the real figure.
- Every device: the **saved-tensor footprint**, the bytes of the distinct storages that autograd
  saves for the backward pass during the step (``torch.autograd.graph.saved_tensors_hooks``),
  parameters excluded. This is the activation memory that an unrolled forward multiplies by its
  depth; it does not count transient buffers (the solver's Anderson history, which is fixed by its
  memory ``m``, nor temporaries freed during the forward).
- Linux CPU: the growth of the peak resident set during the step (``VmHWM`` of /proc/self/status,
  reset through /proc/self/clear_refs), above the resident set before it. This is coarse: the
  allocator may reuse memory that an earlier step freed, so it can under-count later steps.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipdeq.configs import load_config
from lipdeq.models import MultiscaleDEQ
from lipdeq.solvers import SolverWarning
from lipdeq.training.device import resolve_device

FLAT_RATIO = 1.10  # "flat": memory at the largest cap / the smallest, at most (TARGETS["memory_ratio"])

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class SavedTensorMeter:
    """Context manager summing the bytes of the distinct storages saved for backward inside it.

    Storages are counted once (by data pointer) and storages of ``exclude`` tensors (e.g. the
    parameters) are skipped. Attributes after exit: ``bytes`` and ``count`` (distinct storages).
    """

    def __init__(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        self._excluded = {self._key(t) for t in exclude}
        self._seen: set[tuple[str, int]] = set()
        self.bytes = 0
        self.count = 0
        self._ctx: Any = None

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[str, int]:
        return (str(t.device), t.untyped_storage().data_ptr())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        if key not in self._seen and key not in self._excluded:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
            self.count += 1
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def _read_status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@contextlib.contextmanager
def _rss_peak_meter(out: dict[str, Any]) -> Iterator[None]:
    """Linux only: peak RSS growth (bytes) of the block in ``out["peak_rss_growth_bytes"]`` (None
    where /proc/self/clear_refs cannot reset the high-water mark)."""
    base = _read_status_kib("VmRSS")
    ok = base is not None
    if ok:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            ok = False
    try:
        yield
    finally:
        hwm = _read_status_kib("VmHWM") if ok else None
        out["peak_rss_growth_bytes"] = None if hwm is None or base is None else max(hwm - base, 0) * 1024


def measure_training_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, unrolled: bool = False
) -> dict[str, Any]:
    """Run one forward + backward (no optimizer step) of ``model`` on ``(x, y)`` and measure it.

    Returns ``saved_tensor_bytes`` / ``saved_tensor_count`` (see module docstring),
    ``cuda_peak_bytes`` (CUDA only, else None), ``peak_rss_growth_bytes`` (CPU on Linux, else None),
    ``seconds``, and the forward and backward solves (``forward``, ``backward``: the model's
    :class:`~lipdeq.solvers.Solution` objects, None for an unrolled forward). Parameter gradients
    are left in place; the caller zeroes them.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    dev = x.device
    out: dict[str, Any] = {"cuda_peak_bytes": None, "peak_rss_growth_bytes": None}
    meter = SavedTensorMeter(exclude=list(model.parameters()))
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    rss = contextlib.nullcontext() if cuda else _rss_peak_meter(out)
    t0 = time.perf_counter()
    with rss:
        with meter:
            logits = model(x, unrolled=unrolled)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        if cuda:
            torch.cuda.synchronize(dev)
    out["seconds"] = time.perf_counter() - t0
    if cuda:
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(dev) - before
    sol = getattr(model, "last_solution", None)
    out["saved_tensor_bytes"] = meter.bytes
    out["saved_tensor_count"] = meter.count
    out["forward"] = sol
    out["backward"] = sol.backward if sol is not None else None
    return out


def _step_record(model: nn.Module, x: torch.Tensor, y: torch.Tensor, unrolled: bool) -> dict[str, Any]:
    m = measure_training_step(model, x, y, unrolled=unrolled)
    model.zero_grad(set_to_none=True)
    fwd, bwd = m.pop("forward"), m.pop("backward")
    if fwd is not None:
        m["forward_f_evals"] = fwd.n_f_evals
        m["forward_rel_residual_max"] = float(fwd.rel_residual.max())
    if bwd is not None:
        m["backward_f_evals"] = bwd.n_f_evals
    return m


def run(
    device: str | None = None,
    f_thres: Sequence[int] = (5, 15, 30),
    batch_size: int = 8,
    *,
    preset: str = "mdeq_tiny",
    overrides: Sequence[str] = (),
    unrolled_control: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure one training step of ``preset`` at each forward cap in ``f_thres`` (``f_tol=1e-12``).

    ``overrides`` are extra ``key=value`` configuration overrides (e.g. smaller widths for tests).

    Returns ``{"preset", "device", "batch_size", "ift": [record per cap], "unrolled": [record per
    depth] (when ``unrolled_control``), "ratio_ift", "ratio_unrolled", "metric", "flat"}``; the
    ratios are the measured figure (CUDA peak on CUDA, else the saved-tensor footprint) at the
    largest cap over the smallest; ``flat`` is ``ratio_ift <= FLAT_RATIO`` (1.10).
    """
    caps = [int(c) for c in f_thres]
    if len(caps) < 2 or any(c < 1 for c in caps):
        raise ValueError(f"f_thres must hold at least two positive caps, got {tuple(f_thres)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(dev)
    result: dict[str, Any] = {"preset": preset, "device": str(dev), "batch_size": batch_size, "f_thres": caps}
    modes = [("ift", False)] + ([("unrolled", True)] if unrolled_control else [])
    for mode, unrolled in modes:
        records = []
        for cap in caps:
            key = "model.pretrain_layers" if unrolled else "model.f_thres"
            cfg = load_config(preset, [*overrides, f"{key}={cap}", "model.f_tol=1e-12"])
            torch.manual_seed(seed)
            model = MultiscaleDEQ(cfg.model).to(dev).train()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SolverWarning)  # the cap binds by design
                records.append({"f_thres": cap, **_step_record(model, x, y, unrolled)})
        result[mode] = records
    metric = "cuda_peak_bytes" if dev.type == "cuda" else "saved_tensor_bytes"
    result["metric"] = metric
    for mode, _ in modes:
        recs = result[mode]
        result[f"ratio_{mode}"] = recs[-1][metric] / recs[0][metric] if recs[0][metric] else float("nan")
    result["flat"] = bool(result["ratio_ift"] <= FLAT_RATIO)
    return result


def _mib(v: int | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:.2f}"


def format_report(results: dict[str, Any]) -> str:
    """The human-readable table of :func:`run`'s result."""
    lines = [
        f"Training-step memory of {results['preset']} (batch {results['batch_size']}, device "
        f"{results['device']}), forward tolerance 1e-12 so the cap binds",
        f"{'mode':<10}{'f_thres':>8}{'fwd evals':>10}{'bwd evals':>10}{'saved MiB':>11}"
        f"{'CUDA peak MiB':>15}{'RSS growth MiB':>16}{'step s':>8}",
    ]
    for mode in ("ift", "unrolled"):
        for r in results.get(mode, []):
            lines.append(
                f"{mode:<10}{r['f_thres']:>8}{r.get('forward_f_evals', r['f_thres']):>10}"
                f"{r.get('backward_f_evals', '-'):>10}{_mib(r['saved_tensor_bytes']):>11}"
                f"{_mib(r['cuda_peak_bytes']):>15}{_mib(r['peak_rss_growth_bytes']):>16}{r['seconds']:>8.2f}"
            )
    caps = results["f_thres"]
    what = "CUDA peak allocation" if results["metric"] == "cuda_peak_bytes" else "saved-tensor footprint"
    lines += [
        "",
        f"{what} at f_thres {caps[-1]} / f_thres {caps[0]}:  implicit (IFT) backward "
        f"{results['ratio_ift']:.3f}x" + (
            f";  unrolled control {results['ratio_unrolled']:.2f}x" if "ratio_unrolled" in results else ""
        ),
        f"target: within {FLAT_RATIO - 1:.0%} (ratio <= {FLAT_RATIO:.2f}): {'met' if results['flat'] else 'NOT met'}",
        "saved MiB: distinct storages autograd keeps for backward (parameters excluded); RSS growth: peak "
        "resident-set growth during the step (coarse, CPU/Linux only); unrolled: pretrain_layers = f_thres.",
    ]
    return "\n".join(lines)
