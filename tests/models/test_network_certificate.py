"""The whole classifier's bound (images in [0, 1] -> logits, docs/MATH.md section 9) against
independent oracles: dense-matrix SVDs of the folded explicit maps, dense Jacobians, and empirical
Lipschitz estimates of the tightly solved equilibrium classifier, in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipdeq.lipschitz import conv_operator_norm
from lipdeq.lipschitz.empirical import empirical_lipschitz
from lipdeq.models import MultiscaleDEQ, create_model
from lipdeq.models.network_certificate import folded_conv_bound, layer_injection_bounds, network_bound

from .robust_models import (
    ROBUST,
    TIGHT,
    frozen_copy,
    pixel_map,
    randomise,
    tiny_cfg,
    trained_robust_model,
)


def _dense(fn, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of a linear map of one sample of ``shape`` (float64), column by column."""
    jac = torch.autograd.functional.jacobian(fn, torch.zeros(1, *shape, dtype=torch.float64))
    return jac.reshape(-1, math.prod(shape))


def _circular(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    k = weight.shape[-1]
    return F.conv2d(F.pad(x, (0, k - 1, 0, k - 1), mode="circular"), weight, stride=stride)


@pytest.mark.parametrize("stride,n", [(1, 5), (2, 6)])
def test_folded_conv_batchnorm_bound_is_the_exact_norm_of_the_folded_chain(stride, n):
    """Normalisation, conv and eval-mode BatchNorm folded into one kernel: the bound equals the dense
    SVD of the circular chain on the grid N = n + 2, bounds the module's own (zero-padded) chain, and is
    below the product of the separate norms."""
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=1, bias=True).double()
    bn = nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        bn.weight.copy_(torch.randn(4, generator=g, dtype=torch.float64))
        bn.running_var.copy_(0.1 + torch.rand(4, generator=g, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    in_scale = torch.tensor([1 / 0.2023, 1 / 0.1994, 1 / 0.2010], dtype=torch.float64)
    bound = folded_conv_bound(conv, bn, n, input_scale=in_scale)

    gain = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    grid = n + 2

    def circular_chain(x):
        return gain.view(1, -1, 1, 1) * _circular(in_scale.view(1, -1, 1, 1) * x, conv.weight.detach(), stride)

    def module_chain(x):  # the modules themselves, minus their constant shift
        with torch.no_grad():
            zero = bn(conv(torch.zeros_like(x)))
        return bn(conv(in_scale.view(1, -1, 1, 1) * x)) - zero

    circ = torch.linalg.matrix_norm(_dense(circular_chain, (3, grid, grid)), ord=2)
    padded = torch.linalg.matrix_norm(_dense(module_chain, (3, n, n)), ord=2)
    assert bound == pytest.approx(float(circ), rel=1e-10)
    assert float(padded) <= bound * (1 + 1e-12)
    product = conv_operator_norm(conv.weight.detach(), (n, n), stride=stride) * float(gain.abs().max()) * float(
        in_scale.max())
    assert bound < 0.95 * product


def _random_model(explicit: dict, seed: int) -> MultiscaleDEQ:
    model = MultiscaleDEQ(tiny_cfg(**explicit)).double()
    return randomise(model, torch.Generator().manual_seed(seed)).eval()


@pytest.mark.parametrize("explicit", [{}, ROBUST, dict(explicit_norm="none", explicit_cap=0.7)],
                         ids=["batchnorm", "robust", "no-norm"])
def test_stem_and_head_bounds_exceed_dense_jacobians(explicit):
    """Stem (pixels -> u) and head (state -> penultimate features): the bounds are above the largest
    singular value of the exact Jacobian at random points (dense matrices on 8x8 images)."""
    model = _random_model(explicit, seed=5)
    nb = network_bound(model)
    parts = nb.certificate.parts
    g = torch.Generator().manual_seed(6)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in
                 ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)))
    for _ in range(3):
        p = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda q: model.injection_of((q - mean) / std), p)
        assert float(torch.linalg.matrix_norm(jac.reshape(-1, p.numel()), ord=2)) <= parts["input"]
        z = torch.randn(1, model.layer.state_dim, generator=g, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda s: model.head.features(model.layer.unpack(s)), z)
        assert float(torch.linalg.matrix_norm(jac.reshape(-1, z.numel()), ord=2)) <= nb.state_to_features


def _assert_bound_above_empirical(model: MultiscaleDEQ, pixels: torch.Tensor, seed: int) -> float:
    value = model.lipschitz_bound(part="network").value
    assert math.isfinite(value)
    fn = pixel_map(frozen_copy(model, **TIGHT))
    g = torch.Generator().manual_seed(seed)
    rand = torch.rand(pixels.shape, generator=g, dtype=torch.float64)
    emp = empirical_lipschitz(fn, pixels, random_points=rand, iters=6, ascent_steps=8, jvp="finite_difference",
                              generator=g)
    assert emp.value > 0
    assert value >= emp.value, (value, emp)
    return value / emp.value


@pytest.mark.parametrize("explicit", [{}, ROBUST], ids=["batchnorm", "robust"])
def test_network_bound_exceeds_empirical_estimates_at_random_weights(explicit):
    model = _random_model(explicit, seed=11)
    assert model.lipschitz_bound().value < 1.0
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    _assert_bound_above_empirical(model, pixels, seed=13)


def test_network_bound_exceeds_empirical_estimates_after_training():
    """150 Adam steps at learning rate 0.05 (50 times the presets'): caps and gain clamps active, f's
    weights at their caps; in float64 the bound stays above every empirical estimate, at training
    images and at random images."""
    model = trained_robust_model()
    assert model.lipschitz_bound().value > 0.5  # f's weights went from their small init to their caps
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    _assert_bound_above_empirical(model, pixels, seed=22)


def test_equilibrium_vector_is_never_looser_than_the_scalar_form():
    """a . (I - M)^(-1) v <= ||a|| ||v|| / (1 - ||M||): with the same weights, the part
    'equilibrium' of the breakdown is at most the scalar form computed from the breakdown."""
    model = _random_model(ROBUST, seed=31)
    cert = model.lipschitz_bound(part="network")
    m, v = layer_injection_bounds(model.layer)
    a = np.array([cert.parts["head.branch0"], cert.parts["head.branch1"]])
    lip = cert.parts["layer"]
    assert lip <= np.linalg.norm(m, 2) * (1 + 1e-9)  # the layer certificate is never above its block matrix
    scalar = np.linalg.norm(a) * np.linalg.norm(v) / (1 - lip)
    neumann = a @ sum(np.linalg.matrix_power(m, k) for k in range(200)) @ v
    assert cert.parts["equilibrium"] == pytest.approx(min(scalar, neumann), rel=1e-9)
    assert cert.parts["equilibrium"] <= scalar


def test_hyperparameter_network_bound_matches_independent_arithmetic():
    """mode='hyper' of the robust tiny preset recomputed by hand: every explicit conv at the cap c,
    every gain at gn_cap = 1, the layer's convs at conv_cap = 2."""
    model = create_model("lipmdeq_tiny_robust", channels=[8, 8], head_channels=[4, 4], final_channels=8, num_groups=4,
                         explicit_cap=0.8)
    cert = model.lipschitz_bound(part="network", mode="hyper")
    c, s, alpha, beta, lc = 0.8, 0.4, 0.5, 0.3, 2.0
    block = s * ((1 - alpha) + alpha * s * lc * lc)
    post = s * lc
    m = post * block * np.array([[1 - beta, beta * 2 * lc], [beta * lc, 1 - beta]])
    v = post * np.array([1 - beta, beta * lc]) * s * alpha
    a = np.array([(c**3 + c) * c, c**3 + c])  # bottlenecks (three convs + shortcut conv), one stride-2 merge
    scalar = np.linalg.norm(a) * np.linalg.norm(v) / (1 - np.linalg.norm(m, 2))
    gain = min(a @ np.linalg.solve(np.eye(2) - m, v), scalar)
    # stem (normalisation folded into the first conv), final conv, average pool over 16x16, linear layer
    expected = (c / 0.1994) * c * gain * c * (1 / 16) * c
    assert cert.reason is None
    assert cert.value == pytest.approx(expected, rel=1e-12)


def test_default_part_is_the_layer_and_unknown_parts_are_refused():
    model = MultiscaleDEQ(tiny_cfg())
    assert model.lipschitz_bound().value == model.lipschitz_bound(part="layer").value
    with pytest.raises(ValueError, match="unknown certificate part 'net'"):
        model.lipschitz_bound(part="net")


def test_parts_without_a_finite_bound_give_inf_with_a_reason():
    hyper = MultiscaleDEQ(tiny_cfg()).lipschitz_bound(part="network", mode="hyper")
    assert math.isinf(hyper.value) and "explicit_cap=None" in hyper.reason and "BatchNorm" in hyper.reason
    baseline = create_model("mdeq_tiny", channels=[8, 8], head_channels=[4, 4], num_groups=4).lipschitz_bound(
        part="network")
    assert math.isinf(baseline.value) and "GroupNorm" in baseline.reason
    model = MultiscaleDEQ(tiny_cfg(**ROBUST)).eval()
    with torch.no_grad():
        model.head.final_layer[0].parametrizations.weight.original[0, 0] = float("nan")
    cert = model.lipschitz_bound(part="network")
    assert math.isinf(cert.value) and "NaN" in cert.reason and "head.final" in cert.reason
    loose = MultiscaleDEQ(tiny_cfg(relu_slope=1.0, conv_cap=20.0))
    with torch.no_grad():
        for p in loose.layer.parameters():
            p.mul_(100.0)
    assert loose.lipschitz_bound().value >= 1.0
    cert = loose.lipschitz_bound(part="network")
    assert math.isinf(cert.value) and "not below 1" in cert.reason


def test_robust_preset_has_the_tiny_layout_and_a_finite_hyperparameter_bound():
    robust, tiny = create_model("lipmdeq_tiny_robust"), create_model("lipmdeq_tiny")
    # mean-only GroupNorms carry the same parameters as the BatchNorms they replace
    assert robust.num_parameters() == tiny.num_parameters() and robust.num_parameters("f") == tiny.num_parameters("f")
    assert robust.lipschitz_bound(mode="hyper").value == tiny.lipschitz_bound(mode="hyper").value
    assert math.isfinite(robust.lipschitz_bound(part="network", mode="hyper").value)
