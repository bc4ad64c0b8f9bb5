"""Certified l2 radii (docs/MATH.md section 9.5): the pairwise formula on constructed cases, and an
l2 PGD attack that must never change a prediction within its certified radius on real CIFAR-10
test images."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lipdeq.lipschitz import LipschitzCertificate
from lipdeq.models import MultiscaleDEQ
from lipdeq.models.network_certificate import NetworkBound, network_bound
from lipdeq.models.robustness import CERTIFIED_EPSILONS, certified_accuracy, certified_radius_from_logits

from .robust_models import (
    ROBUST,
    TIGHT,
    downsampled_test_images,
    frozen_copy,
    pixel_map,
    pixel_stats,
    randomise,
    tiny_cfg,
    trained_robust_model,
)


def _bound(features: float, state: float, w: torch.Tensor) -> NetworkBound:
    value = features * float(torch.linalg.matrix_norm(w, ord=2))
    return NetworkBound(LipschitzCertificate(value=value), features=features, state_to_features=state, classifier=w)


def test_pairwise_radius_on_a_constructed_case():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    nb = _bound(2.0, 3.0, w)
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.5, 0.4], [1.0, 1.0, 0.0]], dtype=torch.float64)
    err = torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64)
    r = certified_radius_from_logits(logits, nb, err)
    # sample 0, class 0: j=1 gap sqrt(2), j=2 gap 1
    r0 = min((2.0 - 3.0 * math.sqrt(2) * 0.1) / (2.0 * math.sqrt(2)), (3.0 - 3.0 * 0.1) / 2.0)
    # sample 1, class 1: j=0 gap sqrt(2), j=2 gap 1
    r1 = min(0.5 / (2.0 * math.sqrt(2)), 0.1 / 2.0)
    assert r.tolist() == pytest.approx([r0, r1, 0.0], rel=1e-12)  # a tie certifies nothing
    assert certified_radius_from_logits(logits, nb, err, torch.tensor([True, False, True])).tolist() == \
        pytest.approx([r0, 0.0, 0.0], rel=1e-12)
    assert certified_radius_from_logits(logits, nb, None).tolist() == [0.0, 0.0, 0.0]
    big = torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64)  # the solver error eats the margin
    assert certified_radius_from_logits(logits, nb, big)[0] == 0.0
    inf = _bound(math.inf, 3.0, w)
    assert certified_radius_from_logits(logits, inf, err).tolist() == [0.0, 0.0, 0.0]


def test_pairwise_radius_is_never_looser_than_the_global_form():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 6, generator=g, dtype=torch.float64)
    logits = torch.randn(64, 10, generator=g, dtype=torch.float64)
    err = 0.01 * torch.rand(64, generator=g, dtype=torch.float64)
    nb = _bound(0.7, 1.3, w)
    r = certified_radius_from_logits(logits, nb, err)
    top2 = logits.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    w_norm = float(torch.linalg.matrix_norm(w, ord=2))
    lip = nb.certificate.value
    glob = ((margin - math.sqrt(2) * 1.3 * w_norm * err) / (math.sqrt(2) * lip)).clamp_min(0)
    assert (r >= glob * (1 - 1e-12)).all() and (r > glob * 1.01).any()


def test_certified_accuracy_counts_correct_samples_with_radius_at_least_eps():
    radii = torch.tensor([0.2, 0.5, 0.3, 0.0, 108 / 255])
    correct = torch.tensor([True, True, False, True, True])
    acc = certified_accuracy(radii, correct)
    assert list(acc) == ["36/255", "72/255", "108/255"] == list(CERTIFIED_EPSILONS)
    assert acc == {"36/255": 3 / 5, "72/255": 2 / 5, "108/255": 2 / 5}


def test_certified_radius_method_combines_forward_solution_and_bound():
    model = MultiscaleDEQ(tiny_cfg(**ROBUST)).double()
    randomise(model, torch.Generator().manual_seed(1))
    mean, std = pixel_stats()
    x = (torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - mean) / std
    model.train()
    r = model.certified_radius(x)
    assert model.training and r.shape == (3,) and r.dtype == torch.float64
    model.eval()
    with torch.no_grad():
        logits = model(x)
    sol = model.last_solution
    expected = certified_radius_from_logits(logits, network_bound(model), sol.error_bound, sol.converged)
    torch.testing.assert_close(r, expected)
    unsolved = frozen_copy(model, f_thres=1, f_tol=1e-12)
    assert unsolved.certified_radius(x).tolist() == [0.0, 0.0, 0.0]  # no converged solve, no radius


def _pgd_min_margin(fn, images: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor, *, steps: int,
                    restarts: int, generator: torch.Generator) -> torch.Tensor:
    """Smallest margin ``logit_c - max_{j != c} logit_j`` seen by an l2 PGD attack (normalised
    gradient steps, projection on the ball of radius ``eps``, random starts inside it; no clipping to
    [0, 1]: the certificate covers every input), all restarts in one batch; per sample."""
    b = images.shape[0]
    x = images.repeat(restarts, 1, 1, 1)
    c = labels.repeat(restarts)
    radius = eps.repeat(restarts).view(-1, 1, 1, 1)
    delta = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * radius * torch.rand(
        x.shape[0], 1, 1, 1, generator=generator, dtype=x.dtype)
    best = torch.full((x.shape[0],), math.inf, dtype=x.dtype)
    step = 2.5 * radius / steps
    for _ in range(steps + 1):
        delta.requires_grad_(True)
        logits = fn(x + delta)
        other = logits.masked_fill(F.one_hot(c, logits.shape[1]).bool(), -math.inf).max(dim=1).values
        margin = logits.gather(1, c[:, None])[:, 0] - other
        best = torch.minimum(best, margin.detach())
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            delta = delta - step * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
            norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.clamp(radius / norm.clamp_min(1e-30), max=1.0)
    return best.view(restarts, b).min(dim=0).values


def test_pgd_never_changes_a_prediction_within_its_certified_radius(real_cifar_dir):
    """Six CIFAR-10 test images (4x4 average-pooled to 8x8), a hard-trained tiny robust model: 50 steps
    of l2 PGD from 3 random starts within each certified radius never change the predicted class,
    while 25 steps of the same attack at 30 times the radius do change some."""
    pixels, _ = downsampled_test_images(str(real_cifar_dir), 6)
    model = trained_robust_model()
    mean, std = pixel_stats()
    radii = model.certified_radius((pixels - mean) / std)
    assert (radii > 0).sum() >= 3, radii  # not vacuous: half the images have a radius
    attacked = pixel_map(frozen_copy(model, **TIGHT))
    with torch.no_grad():
        pred = attacked(pixels).argmax(dim=1)
    g = torch.Generator().manual_seed(8)
    inside = _pgd_min_margin(attacked, pixels, pred, radii, steps=50, restarts=3, generator=g)
    assert (inside > 0).all(), (inside, radii)
    outside = _pgd_min_margin(attacked, pixels, pred, 30 * radii, steps=25, restarts=1, generator=g)
    assert (outside[radii > 0] < 0).any(), outside  # the attack is strong enough to flip at larger radii
