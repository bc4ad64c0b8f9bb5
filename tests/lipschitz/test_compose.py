"""Composable certificates: the combinators, every block's own bound and the containers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lipdeq.lipschitz import (
    BlockMatrix,
    Bound,
    CertificateError,
    LipschitzCertificate,
    LipschitzSequential,
    MeanOnlyGroupNorm,
    Mix,
    ScaledReLU,
    VariationalDropout2d,
    apply_operator_norm_cap,
    block_matrix,
    compose,
    conv_operator_norm,
    convex_residual,
    lipschitz_bound,
    mix,
)
from lipdeq.lipschitz.empirical import empirical_lipschitz


def test_combinators_follow_the_rules():
    assert compose(2.0, 0.5, 3.0).value == pytest.approx(3.0)
    assert compose(0.0, math.inf).value == 0.0  # an absent path contributes nothing
    assert compose(2.0, math.inf).value == math.inf
    assert mix([(0.3, 2.0), (-0.5, 1.0), (0.0, math.inf)]).value == pytest.approx(1.1)
    rng = np.random.default_rng(0)
    m = rng.uniform(0, 1, size=(3, 2))
    assert block_matrix(m.tolist()).value == pytest.approx(np.linalg.norm(m, 2), rel=1e-12)
    assert block_matrix([[1.0, math.inf]]).value == math.inf
    with pytest.raises(ValueError, match="nonnegative"):
        compose(-1.0)
    with pytest.raises(TypeError, match="bound"):
        compose("1")


def test_certificate_keeps_breakdown_through_json():
    tree = block_matrix([[compose(0.5, 0.4, name="a"), 0.1], [0.2, mix([(0.5, 1.0), (0.5, 0.3)], name="b")]],
                        name="root")
    cert = tree.certificate(mode="weights")
    assert cert.matrix == [[pytest.approx(0.2), 0.1], [0.2, pytest.approx(0.65)]]
    assert cert.parts["root"] == cert.value and cert.parts["a"] == pytest.approx(0.2)
    back = LipschitzCertificate.from_dict(json.loads(json.dumps(cert.to_dict(), allow_nan=False)))
    assert back.value == cert.value and back.parts == cert.parts and back.matrix == cert.matrix
    assert Bound.from_dict(back.breakdown) == tree
    # a certificate is itself a part of a composition, with its breakdown
    assert compose(cert, 2.0).value == pytest.approx(2.0 * cert.value)
    inf = compose(Bound("x", math.inf, note="no rule for Softmax"), 1.0).certificate()
    assert inf.value == math.inf and inf.reason == "no rule for Softmax"


def _dense_norm(op, shape) -> float:
    n = math.prod(shape)
    with torch.no_grad():
        m = op(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, -1)
    return float(torch.linalg.matrix_norm(m, ord=2))


@pytest.mark.parametrize("module,shape,exact", [
    (nn.Upsample(scale_factor=2, mode="nearest"), (2, 3, 3), True),
    (nn.AvgPool2d(2), (2, 4, 4), True),
    (nn.AvgPool2d(3, stride=1, padding=1), (2, 5, 5), False),
    (nn.AdaptiveAvgPool2d(1), (2, 4, 6), True),
    (nn.AdaptiveAvgPool2d((2, 3)), (1, 4, 6), True),
    (nn.Linear(6, 4), (6,), True),
    (nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), (3, 7, 7), False),
    (nn.Conv2d(3, 4, 1, bias=False), (3, 4, 4), True),
])
def test_linear_blocks_bound_their_dense_operator(module, shape, exact):
    torch.manual_seed(0)
    module = module.double().eval()
    if isinstance(module, (nn.Linear, nn.Conv2d)) and getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    size = shape[1:] if len(shape) == 3 else None
    bound = lipschitz_bound(module, size).value
    dense = _dense_norm(module, shape)
    assert dense <= bound * (1 + 1e-12)
    if exact:
        assert bound == pytest.approx(dense, rel=1e-10)


def test_elementwise_and_norm_blocks():
    torch.manual_seed(1)
    assert lipschitz_bound(ScaledReLU(0.4)).value == pytest.approx(0.4)
    assert lipschitz_bound(nn.LeakyReLU(0.1)).value == 1.0
    assert lipschitz_bound(nn.Sigmoid()).value == 0.25
    gn = MeanOnlyGroupNorm(2, 4, gamma_cap=1.0)
    with torch.no_grad():
        gn.weight.copy_(torch.tensor([3.0, -0.5, 0.2, 0.25]))
    assert lipschitz_bound(gn).value == 1.0
    assert lipschitz_bound(MeanOnlyGroupNorm(2, 4, affine=False)).value == 1.0
    assert lipschitz_bound(gn, mode="hyper").value == 1.0
    bn = nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))
        bn.weight.copy_(torch.tensor([1.0, -3.0, 0.5]))
    dense = _dense_norm(lambda x: bn(x) - bn(torch.zeros_like(x)), (3, 2, 2))
    assert lipschitz_bound(bn).value == pytest.approx(dense, rel=1e-10)  # a diagonal map: exact
    assert lipschitz_bound(bn, training=True).value == math.inf
    cert = lipschitz_bound(nn.GroupNorm(2, 4))
    assert cert.value == math.inf and "GroupNorm" in cert.reason
    assert lipschitz_bound(nn.Softmax(dim=1)).reason.startswith("no Lipschitz rule for Softmax")


@pytest.mark.parametrize("rescale", [False, True])
def test_dropout_factor_per_mode(rescale):
    drop = VariationalDropout2d(0.25, rescale=rescale)
    assert lipschitz_bound(drop, training=True).value == pytest.approx(1 / 0.75 if rescale else 1.0)
    assert lipschitz_bound(drop, training=False).value == pytest.approx(1.0 if rescale else 0.75)
    assert lipschitz_bound(drop, training=False, mode="hyper").value == 1.0  # hyper covers training too
    assert lipschitz_bound(nn.Dropout(0.5), training=True).value == pytest.approx(2.0)


def test_capped_conv_knows_its_input_size_and_plain_conv_needs_one():
    torch.manual_seed(2)
    conv = apply_operator_norm_cap(nn.Conv2d(3, 5, 3, padding=1, bias=False), 1.5, (6, 6))
    cert = lipschitz_bound(conv)
    assert cert.value == pytest.approx(conv_operator_norm(conv.weight.detach(), (6, 6)), rel=1e-12)
    assert cert.value <= 1.5 * (1 + 1e-6)
    assert lipschitz_bound(conv, mode="hyper").value == 1.5
    assert lipschitz_bound(nn.Conv2d(3, 5, 3, padding=1), mode="hyper").value == math.inf
    with pytest.raises(CertificateError, match="input_size"):
        lipschitz_bound(nn.Conv2d(3, 5, 3, padding=1))


def test_containers_forward_and_bound():
    torch.manual_seed(3)
    a, b = nn.Conv2d(2, 2, 3, padding=1, bias=False).double(), nn.Conv2d(2, 2, 1, bias=False).double()
    m = Mix([a, b], [0.7, -0.2])
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), 0.7 * a(x) - 0.2 * b(x))
    na, nb = conv_operator_norm(a.weight, (5, 5)), conv_operator_norm(b.weight, (5, 5))
    assert m.lipschitz_bound((5, 5)).value == pytest.approx(0.7 * na + 0.2 * nb, rel=1e-12)
    assert _dense_norm(m, (2, 5, 5)) <= m.lipschitz_bound((5, 5)).value * (1 + 1e-12)
    r = convex_residual(a, 0.3)
    torch.testing.assert_close(r(x), 0.7 * x + 0.3 * a(x))
    assert r.lipschitz_bound((5, 5)).value == pytest.approx(0.7 + 0.3 * na, rel=1e-12)
    up = LipschitzSequential(b, nn.Upsample(scale_factor=2))
    bm = BlockMatrix([[a, up], [None, b]])
    xs = [torch.randn(1, 2, 10, 10, dtype=torch.float64), torch.randn(1, 2, 5, 5, dtype=torch.float64)]
    ys = bm(xs)
    torch.testing.assert_close(ys[0], a(xs[0]) + up(xs[1]))
    torch.testing.assert_close(ys[1], b(xs[1]))
    cert = bm.lipschitz_bound([(10, 10), (5, 5)])
    na10 = conv_operator_norm(a.weight, (10, 10))
    expected = np.linalg.norm(np.array([[na10, 2 * nb], [0.0, nb]]), 2)
    assert cert.value == pytest.approx(expected, rel=1e-10)
    n0, n1 = 2 * 100, 2 * 25
    flat = lambda v: torch.cat([t.flatten(1) for t in bm([v[:, :n0].reshape(-1, 2, 10, 10),  # noqa: E731
                                                          v[:, n0:].reshape(-1, 2, 5, 5)])], 1)
    assert _dense_norm(flat, (n0 + n1,)) <= cert.value * (1 + 1e-12)
    with pytest.raises(ValueError, match="coefficient"):
        Mix([a], [0.5, 0.5])


def test_composed_module_bound_is_above_float64_empirical_estimates():
    torch.manual_seed(4)
    c, s = 4, 6
    gn1, gn2 = MeanOnlyGroupNorm(2, 8), MeanOnlyGroupNorm(2, c)
    with torch.no_grad():
        for g in (gn1, gn2):
            g.weight.uniform_(-1.2, 1.2)
            g.bias.normal_()
    block = LipschitzSequential(nn.Conv2d(c, 8, 3, padding=1, bias=False), gn1, ScaledReLU(0.8),
                                nn.Conv2d(8, c, 3, padding=1, bias=False), VariationalDropout2d(0.2, False), gn2)
    net = LipschitzSequential(convex_residual(block, 0.6), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 1, bias=False),
                              MeanOnlyGroupNorm(1, c), nn.AvgPool2d(2), nn.Upsample(scale_factor=2)).double().eval()
    cert = net.lipschitz_bound((s, s))
    plain = net.lipschitz_bound((s, s), tighten=False)
    assert cert.value <= plain.value * (1 + 1e-12)
    f = lambda z: net(z.view(-1, c, s, s)).flatten(1)  # noqa: E731
    x = torch.randn(6, c * s * s, dtype=torch.float64)
    emp = empirical_lipschitz(f, x, iters=40, ascent_steps=40, generator=torch.Generator().manual_seed(0))
    assert 0 < emp.value <= cert.value
