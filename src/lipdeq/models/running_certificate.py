"""A certified Lip(f) for every training step, at a small fraction of the FFT certificate's cost.

At a *refresh* the running certificate stores every convolution's effective weight ``W_ref`` of f
and its exact FFT operator norm (docs/MATH.md section 5). Between refreshes, each conv's norm is
bounded by a perturbation of the stored one,

    ||C(W)|| <= ||C(W_ref)|| + ||C(W - W_ref)|| <= ||C(W_ref)|| + sum over kernel taps t ||(W - W_ref)_t||_2,

because a convolution is the sum over taps of a (shifted, strided, zero-padded) copy of the input
times the tap's c_out x c_in matrix (block diagonal for groups, whose norm is at most that of the
stacked c_out x c_in/groups matrix), and each shift has norm at most 1. The layer bound is then the
block-matrix certificate of :func:`~lipdeq.models.certify.layer_certificate` in its product form
(``tighten=False``) with these conv bounds and the exact gains: every factor is an upper bound of
the one the product form would use on the exact norms, the composition is monotone in its factors,
and the product form is never below the tightened certificate, so the running value is never below
the exact FFT certificate of the same weights. It costs one pass over f's weights and the
composition, no FFT.

Refreshes happen every ``refresh_every`` training-mode calls, after :meth:`reset` (the trainer
resets at every checkpoint and resume, so that a resumed run sees the same bounds, hence the same
solver budgets, as the run it continues), and when the caller asks (``refresh=True``: the model does
when the drifted bound would buy a larger solver budget than the value of the last refresh). Every
one of these depends only on the weights and the calls since the last reset, so a resumed run
refreshes where the run it continues did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lipdeq.checks import check_int
from lipdeq.lipschitz.chain import ConvSpec
from lipdeq.models.certify import layer_certificate

__all__ = ["RunningBound", "RunningCertificate"]


@dataclass(frozen=True)
class RunningBound:
    """One value of the running certificate.

    Attributes:
        value: certified upper bound of Lip(f) in z (l2, the training-time map unless asked otherwise).
        refreshed: True when this call recomputed every conv's exact FFT norm.
        age: calls since the last refresh (0 at a refresh).
        reference: the value at the last refresh (exact conv norms, the same product form).
    """

    value: float
    refreshed: bool
    age: int
    reference: float


class RunningCertificate:
    """Certified Lip(f) of a :class:`~lipdeq.models.layer.MultiscaleLayer` for every step (module docstring).

    Call it where the layer's parametrised weights are cached (inside
    :meth:`~lipdeq.models.MultiscaleDEQ.cached_weights`): it reads each conv's ``weight``, and
    outside that context a training-mode read would advance the caps' power iteration.
    """

    def __init__(self, layer: nn.Module, refresh_every: int = 20) -> None:
        self.layer = layer
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        self._refs: dict[nn.Module, tuple[torch.Tensor, float]] = {}
        self._last: tuple[int, float] | None = None  # (training calls since the last refresh, its value)

    @property
    def age(self) -> int | None:
        """Training-mode calls since the last refresh (0 right after one; None before the first)."""
        return None if self._last is None else self._last[0]

    @property
    def reference(self) -> float:
        """The value at the last refresh (inf before the first)."""
        return math.inf if self._last is None else self._last[1]

    def reset(self) -> None:
        """Forget the stored weights: the next call refreshes."""
        self._refs = {}
        self._last = None

    def _exact(self, conv: nn.Conv2d, spec: ConvSpec) -> float:
        w = conv.weight.detach().to(torch.float64)
        if not bool(torch.isfinite(w).all()):
            return math.inf
        norm = spec.norm(w.clone())
        self._refs[conv] = (w.clone(), norm)
        return norm

    def _updated(self, conv: nn.Conv2d, spec: ConvSpec) -> float:
        ref = self._refs.get(conv)
        if ref is None:
            return self._exact(conv, spec)
        w_ref, norm_ref = ref
        delta = conv.weight.detach().to(torch.float64) - w_ref
        taps = delta.permute(2, 3, 0, 1).reshape(-1, *delta.shape[:2])  # (k_h k_w, c_out, c_in / groups)
        # sum over taps of the spectral norm (about 3x below the Frobenius norm for Adam's dense updates)
        bound = norm_ref + float(torch.linalg.matrix_norm(taps, ord=2).sum())
        return bound if math.isfinite(bound) else math.inf

    def __call__(self, *, training: bool = True, refresh: bool = False) -> RunningBound:
        """The bound for the current weights; ``training``: of the training-time map (the default;
        its dropout factor also covers the eval map); ``refresh``: recompute the exact norms now. Only
        training-mode calls age the reference."""
        refresh = refresh or self._last is None or self._last[0] >= self.refresh_every
        if refresh:
            self._refs = {}
        cert = layer_certificate(self.layer, training=training, tighten=False,
                                 conv_norm=self._exact if refresh else self._updated)
        if refresh:
            self._last = (0, float(cert.value))
        elif training:
            self._last = (self._last[0] + 1, self._last[1])
        return RunningBound(float(cert.value), refresh, *self._last)
