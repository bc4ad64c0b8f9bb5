"""Solver benchmark: our Anderson / Picard / Broyden against TorchDEQ's Anderson on an MDEQ-tiny-sized map.

The map is a two-branch multiscale fixed-point layer of MDEQ-tiny's state size (24 channels at 32x32
and 16x16, D = 30720 per sample), built from ``torch.nn`` with a fixed seed::

    b_i = GN(conv3x3(relu(GN(conv3x3(z_i)))))                      (per-branch block)
    z_1+ = gain * (b_1 + up2(GN(conv1x1(b_2)))) + u_1               (coarse -> fine: 1x1 conv, nearest)
    z_2+ = gain * (b_2 + GN(conv3x3_stride2(b_1))) + u_2            (fine -> coarse: strided conv)

with a fixed random input injection ``u``. ``gain`` is set so that Anderson needs about 10-20
evaluations at relative tolerance 1e-3.

Fair comparison: TorchDEQ stops the whole batch when the *largest* current relative residual is
below ``tol``; ours stops each sample when its own relative residual is below ``tol`` and ends when
all have stopped. Both use the relative residual ``||f(z)-z|| / (||f(z)|| + eps)`` (ours run with
TorchDEQ's ``eps = 1e-9``), memory ``m = 6``, ``lam = 1e-4`` and return the image ``f(z)`` of the best
iterate, so at the end both guarantee ``max_b rel_b < tol`` for their returned residuals. (Our
``lam`` weights each history entry by its own squared residual, TorchDEQ's is absolute; on this map
both need the same number of evaluations, which the report shows.) The f evaluations are timed
through a wrapper, so that time per solve splits into time in ``f`` and the solver's own overhead.
Methods are interleaved within each repeat, so that load from other processes hits all alike.

Type-II Anderson must read every stored image and residual once per iteration (the new row of the
Gram matrix, then the mixed iterate), ``2 n B D`` scalars with ``n <= m`` stored pairs, however the
history is laid out. The report puts that traffic next to a read bandwidth measured in the same run:
the time it takes at that bandwidth, as a share of the solve, is a floor on Anderson's time outside
``f`` on this machine (:func:`anderson_history_bytes`).
"""

from __future__ import annotations

import importlib.metadata
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lipdeq.solvers import solve
from lipdeq.training.device import resolve_device

CHANNELS, SIZES = 24, (32, 16)
METHODS = ("anderson", "picard", "broyden", "torchdeq_anderson")
OPTIONS = {"anderson": {"m": 6, "lam": 1e-4}}  # TorchDEQ's defaults, given to both Andersons


class MultiscaleMap(nn.Module):
    """The two-branch convolutional fixed-point map of the benchmark (see module docstring)."""

    def __init__(self, channels: int = CHANNELS, gain: float = 0.45, groups: int = 4) -> None:
        super().__init__()
        c = channels
        self.conv1 = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in SIZES)
        self.conv2 = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in SIZES)
        self.gn1 = nn.ModuleList(nn.GroupNorm(groups, c) for _ in SIZES)
        self.gn2 = nn.ModuleList(nn.GroupNorm(groups, c) for _ in SIZES)
        self.down, self.gn_down = nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(groups, c)
        self.up, self.gn_up = nn.Conv2d(c, c, 1), nn.GroupNorm(groups, c)
        self.channels, self.gain = c, gain

    def split(self, z: torch.Tensor) -> list[torch.Tensor]:
        """View a flat ``(B, D)`` state as the two branch tensors."""
        c, (n1, n2) = self.channels, SIZES
        z1, z2 = z.split([c * n1 * n1, c * n2 * n2], dim=1)
        return [z1.view(-1, c, n1, n1), z2.view(-1, c, n2, n2)]

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One application of the map to the flat state ``z`` with flat injection ``u``."""
        zs = self.split(z)
        b = [self.gn2[i](self.conv2[i](F.relu(self.gn1[i](self.conv1[i](zi))))) for i, zi in enumerate(zs)]
        y1 = b[0] + F.interpolate(self.gn_up(self.up(b[1])), scale_factor=2, mode="nearest")
        y2 = b[1] + self.gn_down(self.down(b[0]))
        return self.gain * torch.cat([y1.flatten(1), y2.flatten(1)], dim=1) + u


def build_problem(
    batch_size: int = 32, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The benchmark's map ``f`` on flat ``(B, D)`` float32 states and its initial state ``z0 = 0``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MultiscaleMap().to(device).eval()
    D = CHANNELS * sum(n * n for n in SIZES)
    u = torch.randn(batch_size, D, generator=gen).to(device)

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(z, u)

    return f, torch.zeros(batch_size, D, device=device)


class _TimedMap:
    """Wraps ``f`` to count its calls and the wall time spent inside it."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], sync: Callable[[], None]) -> None:
        self.f, self.sync = f, sync
        self.calls, self.seconds = 0, 0.0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.f(z)
        self.sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _torchdeq_version() -> str | None:
    """TorchDEQ's version; ``"unknown"`` if it imports without package metadata; None if it cannot import."""
    try:
        import torchdeq.solver  # noqa: F401
    except ImportError:
        return None
    try:
        return importlib.metadata.version("torchdeq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def anderson_history_bytes(f_evals: int, m: int, state_bytes: int) -> int:
    """Bytes of history an Anderson solve of ``f_evals`` evaluations reads (memory ``m``, ``state_bytes``
    = B D times the element size).

    After evaluation k the history holds ``n = min(k, m)`` pairs. The Gram row reads the n residuals
    after every evaluation (its diagonal entry is the residual norm the driver checks, so the last
    evaluation forms one too); the mixing, after every evaluation but the last (which ends the loop),
    reads the n images when ``n >= 2`` (with one pair the step is plain ``f(z)``).
    """
    slots = sum(min(k, m) for k in range(1, f_evals + 1))
    slots += sum(min(k, m) for k in range(2, f_evals))
    return slots * state_bytes


def read_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of one streaming read (a ``sum``) of a float32 tensor of ``nbytes`` on ``device``,
    the median of ``repeats`` after a warm-up. Take ``nbytes`` well above the last-level cache."""
    x = torch.ones(max(nbytes // 4, 1), device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    x.sum()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        sync()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


def _rel_residual(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> float:
    """Largest relative residual ``||f(z)-z|| / ||f(z)||`` over the batch (one extra evaluation)."""
    fz = f(z)
    return float(((fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)).max())


def _solve_once(method: str, f: _TimedMap, z0: torch.Tensor, tol: float, max_iter: int) -> dict:
    """One timed solve; returns the value and the solver's own report."""
    if method == "torchdeq_anderson":
        from torchdeq.solver import get_solver

        t0 = time.perf_counter()
        solver = get_solver("anderson")
        value, _, info = solver(f, z0, max_iter=max_iter, tol=tol, stop_mode="rel", **OPTIONS["anderson"])
        f.sync()
        seconds = time.perf_counter() - t0
        rel = info["rel_lowest"]
        counts = {"converged": int((rel < tol).sum()), "not_converged": int((rel >= tol).sum())}
        return {"seconds": seconds, "value": value, "rel": float(rel.max()), "counts": counts,
                "nstep_max": int(info["nstep"].max())}
    t0 = time.perf_counter()
    options = OPTIONS.get(method, {})
    sol = solve(f, z0, method, tol=tol, stop_mode="rel", max_iter=max_iter, eps=1e-9, **options)
    f.sync()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "value": sol.value, "rel": float(sol.rel_residual.max()),
            "counts": {k: v for k, v in sol.counts().items() if v}, "nstep_max": int(sol.nstep.max())}


def run(
    batch_size: int = 32,
    tol: float = 1e-3,
    max_iter: int = 30,
    repeats: int = 3,
    seed: int = 0,
    device: str | None = "cpu",
) -> dict:
    """Time our solvers and TorchDEQ's Anderson on the benchmark map; returns a dict of figures.

    Our Anderson also reports ``history_bytes`` (what a solve reads of its history,
    :func:`anderson_history_bytes`), ``read_bandwidth_bytes_per_s`` (:func:`read_bandwidth`, measured
    here) and ``outside_f_floor_fraction``: the time of those reads at that bandwidth over the time in
    ``f`` plus that time, a floor on ``outside_f_fraction`` for type-II Anderson with this memory;
    ``state_pass_bytes`` and ``outside_f_eager_floor_fraction`` add the passes over the state that any
    implementation made of separate tensor operations makes besides (per evaluation the residual,
    three, and ``||f(z)||``, one; per step the write of the mixed iterate), counted at the same bandwidth.
    Per method: ``time_per_solve_s`` (median over ``repeats`` after a warm-up), ``f_evals`` per solve,
    ``time_per_f_eval_s``, ``outside_f_fraction`` (share of the solve's wall time not spent in ``f``,
    median), ``max_rel_residual`` (as reported by the solver), ``max_rel_residual_checked`` (recomputed
    from the returned value with one extra evaluation, outside the timing), status counts and the
    largest ``nstep``; ``best_time_per_solve_s`` is the fastest repeat (robust to load from other processes).
    ``ratio_anderson_vs_torchdeq`` (median) and ``ratio_anderson_vs_torchdeq_best`` are our Anderson's time
    per solve over TorchDEQ's (None when torchdeq is not installed). Nothing is printed; see
    :func:`format_report`.
    """
    dev = resolve_device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    methods, torchdeq_version = METHODS, _torchdeq_version()
    if torchdeq_version is None:
        methods = METHODS[:-1]
    f, z0 = build_problem(batch_size, seed, dev)
    rows: dict[str, dict] = {m: {"seconds": [], "outside": [], "f_seconds": []} for m in methods}
    with torch.no_grad():
        for m in methods:  # warm-up: allocator, kernels, lazy imports
            _solve_once(m, _TimedMap(f, sync), z0, tol, 3)
        for _ in range(repeats):
            for m in methods:  # interleaved, so that load changes on a shared machine hit all methods alike
                tf = _TimedMap(f, sync)
                out = _solve_once(m, tf, z0, tol, max_iter)
                row = rows[m]
                row["seconds"].append(out["seconds"])
                row["f_seconds"].append(tf.seconds / tf.calls)
                row["outside"].append(1.0 - tf.seconds / out["seconds"])
                row.update(f_evals=tf.calls, max_rel_residual=out["rel"], statuses=out["counts"],
                           nstep_max=out["nstep_max"], value=out["value"])
        results = {}
        for m, row in rows.items():
            results[m] = {
                "time_per_solve_s": statistics.median(row["seconds"]),
                "best_time_per_solve_s": min(row["seconds"]),
                "times_s": row["seconds"],
                "f_evals": row["f_evals"],
                "time_per_f_eval_s": statistics.median(row["f_seconds"]),
                "outside_f_fraction": statistics.median(row["outside"]),
                "max_rel_residual": row["max_rel_residual"],
                "max_rel_residual_checked": _rel_residual(f, row["value"]),
                "statuses": row["statuses"],
                "nstep_max": row["nstep_max"],
            }
        # the floor of Anderson's time outside f: its history reads at the measured read bandwidth
        state_bytes = z0.numel() * z0.element_size()
        bandwidth = read_bandwidth(dev, max(256 * 2**20, 8 * OPTIONS["anderson"]["m"] * state_bytes))
        a = results["anderson"]
        history = anderson_history_bytes(a["f_evals"], OPTIONS["anderson"]["m"], state_bytes)
        in_f = a["f_evals"] * a["time_per_f_eval_s"]
        # what no eager implementation avoids besides: per evaluation the residual (f(z) and z read, g
        # written) and ||f(z)|| (||g|| comes with the Gram row), per step the mixed iterate's write
        passes = (4 * a["f_evals"] + a["f_evals"] - 1) * state_bytes
        a.update(history_bytes=history, read_bandwidth_bytes_per_s=bandwidth,
                 outside_f_floor_fraction=(history / bandwidth) / (in_f + history / bandwidth),
                 state_pass_bytes=passes,
                 outside_f_eager_floor_fraction=((history + passes) / bandwidth)
                 / (in_f + (history + passes) / bandwidth))
    ratio = ratio_best = None
    if "torchdeq_anderson" in results:
        ours, theirs = results["anderson"], results["torchdeq_anderson"]
        ratio = ours["time_per_solve_s"] / theirs["time_per_solve_s"]
        ratio_best = ours["best_time_per_solve_s"] / theirs["best_time_per_solve_s"]
    return {
        "config": {
            "batch_size": batch_size, "tol": tol, "max_iter": max_iter, "repeats": repeats, "seed": seed,
            "device": str(dev), "dim": int(z0.shape[1]), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchdeq": torchdeq_version,
        },
        "methods": results,
        "ratio_anderson_vs_torchdeq": ratio,
        "ratio_anderson_vs_torchdeq_best": ratio_best,
    }


def format_report(results: dict) -> str:
    """Render the dict of :func:`run` as a plain-text table."""
    c = results["config"]
    lines = [
        f"solver benchmark: batch {c['batch_size']}, D {c['dim']}, rel tol {c['tol']:g}, "
        f"max_iter {c['max_iter']}, {c['repeats']} repeats, device {c['device']}, {c['threads']} threads, "
        f"torch {c['torch']}, torchdeq {c['torchdeq']}",
        f"{'method':<18} {'s/solve':>8} {'f evals':>7} {'ms/f':>7} {'outside f':>9} {'max rel':>9} "
        f"{'checked':>9}  statuses",
    ]
    for m, r in results["methods"].items():
        statuses = ", ".join(f"{k} {v}" for k, v in r["statuses"].items())
        lines.append(
            f"{m:<18} {r['time_per_solve_s']:8.3f} {r['f_evals']:7d} {1e3 * r['time_per_f_eval_s']:7.1f} "
            f"{100 * r['outside_f_fraction']:8.1f}% {r['max_rel_residual']:9.2e} "
            f"{r['max_rel_residual_checked']:9.2e}  {statuses}"
        )
    a = results["methods"].get("anderson", {})
    if "outside_f_floor_fraction" in a:
        lines.append(
            f"anderson's history reads: {a['history_bytes'] / 2**20:.1f} MiB per solve; at the read bandwidth "
            f"measured here ({a['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s) they alone take "
            f"{100 * a['outside_f_floor_fraction']:.1f}% of a solve (the floor of its time outside f; measured "
            f"{100 * a['outside_f_fraction']:.1f}%)")
        lines.append(
            f"with the residual, ||f(z)|| and the new iterate ({a['state_pass_bytes'] / 2**20:.1f} MiB more), the "
            f"floor of separate tensor operations is {100 * a['outside_f_eager_floor_fraction']:.1f}%")
    ratio = results.get("ratio_anderson_vs_torchdeq")
    if ratio is not None:
        best = results.get("ratio_anderson_vs_torchdeq_best")
        lines.append(f"ours anderson / torchdeq anderson, time per solve: {ratio:.3f} (median), "
                     f"{best:.3f} (best repeat)")
    return "\n".join(lines)
