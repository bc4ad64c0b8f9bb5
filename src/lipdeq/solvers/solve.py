"""The public entry point :func:`solve`: validate, flatten, pick a method, run the per-sample driver."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch

from lipdeq.checks import check_int

from ._common import check_lipschitz, check_settings, check_z0, drive, flat_map
from .anderson import Anderson
from .broyden import Broyden
from .picard import Picard
from .result import Solution

METHODS = {"anderson": Anderson, "picard": Picard, "broyden": Broyden}


def _options(cls: type) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(cls).parameters if p != "z")


def solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    method: str = "anderson",
    tol: float = 1e-3,
    stop_mode: str = "rel",
    max_iter: int = 50,
    lipschitz: float | torch.Tensor | None = None,
    return_trace: bool = False,
    divergence_factor: float = 1e4,
    eps: float = 1e-5,
    check_every: int = 1,
    **method_options: object,
) -> Solution:
    """Find a fixed point ``z* = f(z*)`` per sample, with per-sample stopping and status.

    Args:
        f: maps a ``(B, ...)`` tensor to one of the same shape, dtype and device; sample ``b`` of the
            output must depend only on sample ``b`` of the input for the per-sample guarantees to hold.
            It must return a new tensor on each call (``value`` may be one of its outputs).
        z0: initial state ``(B, ...)``, finite, floating point. It is not modified.
        method: ``"anderson"`` (options ``m=6``, ``lam=1e-4``, ``beta=1.0``), ``"picard"`` (option
            ``tau=1.0``) or ``"broyden"`` (option ``m=30``, the number of stored rank-one updates).
        tol: stop threshold (> 0) on the per-sample criterion of ``stop_mode``.
        stop_mode: ``"rel"``: ``||f(z)-z|| / (||f(z)|| + eps)``; ``"abs"``: ``||f(z)-z||``; ``"cert"``:
            the certified bound ``L/(1-L) ||f(z)-z||`` (needs ``lipschitz``). Norms are l2 over all
            non-batch dimensions.
        max_iter: maximal number of (batched) evaluations of ``f`` (>= 1).
        lipschitz: a Lipschitz constant ``L`` of ``f`` in [0, 1), a float or a ``(B,)`` tensor; enables
            ``error_bound`` and ``stop_mode="cert"``.
        return_trace: fill ``abs_trace``/``rel_trace`` with ``(T, B)`` tensors, ``T = n_f_evals``; row ``t``
            holds the residuals of the iterates evaluated at evaluation ``t + 1`` (a stopped sample
            repeats its last value).
        divergence_factor: a sample whose ``||f(z)-z||`` exceeds this factor times the residual of its
            best iterate (or overflows), or whose ``||f(z)||`` exceeds this factor times
            ``max(||z0||, ||f(z0)||)`` (an iterate that ran off), stops with status DIVERGED.
        eps: the ``eps`` of the relative residual.
        check_every: read the stopping state on the host (one synchronisation with an accelerator)
            every ``check_every`` iterations instead of every one; the result is the same except that
            up to ``check_every - 1`` evaluations may follow the last sample's stop (counted in
            ``n_f_evals``, repeated in the traces).
        **method_options: the options of ``method`` listed above.

    Returns:
        A :class:`Solution`. Per sample, with ``z_b`` the iterate of lowest criterion seen (never a
        non-finite one), ``value = f(z_b)`` (already computed, no extra evaluation); ``abs_residual`` and
        ``rel_residual`` are those of ``z_b`` (``||f(z_b) - z_b||`` etc.), ``nstep`` is the number of
        evaluations of ``f`` up to and including ``f(z_b)`` (so for Picard with ``tau=1``, ``value`` is
        the ``nstep``-th Picard iterate). If ``L`` is given, ``error_bound = L/(1-L) * abs_residual``,
        which bounds ``||value - z*||`` for any method because ``||f(z) - z*|| <= L ||z - z*||`` and
        ``||z - z*|| <= ||f(z) - z|| / (1-L)``. A sample for which ``f(z0)`` is already non-finite
        returns ``z0`` with infinite residuals. ``value`` is detached: differentiate through
        :func:`lipdeq.fixed_point`, not through ``solve``. ``solve`` never changes the grad mode.

    Raises:
        TypeError: ``z0`` not a floating tensor, ``f`` not callable or returning a non-tensor / another
            dtype or device, an unknown method option.
        ValueError: bad ``z0`` shape or non-finite ``z0``, ``f`` changing the shape or changing its
            previous result in place, unknown ``method`` or ``stop_mode``, ``tol <= 0``,
            ``max_iter < 1``, ``lipschitz`` outside [0, 1) or of the wrong shape, ``stop_mode="cert"``
            without ``lipschitz``, an invalid option value.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    cls = METHODS[method]
    valid = _options(cls)
    for key in method_options:
        if key not in valid:
            names = ", ".join(valid)
            raise TypeError(f"unknown option {key!r} for method {method!r}; valid options: {names}")
    check_settings(tol, stop_mode, max_iter, divergence_factor, eps, check_every)
    z, z_norm = check_z0(z0)
    L = check_lipschitz(lipschitz, z)
    if stop_mode == "cert" and L is None:
        raise ValueError("stop_mode='cert' requires lipschitz=L with 0 < L < 1")
    options = dict(method_options)
    if "m" in valid:  # at most max_iter - 1 steps are taken: never allocate unused history
        m = options.get("m", inspect.signature(cls).parameters["m"].default)
        options["m"] = min(check_int(f"{method} option m", m, minimum=1), max(1, max_iter - 1))
    stepper = cls(z, **options)  # validates the option values before the first evaluation of f
    f, no_autocast = _autocast_safe(f, z.device.type)
    with no_autocast:
        sol = drive(
            flat_map(f, z0.shape, z),
            z,
            stepper,
            tol=tol,
            stop_mode=stop_mode,
            max_iter=max_iter,
            lipschitz=L,
            return_trace=return_trace,
            divergence_factor=divergence_factor,
            eps=eps,
            check_every=check_every,
            z_norm=z_norm,
        )
    sol.value = sol.value.view(z0.shape)
    sol.method = method
    return sol


def _autocast_safe(
    f: Callable[[torch.Tensor], torch.Tensor], device_type: str
) -> tuple[Callable[[torch.Tensor], torch.Tensor], contextlib.AbstractContextManager]:
    """Under autocast, keep the solver's own arithmetic in the state's dtype and run only ``f`` in
    the caller's autocast precision. Returns the wrapped ``f`` and the context for the solve."""
    if not torch.is_autocast_enabled(device_type):
        return f, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)

    def f_autocast(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype):
            return f(z)

    return f_autocast, torch.autocast(device_type, enabled=False)
