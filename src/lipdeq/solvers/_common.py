"""Shared machinery of the fixed-point solvers: input checks, the flat (B, D) view of ``f``, and the
per-sample driver loop (residuals, best-iterate tracking, stopping and status logic).

A method is a *stepper*: an object with ``step(z, fz, g) -> z_next`` that proposes the next iterate
from the current one, its image ``fz = f(z)`` and its residual ``g = fz - z`` (all ``(B, D)``, always
finite). The driver owns everything else, so each method module only holds its update rule.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Protocol

import torch

from lipdeq.checks import check_int, check_real

from .result import Solution, SolverWarning, Status

STOP_MODES = ("rel", "abs", "cert")
CONVERGED, MAX_ITER = int(Status.CONVERGED), int(Status.MAX_ITER)
DIVERGED, NON_FINITE = int(Status.DIVERGED), int(Status.NON_FINITE)


class Stepper(Protocol):
    """The update rule of one method (see module docstring)."""

    def residual_out(self) -> torch.Tensor | None:
        """A ``(B, D)`` buffer the driver may write the next residual into, or None."""

    def residual_sq_norm(self, g: torch.Tensor) -> torch.Tensor | None:
        """The squared norms ``(B,)`` of the new residual ``g`` when the method computes them anyway
        (so the driver saves a pass over the state), or None. Called right after ``g`` is formed, before
        the driver's checks: ``g`` may still hold non-finite rows, whose samples stop there."""

    def step(self, z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Return the next iterate (the driver masks it for stopped samples)."""


def check_z0(z0: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the initial state; return it as a detached ``(B, D)`` view (never written to) and its
    per-sample norms (the driver's divergence limit needs them)."""
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor of shape (B, ...), got {type(z0).__name__}")
    if z0.dim() == 0:
        raise ValueError("z0 must have a batch dimension: shape (B, ...), got a 0-dim tensor")
    if z0.dim() == 1:
        # A 1-D state would be read as B independent scalars: per-sample stopping would freeze entries
        # that f couples, and the per-sample error bounds would not bound the error of the vector.
        raise ValueError(
            f"z0 must have a batch dimension: shape (B, ...), got a 1-D tensor of shape {tuple(z0.shape)}, "
            f"which would be read as {z0.shape[0]} independent scalar samples. For one state, add a batch "
            f"dimension: z0.unsqueeze(0) (shape (1, {z0.shape[0]})) and an f that maps (1, D) to (1, D); "
            "for a batch of scalars, use shape (B, 1)"
        )
    if z0.shape[0] == 0:
        raise ValueError(f"z0 has an empty batch: shape {tuple(z0.shape)}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor, got dtype {z0.dtype}")
    if z0.device.type == "meta":  # no values: the finiteness check below would fail deep inside torch
        raise ValueError("z0 is on the meta device and holds no data: create it on a real device (cpu, cuda)")
    z = z0.detach().reshape(z0.shape[0], -1)
    if z.shape[1] == 0:
        raise ValueError(f"z0 has no elements per sample: shape {tuple(z0.shape)}")
    # One pass instead of isfinite's three: NaN and Inf propagate into the norms, so finite norms mean a
    # finite z0; only a non-finite norm (or a finite z0 whose squares overflow) takes the exact check.
    norms = torch.linalg.vector_norm(z, dim=1)
    if not bool(torch.isfinite(norms).all()) and not bool(torch.isfinite(z).all()):
        raise ValueError("z0 contains NaN or Inf")
    return z, norms


def check_lipschitz(lipschitz: float | torch.Tensor | None, z: torch.Tensor) -> torch.Tensor | None:
    """Validate ``lipschitz`` (a float or a ``(B,)`` tensor in [0, 1)); return a float64 ``(B,)`` tensor."""
    if lipschitz is None:
        return None
    if isinstance(lipschitz, bool) or not isinstance(lipschitz, int | float | torch.Tensor):
        raise TypeError(f"lipschitz must be a float or a (B,) tensor, got {type(lipschitz).__name__}")
    L = torch.as_tensor(lipschitz, dtype=torch.float64, device=z.device).detach()
    if L.dim() == 0:
        L = L.expand(z.shape[0])
    elif tuple(L.shape) != (z.shape[0],):
        raise ValueError(f"lipschitz tensor must have shape ({z.shape[0]},), got {tuple(L.shape)}")
    if not bool(((L >= 0) & (L < 1)).all()):
        # 0 is a valid constant (a constant map, e.g. a layer whose capped weights are all zero)
        raise ValueError(f"lipschitz must lie in [0, 1), got {lipschitz}")
    return L.clone()


def check_settings(
    tol: float, stop_mode: str, max_iter: int, divergence_factor: float, eps: float, check_every: int = 1
) -> None:
    """Validate the scalar settings shared by every method."""
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
    check_real("tol", tol, above=0.0)
    check_int("max_iter", max_iter, minimum=1)
    check_int("check_every", check_every, minimum=1)
    check_real("divergence_factor", divergence_factor, above=1.0, finite=False)
    check_real("eps", eps, above=0.0, inclusive=True)


def flat_map(f: Callable[[torch.Tensor], torch.Tensor], shape: torch.Size, z: torch.Tensor):
    """Wrap ``f`` as a map on the flat ``(B, D)`` state that checks the output's shape, dtype and device."""
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")

    last: list[tuple[torch.Tensor, int]] = []  # the previous image and its version counter

    def ff(x: torch.Tensor) -> torch.Tensor:
        out = f(x.view(shape))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"f must return a torch.Tensor, got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"f must preserve the shape of z: input shape {tuple(shape)}, "
                             f"output shape {tuple(out.shape)}")
        if out.dtype != z.dtype or out.device != z.device:
            raise TypeError(f"f must preserve dtype and device: input {z.dtype} on {z.device}, "
                            f"output {out.dtype} on {out.device}")
        out = out.detach().reshape(z.shape)
        # The methods keep earlier images by reference (the best iterate's image, Anderson's history,
        # Picard's next iterate, which is f's next input). An f that writes each result into one buffer
        # of its own (or changes its input in place) has overwritten them by the time it returns, so
        # nothing can be repaired here: refuse. The version counter tells a write from a constant map
        # that returns one tensor every time. Inference-mode tensors have no version counter.
        if last and last[0][0]._version != last[0][1]:
            raise ValueError(
                "f changed its previous result in place (for example, it writes every result into one buffer "
                "and returns it, or modifies its input): the solver keeps earlier results of f, and its next "
                "input is one of them. Return a new tensor from f (for example buf.clone())")
        last[:] = [] if out.is_inference() else [(out, out._version)]
        return out

    return ff


def drive(
    ff: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    stepper: Stepper,
    *,
    tol: float,
    stop_mode: str,
    max_iter: int,
    lipschitz: torch.Tensor | None,
    return_trace: bool,
    divergence_factor: float,
    eps: float,
    z_norm: torch.Tensor,
    check_every: int = 1,
) -> Solution:
    """Run a method to per-sample convergence on the flat state ``z`` (see :func:`lipdeq.solvers.solve`).

    ``z_norm``: the per-sample norms of ``z``, as :func:`check_z0` returns them.

    Iteration ``k`` (``k = 1..max_iter``) evaluates ``f`` once on the whole batch at the current iterates.
    A sample that stops (converged, diverged, non-finite) keeps its iterate frozen from then on (updates
    are masked with ``torch.where``); the loop ends when no sample is active or after ``max_iter``
    evaluations. The only host synchronisation per iteration is one small ``tolist()``; with
    ``check_every = k > 1`` it happens only every k-th iteration (and at ``max_iter``), the iterations in
    between take the branch-free paths, and the loop notices that every sample stopped up to k - 1
    evaluations late. Those evaluations change nothing (every sample is frozen and masked), so the
    result equals that of ``check_every = 1`` except ``n_f_evals`` and the traces' length.
    """
    B = z.shape[0]
    dev, dt = z.device, z.dtype
    inf = torch.full((B,), math.inf, device=dev, dtype=dt)
    z_init = z
    best_fz = z  # the returned value: f(z_best); z0 itself while no finite f(z) was seen
    best_abs, best_rel, best_crit, min_abs = inf.clone(), inf.clone(), inf.clone(), inf.clone()
    size_limit = inf  # divergence_factor * max(||z0||, ||f(z0)||): beyond it an iterate has run off
    best_step = torch.zeros(B, dtype=torch.long, device=dev)
    status = torch.full((B,), MAX_ITER, dtype=torch.int8, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    cert_scale = None if lipschitz is None else (lipschitz / (1 - lipschitz)).to(dt)
    abs_trace: list[torch.Tensor] = []
    rel_trace: list[torch.Tensor] = []
    last_abs, last_rel = inf, inf
    all_active = True
    # Per-sample stopping assumes f acts on each sample alone. A sample that stopped keeps its state, so
    # f must keep giving it the same residual while the others move; if it does not, f couples the
    # samples and the per-sample verdicts and bounds do not hold. Nothing of this runs until a sample has
    # stopped with others still active (never in a batch that stops at once), and its one extra host
    # synchronisation comes at the end, only then.
    stop_abs: torch.Tensor | None = None  # residual of each frozen state, recorded when it stopped
    coupled: torch.Tensor | None = None
    slack = 64 * torch.finfo(torch.bfloat16 if torch.is_autocast_enabled() else dt).eps
    n_was_active = B

    n_f = 0
    while True:
        fz = ff(z)
        n_f += 1
        out = stepper.residual_out()
        g = torch.sub(fz, z) if out is None else torch.sub(fz, z, out=out)
        sq = stepper.residual_sq_norm(g)
        abs_r = torch.linalg.vector_norm(g, dim=1) if sq is None else sq.sqrt().to(dt)
        fz_norm = torch.linalg.vector_norm(fz, dim=1)
        rel_r = abs_r / (fz_norm + eps)
        if eps == 0:  # 0/0 at an exact fixed point at the origin
            rel_r = torch.where(abs_r == 0, 0.0, rel_r)
        # z is always finite, so a non-finite norm means f(z) has NaN/Inf or its norm overflowed;
        # the (rare) overflow case is told apart below, after the synchronisation.
        finite = (abs_r + fz_norm) < math.inf  # False for NaN too
        if stop_mode == "abs":
            crit = abs_r
        elif stop_mode == "rel":
            crit = rel_r
        else:  # cert: the a-posteriori bound L/(1-L) ||f(z)-z|| on ||f(z) - z*||
            crit = cert_scale * abs_r

        if stop_abs is not None:
            frozen = ~active & (stop_abs < math.inf)  # not samples that stopped on a non-finite f(z)
            moved = ~finite | ((abs_r - stop_abs).abs() > 1e-3 * stop_abs + slack * fz_norm)
            coupled = frozen & moved if coupled is None else coupled | (frozen & moved)
        # Status logic on (B,) tensors, kept to few kernels. Only active samples may change anything.
        ok = active & finite
        improved = ok & (crit < best_crit)
        best_abs = torch.where(improved, abs_r, best_abs)
        best_rel = torch.where(improved, rel_r, best_rel)
        best_crit = torch.where(improved, crit, best_crit)
        best_step = best_step.masked_fill(improved, n_f)
        if n_f == 1:
            size_limit = divergence_factor * torch.maximum(fz_norm, z_norm)
        # a growing residual, or an image that ran off (accelerated methods can push z to 1e8 on a map
        # without fixed point, where fl(f(z)) == z would otherwise read as converged)
        diverged = ok & ((abs_r > divergence_factor * min_abs) | (fz_norm > size_limit))
        min_abs = torch.where(ok, torch.minimum(min_abs, abs_r), min_abs)
        converged = ok & (best_crit < tol)
        nonfinite = active ^ ok  # = active & ~finite
        status = status.masked_fill(nonfinite, NON_FINITE).masked_fill(diverged, DIVERGED)
        status = status.masked_fill(converged, CONVERGED)
        if return_trace:
            last_abs = torch.where(active, abs_r, last_abs)
            last_rel = torch.where(active, rel_r, last_rel)
            abs_trace.append(last_abs)
            rel_trace.append(last_rel)
        was_active, active = active, ok & ~(diverged | converged)

        # The one host synchronisation of the iteration (every check_every-th); None: not known here.
        if check_every == 1 or n_f % check_every == 0 or n_f >= max_iter:
            n_active, n_finite, n_improved = torch.stack([active, finite, improved]).sum(dim=1).tolist()
        else:
            n_active = n_finite = n_improved = None
        if n_improved == B:
            best_fz = fz  # fz is never modified in place, so no copy is needed
        elif n_improved is None or n_improved:
            best_fz = torch.where(improved[:, None], fz, best_fz)
        if n_finite is None or n_finite < B:
            rows_finite = torch.isfinite(fz).all(dim=1)
            status = status.masked_fill(nonfinite & rows_finite, DIVERGED)  # norm overflow
            # neutralise non-finite rows before any batched linear algebra of the method (best_fz is
            # always finite); these samples are stopped, so what the method does with them is masked
            fz = torch.where(finite[:, None], fz, best_fz)
            g = torch.where(finite[:, None], g, 0.0) if out is None else g.masked_fill_(~finite[:, None], 0.0)
        if n_active == 0 or n_f >= max_iter:
            break
        if n_active is None or n_active < n_was_active:  # samples (may have) stopped now: frozen from here on
            stop_abs = torch.where(was_active & ~active, abs_r, inf if stop_abs is None else stop_abs)
        if n_active is not None:
            n_was_active = n_active
        z_next = stepper.step(z, fz, g)
        all_active = all_active and n_active == B
        z = z_next if all_active else torch.where(active[:, None], z_next, z)

    error_bound = None if cert_scale is None else cert_scale * best_abs
    n_coupled = 0 if coupled is None else int(coupled.sum())
    if n_coupled:
        # Nothing per-sample can be trusted: no certified bounds, and no verdict for the samples whose
        # residual moved after they stopped.
        status = status.masked_fill(coupled, MAX_ITER)
        if error_bound is not None:
            error_bound = torch.full_like(error_bound, math.inf)
        warnings.warn(SolverWarning(
            f"solve: f couples the samples of the batch: the residual of {n_coupled} of {B} stopped samples "
            "changed while their state was frozen. Per-sample stopping and error bounds assume f maps each "
            "sample on its own; those samples are reported as max_iter and no error bound is given. For one "
            "coupled state, solve it as a batch of one (shape (1, D))"
        ), stacklevel=3)
    return Solution(
        value=best_fz.clone() if best_fz is z_init else best_fz,
        status=status,
        nstep=best_step,
        abs_residual=best_abs,
        rel_residual=best_rel,
        error_bound=error_bound,
        n_f_evals=n_f,
        stop_mode=stop_mode,
        tol=float(tol),
        max_iter=max_iter,
        abs_trace=torch.stack(abs_trace) if return_trace else None,
        rel_trace=torch.stack(rel_trace) if return_trace else None,
    )
