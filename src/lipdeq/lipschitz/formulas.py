"""The closed-form bounds of the multiscale layer's parts (docs/MATH.md section 4.1), from scalars.

Each is the composition rules of :mod:`lipdeq.lipschitz.compose` applied to the parts' bounds, so
there is one arithmetic in the package; they are what the certificate of the layer gives with
every conv and gain at the values passed (the hyperparameter certificate, section 4.3). The
certificate of actual weights (:func:`lipdeq.models.certify.layer_certificate`) is at most these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lipdeq.lipschitz.compose import compose, mix

__all__ = ["downsample_fusion_bound", "post_fusion_bound", "residual_block_bound", "upsample_fusion_bound"]


def _nonneg(name: str, value: float) -> float:
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a nonnegative number, got {value!r}")
    return value


def residual_block_bound(s: float, alpha: float, gn: float, conv1: float, conv2: float) -> float:
    """Bound of the residual block ``b = N3(s relu((1-a) z + a N2(C2 s relu(N1(C1 z)) + u)))``.

    ``gn * s * (|1 - alpha| + |alpha| * gn^2 * s * conv1 * conv2)`` (docs/MATH.md section 4.1; equal to
    ``gn*s*((1-alpha) + alpha*gn^2*s*conv1*conv2)`` for alpha in [0, 1]). ``gn`` bounds each of the
    three norms, ``conv1``/``conv2`` the two convolutions' operator norms, ``s`` the ReLU slope.
    """
    s, gn = _nonneg("s", s), _nonneg("gn", gn)
    conv1, conv2 = _nonneg("conv1", conv1), _nonneg("conv2", conv2)
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    inner = compose(conv1, gn, s, conv2, gn)
    return compose(mix([(1.0 - alpha, 1.0), (alpha, inner)]), s, gn).value


def upsample_fusion_bound(conv: float, gn: float, level_diff: int) -> float:
    """Bound ``2^level_diff * conv * gn`` of the coarse-to-fine fusion path (1x1 conv, N, upsampling).

    Nearest upsampling by ``r = 2^level_diff`` copies each pixel r^2 times: operator norm exactly r.
    """
    if not isinstance(level_diff, int) or level_diff < 0:
        raise ValueError(f"level_diff must be a non-negative int, got {level_diff!r}")
    return compose(_nonneg("conv", conv), _nonneg("gn", gn), float(2**level_diff)).value


def downsample_fusion_bound(conv_norms: Sequence[float], gn: float, s: float) -> float:
    """Bound ``prod(conv_norms) * gn^L * s^(L-1)`` of L stride-2 conv + N stages with s*relu between."""
    norms = [_nonneg("conv_norms[i]", c) for c in conv_norms]
    if not norms:
        raise ValueError("conv_norms must contain at least one operator norm")
    gn, s = _nonneg("gn", gn), _nonneg("s", s)
    factors: list[float] = []
    for k, c in enumerate(norms):
        factors += ([s] if k else []) + [c, gn]
    return compose(*factors).value


def post_fusion_bound(s: float, conv: float, gn: float = 1.0) -> float:
    """Bound ``gn * conv * s`` of the post-fusion map ``N(C(s relu(y)))`` (gn = 1 without affine)."""
    return compose(_nonneg("s", s), _nonneg("conv", conv), _nonneg("gn", gn)).value
