"""Certified l2 robustness from the whole classifier's bound (docs/MATH.md section 9.5).

The radius of a sample is that of the *true* equilibrium classifier: the margins of the computed
logits (from an approximate fixed point) are first reduced by what the solver's certified error
bound can change them by. Radii are in pixel units: l2 norms of perturbations of the image in
[0, 1], before the normalisation that ``model(x)`` expects already applied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lipdeq.models.network_certificate import NetworkBound

__all__ = ["CERTIFIED_EPSILONS", "certified_accuracy", "certified_radius_from_logits"]

#: The l2 radii at which Lipschitz-network papers report certified accuracy on CIFAR-10.
CERTIFIED_EPSILONS: dict[str, float] = {"36/255": 36 / 255, "72/255": 72 / 255, "108/255": 108 / 255}


def certified_radius_from_logits(
    logits: Tensor,
    bound: NetworkBound,
    error_bound: Tensor | None,
    converged: Tensor | None = None,
) -> Tensor:
    """Per-sample certified l2 radius (B,) of the predicted class ``c = argmax logits``, float64.

    With ``phi`` the penultimate features, ``w_k`` the rows of the linear layer, ``Lphi`` =
    ``bound.features`` and ``H`` = ``bound.state_to_features``:

        r = min_{j != c} (logit_c - logit_j - H * ||w_c - w_j|| * err) / (Lphi * ||w_c - w_j||),

    clipped at 0, where ``err`` is the solver's per-sample bound on the distance of the computed
    state to the true fixed point (``Solution.error_bound``). No perturbation of l2 norm below r
    changes the true classifier's prediction from c. The pairwise form is never looser than
    ``margin / (sqrt(2) * Lip(x -> logits))``. A sample whose solve did not converge (``converged``
    False), or without an error bound (``error_bound=None``), gets radius 0; so does every sample
    when the bound is not finite.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (B, K) with K >= 2, got {tuple(logits.shape)}")
    b, k = logits.shape
    out_zero = torch.zeros(b, dtype=torch.float64, device=logits.device)
    if error_bound is None or bound.classifier is None or not math.isfinite(bound.features):
        return out_zero
    z = logits.detach().to(torch.float64)
    err = error_bound.detach().to(device=z.device, dtype=torch.float64).reshape(b)
    w = bound.classifier.to(device=z.device, dtype=torch.float64)
    if w.shape[0] != k:
        raise ValueError(f"logits have {k} classes but the classifier has {w.shape[0]} rows")
    gaps = torch.cdist(w, w)  # (K, K): ||w_c - w_j||
    c = z.argmax(dim=1)
    g = gaps[c]  # (B, K)
    margins = z.gather(1, c[:, None]) - z
    adjusted = margins - bound.state_to_features * g * err[:, None]
    denom = bound.features * g
    ratio = torch.where(denom > 0, adjusted / denom.clamp_min(torch.finfo(torch.float64).tiny),
                        torch.where(adjusted > 0, torch.full_like(adjusted, math.inf), torch.zeros_like(adjusted)))
    ratio = ratio.scatter(1, c[:, None], math.inf)  # j != c
    radius = ratio.min(dim=1).values.clamp_min(0.0)
    radius = torch.where(torch.isfinite(err) & (err >= 0), radius, out_zero)
    if converged is not None:
        radius = torch.where(converged.to(radius.device).reshape(b), radius, out_zero)
    return radius


def certified_accuracy(
    radii: Tensor, correct: Tensor, epsilons: Mapping[str, float] = CERTIFIED_EPSILONS
) -> dict[str, float]:
    """Fraction of samples classified correctly with a certified radius of at least eps, per eps."""
    if radii.shape != correct.shape or radii.dim() != 1:
        raise ValueError(f"radii {tuple(radii.shape)} and correct {tuple(correct.shape)} must be equal 1-D shapes")
    n = max(int(radii.numel()), 1)
    ok = correct.to(torch.bool)
    return {name: int((ok & (radii >= eps)).sum()) / n for name, eps in epsilons.items()}
