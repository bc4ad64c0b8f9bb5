"""Certified accuracy for ``lipdeq eval --robust`` (docs/MATH.md section 9.5).

The whole classifier's bound is computed once per evaluation (after any BatchNorm re-estimation);
each batch's radii come from its logits and the forward solve's per-sample error bounds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lipdeq.errors import LipdeqError
from lipdeq.models import MultiscaleDEQ
from lipdeq.models.network_certificate import NetworkBound, network_bound
from lipdeq.models.robustness import certified_accuracy, certified_radius_from_logits
from lipdeq.solvers import Solution

__all__ = ["RobustEvaluationError", "RobustTally"]


class RobustEvaluationError(LipdeqError, ValueError):
    """Certified accuracy was asked for a model or a precision that cannot give it."""


class RobustTally:
    """Collects per-sample certified radii and correctness over the batches of one evaluation."""

    def __init__(self, model: nn.Module, *, amp: bool = False) -> None:
        if amp:
            raise RobustEvaluationError(
                "certified accuracy needs float32 or float64 logits: bfloat16 rounding (train.amp=bf16) can "
                "change a logit margin by more than a certified radius allows; evaluate with train.amp=none"
            )
        if not isinstance(model, MultiscaleDEQ):
            raise RobustEvaluationError(f"certified accuracy needs a lipdeq MultiscaleDEQ, got {type(model).__name__}")
        self.bound: NetworkBound = network_bound(model)
        self.radii: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor, solution: Solution | None) -> None:
        """Radii of one batch (0 for every sample without a certified solve)."""
        if solution is None:
            radius = torch.zeros(logits.shape[0], dtype=torch.float64)
        else:
            radius = certified_radius_from_logits(logits, self.bound, solution.error_bound, solution.converged)
        self.radii.append(radius.cpu())
        self.correct.append((logits.argmax(dim=1) == labels).cpu())

    def summary(self) -> dict[str, Any]:
        """``certified_accuracy`` (eps -> fraction), ``certified_radius_median`` (pixel units, over all
        samples, misclassified ones included), ``network_lipschitz`` and its reason (if infinite)."""
        radii = torch.cat(self.radii) if self.radii else torch.zeros(0, dtype=torch.float64)
        correct = torch.cat(self.correct) if self.correct else torch.zeros(0, dtype=torch.bool)
        cert = self.bound.certificate
        return {
            "certified_accuracy": certified_accuracy(radii, correct),
            "certified_radius_median": float(radii.median()) if radii.numel() else float("nan"),
            "network_lipschitz": cert.value,
            "network_lipschitz_reason": cert.reason,
        }
