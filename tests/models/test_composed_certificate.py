"""The layer certificate computed by the composition machinery: never above the product form it
replaces (tests/models/reference_certificate.py), never below float64 empirical estimates."""

from __future__ import annotations

import math

import pytest
import torch

from lipdeq.lipschitz.empirical import empirical_lipschitz
from lipdeq.models import MultiscaleDEQ, model_config
from lipdeq.models.certify import layer_certificate
from lipdeq.solvers import solve

from .reference_certificate import reference_layer_certificate

TINY = dict(channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4, image_size=8)
REL = 1e-12  # floating-point rounding of a differently ordered product


def _empirical(model: MultiscaleDEQ, seed: int) -> float:
    """Largest float64 estimate of Lip(f) in z: Jacobian power iteration at fixed points and at
    random states, gradient ascent on pairs (lipdeq.lipschitz.empirical)."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, model.cfg.image_size, model.cfg.image_size, generator=gen, dtype=torch.float64)
    with model.cached_weights():
        f, z0 = model.fixed_point_problem(x)
        with torch.no_grad():
            z_star = solve(f, z0, tol=1e-10, stop_mode="abs", max_iter=100).value
        emp = empirical_lipschitz(f, z_star, iters=40, ascent_steps=40, generator=gen)
    return emp.value


def _check_against_reference(model: MultiscaleDEQ) -> float:
    with torch.no_grad():
        new = layer_certificate(model.layer)
        ref = reference_layer_certificate(model.layer)
        assert new.value <= ref.value * (1 + REL)
        for training in (True, False):
            a = layer_certificate(model.layer, training=training, tighten=False)
            b = layer_certificate(model.layer, training=training)
            assert b.value <= a.value * (1 + REL)
        t_new = layer_certificate(model.layer, training=True)
        t_ref = reference_layer_certificate(model.layer, training=True)
        assert t_new.value <= t_ref.value * (1 + REL)
        assert layer_certificate(model.layer, mode="hyper").value == pytest.approx(
            reference_layer_certificate(model.layer, mode="hyper").value, rel=REL)
    return new.value


@pytest.mark.parametrize("std,seed", [(0.3, 0), (1.0, 1)])
def test_random_weights(std, seed):
    gen = torch.Generator().manual_seed(seed)
    model = MultiscaleDEQ(model_config("lipmdeq_tiny", **TINY)).double().eval()
    with torch.no_grad():
        for p in model.layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std + (1.0 if p.dim() == 1 else 0.0))
    cert = _check_against_reference(model)
    emp = _empirical(model, seed)
    assert 0 < emp <= cert < 1.0


@pytest.fixture(scope="module")
def trained() -> MultiscaleDEQ:
    """A tiny model after 200 Adam steps at learning rate 0.05 on random data, with a loss that
    pushes the weights towards their caps."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    model = MultiscaleDEQ(model_config("lipmdeq_tiny", **TINY))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    for _ in range(200):
        with model.cached_weights():
            f, z0 = model.fixed_point_problem(x)
            loss = -f(torch.randn(z0.shape, generator=gen)).norm()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval()


def test_after_aggressive_training(trained):
    cert = _check_against_reference(trained)
    ref = reference_layer_certificate(trained.layer).value
    assert cert < ref  # the tightening does something on trained weights
    assert _empirical(trained, 3) <= cert < 1.0


def test_product_form_and_breakdown_without_dropout(trained):
    # With p = 0 the eval factors agree, and the untightened certificate is the reference arithmetic.
    model = MultiscaleDEQ(model_config("lipmdeq_tiny", **TINY, dropout=0.0)).double().eval()
    model.load_state_dict(trained.state_dict())  # eval mode: reading a capped weight moves no power iteration
    with torch.no_grad():
        plain = layer_certificate(model.layer, tighten=False)
        ref = reference_layer_certificate(model.layer)
        cert = layer_certificate(model.layer)
    assert plain.value == pytest.approx(ref.value, rel=REL)
    for key in ("branch0.conv1", "branch1.block", "fuse0<-1", "fuse1<-0", "branch0.post", "dropout"):
        assert key in cert.parts and math.isfinite(cert.parts[key])
    assert cert.matrix is not None and len(cert.matrix) == 2
    assert max(max(r) for r in cert.matrix) <= cert.value <= math.sqrt(sum(v * v for r in cert.matrix for v in r))
    assert cert.breakdown["rule"] == "matrix" and cert.mode == "weights"


def test_eval_dropout_factor_is_the_one_the_forward_applies():
    # Unrescaled masks: eval multiplies by (1 - p), training by masks with entries 0 or 1.
    model = MultiscaleDEQ(model_config("lipmdeq_tiny", **TINY, dropout=0.5))
    with torch.no_grad():
        assert layer_certificate(model.layer).parts["dropout"] == 0.5
        assert layer_certificate(model.layer, training=True).parts["dropout"] == 1.0
        assert layer_certificate(model.layer, mode="hyper").parts["dropout"] == 1.0
