"""Certificate arithmetic against dense matrices and empirical Lipschitz constants of the real maps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipdeq.lipschitz import (
    LipschitzCertificate,
    MeanOnlyGroupNorm,
    ScaledReLU,
    block_matrix_bound,
    conv_operator_norm,
    downsample_fusion_bound,
    post_fusion_bound,
    residual_block_bound,
    upsample_fusion_bound,
)


def test_certificate_dataclass_json_round_trip():
    cert = LipschitzCertificate(value=math.inf, parts={"b1": 0.5, "fuse": math.inf}, matrix=[[0.5, math.inf]],
                                reason="standard GroupNorm", mode="eval")
    assert not cert.is_contraction
    text = json.dumps(cert.to_dict(), allow_nan=False)
    back = LipschitzCertificate.from_dict(json.loads(text))
    assert back.value == math.inf and back.parts["fuse"] == math.inf and back.matrix == [[0.5, math.inf]]
    assert LipschitzCertificate(value=0.7).is_contraction


def test_block_matrix_bound_matches_numpy_and_bounds_block_operators():
    rng = np.random.default_rng(0)
    m = rng.uniform(0, 2, size=(4, 4))
    assert block_matrix_bound(m.tolist()) == pytest.approx(np.linalg.norm(m, ord=2), rel=1e-12)
    assert block_matrix_bound(torch.tensor(m, dtype=torch.float32)) == pytest.approx(
        np.linalg.norm(m.astype(np.float32).astype(np.float64), ord=2), rel=1e-12)
    # Brute force: block operators with random blocks never exceed the bound of their block norms.
    dims = [3, 5, 2]
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        blocks = [[torch.randn(dims[i], dims[j], generator=g, dtype=torch.float64) for j in range(3)]
                  for i in range(3)]
        full = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
        norms = [[float(torch.linalg.matrix_norm(b, ord=2)) for b in row] for row in blocks]
        assert float(torch.linalg.matrix_norm(full, ord=2)) <= block_matrix_bound(norms) * (1 + 1e-12)
    # Scalar blocks: the bound is attained.
    s = torch.rand(3, 3, dtype=torch.float64)
    assert block_matrix_bound(s) == pytest.approx(float(torch.linalg.matrix_norm(s, ord=2)), rel=1e-12)
    assert block_matrix_bound([[1.0, math.inf], [0.0, 1.0]]) == math.inf
    with pytest.raises(ValueError, match="nonnegative"):
        block_matrix_bound([[1.0, -0.1], [0.0, 1.0]])
    with pytest.raises(ValueError, match="square"):
        block_matrix_bound([[1.0, 2.0]])


def _capped_gn(channels: int, groups: int, seed: int) -> MeanOnlyGroupNorm:
    torch.manual_seed(seed)
    gn = MeanOnlyGroupNorm(groups, channels, gamma_cap=1.0).double()
    with torch.no_grad():
        gn.weight.uniform_(-1.5, 1.5)  # some above the cap: the clamp must hold
        gn.bias.normal_()
    return gn


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_residual_block_bound_dominates_empirical_lipschitz(alpha, oracles):
    torch.manual_seed(1)
    s, c, mid, n = 0.9, 4, 6, 5
    w1 = 0.6 * torch.randn(mid, c, 3, 3, dtype=torch.float64)
    w2 = 0.6 * torch.randn(c, mid, 3, 3, dtype=torch.float64)
    n1, n2, n3 = _capped_gn(mid, 2, 2), _capped_gn(c, 2, 3), _capped_gn(c, 2, 4)
    act = ScaledReLU(s)
    u = torch.randn(1, c, n, n, dtype=torch.float64)  # injection: broadcast over the batch

    def block(z: torch.Tensor) -> torch.Tensor:
        h1 = act(n1(F.conv2d(z, w1, padding=1)))
        h2 = n2(F.conv2d(h1, w2, padding=1) + u)
        return n3(act((1 - alpha) * z + alpha * h2))

    gn = max(n1.lipschitz_constant(), n2.lipschitz_constant(), n3.lipschitz_constant())
    bound = residual_block_bound(s, alpha, gn, conv_operator_norm(w1, (n, n)), conv_operator_norm(w2, (n, n)))
    assert bound == pytest.approx(gn * s * ((1 - alpha) + alpha * gn**2 * s * conv_operator_norm(w1, (n, n))
                                            * conv_operator_norm(w2, (n, n))))
    emp = oracles.empirical(block, (1, c, n, n))
    assert emp <= bound * (1 + 1e-9)
    if alpha == 0.0:
        assert emp >= 0.9 * bound  # b = N3(s relu(z)): the bound gn*s is nearly attained


def test_upsample_is_exactly_r_and_fusion_bound_holds(oracles):
    for r in (2, 4):
        dense = oracles.dense(lambda x, r=r: F.interpolate(x, scale_factor=r, mode="nearest"), (1, 2, 3, 3))
        assert oracles.norm(dense) == pytest.approx(r, rel=1e-12)
    torch.manual_seed(5)
    w = torch.randn(4, 6, 1, 1, dtype=torch.float64)
    gn = _capped_gn(4, 2, 6)
    for level_diff in (1, 2):
        def path(z: torch.Tensor, k=level_diff) -> torch.Tensor:
            return F.interpolate(gn(F.conv2d(z, w)), scale_factor=2**k, mode="nearest")

        bound = upsample_fusion_bound(conv_operator_norm(w, (4, 4)), gn.lipschitz_constant(), level_diff)
        assert bound == pytest.approx(2**level_diff * conv_operator_norm(w, (4, 4)) * gn.lipschitz_constant())
        emp = oracles.empirical(path, (1, 6, 4, 4))
        assert emp <= bound * (1 + 1e-9)


@pytest.mark.parametrize("stages", [1, 2])
def test_downsample_fusion_bound_dominates_empirical_lipschitz(stages, oracles):
    torch.manual_seed(7 + stages)
    s, n = 0.8, 8
    chans = [3, 4, 5][: stages + 1]
    ws = [torch.randn(chans[i + 1], chans[i], 3, 3, dtype=torch.float64) for i in range(stages)]
    gns = [_capped_gn(chans[i + 1], 1, 10 + i) for i in range(stages)]
    act = ScaledReLU(s)

    def path(z: torch.Tensor) -> torch.Tensor:
        for i in range(stages):
            if i > 0:
                z = act(z)
            z = gns[i](F.conv2d(z, ws[i], stride=2, padding=1))
        return z

    norms = [conv_operator_norm(ws[i], (n // 2**i, n // 2**i), stride=2) for i in range(stages)]
    gn = max(g.lipschitz_constant() for g in gns)
    bound = downsample_fusion_bound(norms, gn, s)
    assert bound == pytest.approx(math.prod(norms) * gn**stages * s ** (stages - 1))
    assert oracles.empirical(path, (1, 3, n, n)) <= bound * (1 + 1e-9)


def test_post_fusion_bound_and_input_checks(oracles):
    torch.manual_seed(11)
    w = torch.randn(4, 4, 1, 1, dtype=torch.float64)
    gn = MeanOnlyGroupNorm(2, 4, affine=False).double()
    act = ScaledReLU(0.4)
    bound = post_fusion_bound(0.4, conv_operator_norm(w, (4, 4)))
    emp = oracles.empirical(lambda y: gn(F.conv2d(act(y), w)), (1, 4, 4, 4))
    assert emp <= bound * (1 + 1e-9)
    with pytest.raises(ValueError, match="conv_norms"):
        downsample_fusion_bound([], 1.0, 0.4)
    with pytest.raises(ValueError, match="gn"):
        residual_block_bound(0.4, 0.5, -1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="level_diff"):
        upsample_fusion_bound(1.0, 1.0, -1)
