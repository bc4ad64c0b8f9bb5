"""Lipschitz certificates: the result type and the spectral norm of a block-bound matrix.

The rules that combine bounds are in :mod:`lipdeq.lipschitz.compose`, the tightened bounds of linear
chains in :mod:`lipdeq.lipschitz.chain` (docs/MATH.md sections 3, 4 and 10).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["LipschitzCertificate", "block_matrix_bound"]


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

    ``parts``: named per-part bounds (e.g. per-branch block, fusion, post-fusion), flat name ->
    float; ``matrix``: the n x n block-bound matrix whose spectral norm is ``value`` (if any);
    ``reason``: why no finite bound exists (``value = inf``) or other remarks; ``mode``: what was
    certified (``"eval"``, ``"train"``, ``"weights"``, ``"hyper"``); ``breakdown``: the derivation
    tree (:meth:`lipdeq.lipschitz.Bound.to_dict`: name, value, rule, note, children), if any.
    """

    value: float
    parts: dict[str, float] = field(default_factory=dict)
    matrix: list[list[float]] | None = None
    reason: str | None = None
    mode: str = "eval"
    breakdown: dict[str, Any] | None = None

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
            "breakdown": self.breakdown,
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
            breakdown=data.get("breakdown"),
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
