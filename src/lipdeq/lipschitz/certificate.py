"""Lipschitz certificates: the result type and the bound arithmetic of docs/MATH.md sections 3 and 4."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LipschitzCertificate",
    "block_matrix_bound",
    "downsample_fusion_bound",
    "post_fusion_bound",
    "residual_block_bound",
    "upsample_fusion_bound",
]


def _json_float(x: float) -> float | str:
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _from_json_float(x: float | str) -> float:
    return float(x)


@dataclass
class LipschitzCertificate:
    """An upper bound ``value`` of Lip(f) in z (l2), with its derivation.

    ``parts``: named per-part bounds (e.g. per-branch block, fusion, post-fusion); ``matrix``: the
    n x n block-bound matrix whose spectral norm is ``value`` (if any); ``reason``: why no finite
    bound exists (``value = inf``) or other remarks; ``mode``: ``"eval"`` or ``"train"``.
    """

    value: float
    parts: dict[str, float] = field(default_factory=dict)
    matrix: list[list[float]] | None = None
    reason: str | None = None
    mode: str = "eval"

    @property
    def is_contraction(self) -> bool:
        """True when the bound certifies a contraction (``value < 1``)."""
        return bool(self.value < 1.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: non-finite floats become the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
        return {
            "value": _json_float(self.value),
            "parts": {str(k): _json_float(v) for k, v in self.parts.items()},
            "matrix": None if self.matrix is None else [[_json_float(x) for x in row] for row in self.matrix],
            "reason": self.reason,
            "mode": self.mode,
            "is_contraction": self.is_contraction,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LipschitzCertificate:
        """Inverse of :meth:`to_dict`."""
        matrix = data.get("matrix")
        return cls(
            value=_from_json_float(data["value"]),
            parts={k: _from_json_float(v) for k, v in data.get("parts", {}).items()},
            matrix=None if matrix is None else [[_from_json_float(x) for x in row] for row in matrix],
            reason=data.get("reason"),
            mode=data.get("mode", "eval"),
        )


def block_matrix_bound(matrix: Tensor | Sequence[Sequence[float]]) -> float:
    """Spectral norm (largest singular value, float64) of a nonnegative n x n matrix of block bounds.

    If a block operator A has blocks with ``||A_ij|| <= M_ij``, then ``||A|| <= ||M||_2`` (for unit
    x, ``||A x|| <= ||M (||x_j||)_j|| <= ||M||_2``). Infinite entries give ``inf``.
    """
    m = torch.as_tensor(matrix, dtype=torch.float64).detach().cpu() if not isinstance(matrix, Tensor) else (
        matrix.detach().to(device="cpu", dtype=torch.float64))
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"matrix must be a non-empty square 2-D matrix, got shape {tuple(m.shape)}")
    if torch.isnan(m).any():
        raise ValueError("matrix contains NaN")
    if (m < 0).any():
        raise ValueError("matrix entries must be nonnegative (they are norm bounds)")
    if torch.isinf(m).any():
        return math.inf
    return float(torch.linalg.matrix_norm(m, ord=2))


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
    return gn * s * (abs(1.0 - alpha) + abs(alpha) * gn * gn * s * conv1 * conv2)


def upsample_fusion_bound(conv: float, gn: float, level_diff: int) -> float:
    """Bound ``2^level_diff * conv * gn`` of the coarse-to-fine fusion path (1x1 conv, N, upsampling).

    Nearest upsampling by ``r = 2^level_diff`` copies each pixel r^2 times: operator norm exactly r.
    """
    if not isinstance(level_diff, int) or level_diff < 0:
        raise ValueError(f"level_diff must be a non-negative int, got {level_diff!r}")
    return float(2**level_diff) * _nonneg("conv", conv) * _nonneg("gn", gn)


def downsample_fusion_bound(conv_norms: Sequence[float], gn: float, s: float) -> float:
    """Bound ``prod(conv_norms) * gn^L * s^(L-1)`` of L stride-2 conv + N stages with s*relu between."""
    norms = [_nonneg("conv_norms[i]", c) for c in conv_norms]
    if not norms:
        raise ValueError("conv_norms must contain at least one operator norm")
    gn, s = _nonneg("gn", gn), _nonneg("s", s)
    return math.prod(norms) * gn ** len(norms) * s ** (len(norms) - 1)


def post_fusion_bound(s: float, conv: float, gn: float = 1.0) -> float:
    """Bound ``gn * conv * s`` of the post-fusion map ``N(C(s relu(y)))`` (gn = 1 without affine)."""
    return _nonneg("gn", gn) * _nonneg("conv", conv) * _nonneg("s", s)
