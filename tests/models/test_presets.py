"""Presets: layout, parameter counts of the reference code, hyperparameter certificates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lipdeq.models import NotAContractionError, create_model, list_models, model_config

# Parameter counts of the executed reference code (total, in f).
REFERENCE_COUNTS = {"tiny": (158_890, 111_696), "large": (11_097_438, 8_715_232)}


@pytest.mark.parametrize("name", ["mdeq_tiny", "lipmdeq_tiny", "mdeq_large", "mdeq_large_reg", "lipmdeq_large"])
def test_parameter_counts_match_reference_code(name):
    model = create_model(name)
    total, in_f = REFERENCE_COUNTS["tiny" if name.endswith("tiny") else "large"]
    assert model.num_parameters() == total
    assert model.num_parameters("f") == in_f


def test_registry_lists_every_preset():
    assert set(list_models()) == {"mdeq_tiny", "mdeq_large", "mdeq_large_reg", "lipmdeq_tiny", "lipmdeq_large",
                                  "lipmdeq_tiny_robust"}
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        create_model("resnet")
    with pytest.raises(ValueError, match="unknown model option"):
        create_model("lipmdeq_tiny", dropuot=0.1)
    with pytest.raises(ValueError, match="dropout"):
        create_model("lipmdeq_tiny", dropout="high")


def _hyper_bound_by_hand(n: int, s=0.4, alpha=0.5, beta=0.3, L=2.0, g=1.0) -> float:
    """docs/MATH.md section 3 evaluated independently with numpy: every conv at L, every gamma at g."""
    block = g * s * ((1 - alpha) + alpha * g**2 * s * L * L)
    post = s * L
    M = np.zeros((n, n))
    for i in range(n):
        logits = np.array([-(j - i) if j > i else 0.0 for j in range(n) if j != i])
        w = np.exp(logits) / np.exp(logits).sum()
        others = [j for j in range(n) if j != i]
        for j in range(n):
            if j == i:
                m = 1 - beta
            else:
                t = 2 ** (j - i) * L * g if j > i else L ** (i - j) * g ** (i - j) * s ** (i - j - 1)
                m = beta * w[others.index(j)] * t
            M[i, j] = post * m * block
    return float(np.linalg.norm(M, 2))


@pytest.mark.parametrize("name,branches", [("lipmdeq_tiny", 2), ("lipmdeq_large", 4)])
def test_hyperparameter_bound_matches_independent_arithmetic(name, branches):
    cfg = model_config(name)
    model = create_model(name, channels=[8] * branches, head_channels=[4] * branches, num_groups=4)
    assert cfg.num_branches == branches
    bound = model.lipschitz_bound(mode="hyper").value
    assert bound == pytest.approx(_hyper_bound_by_hand(branches), rel=1e-12)
    assert bound < 1.0


def test_known_figures_of_the_design_brief():
    # The design brief: about 0.69 for the tiny widths, about 0.73 for the large ones (every conv at its cap).
    assert _hyper_bound_by_hand(2) == pytest.approx(0.69, abs=0.005)
    assert _hyper_bound_by_hand(4) == pytest.approx(0.73, abs=0.005)


def test_baseline_has_no_finite_certificate_and_strict_raises():
    model = create_model("mdeq_tiny", channels=[8, 8], head_channels=[4, 4], num_groups=4)
    cert = model.lipschitz_bound()
    assert math.isinf(cert.value) and "GroupNorm" in cert.reason
    with pytest.raises(NotAContractionError, match="not below 1"):
        model.lipschitz_bound(strict=True)


def test_strict_hyper_bound_rejects_non_contractive_hyperparameters():
    model = create_model("lipmdeq_tiny", channels=[8, 8], head_channels=[4, 4], num_groups=4, relu_slope=1.0)
    with pytest.raises(NotAContractionError):
        model.lipschitz_bound(mode="hyper", strict=True)
    ok = create_model("lipmdeq_tiny", channels=[8, 8], head_channels=[4, 4], num_groups=4)
    assert ok.lipschitz_bound(mode="hyper", strict=True).value < 1


def test_design_layout_of_presets():
    tiny, large, reg = model_config("lipmdeq_tiny"), model_config("lipmdeq_large"), model_config("mdeq_large_reg")
    assert tiny.channels == [24, 24] and tiny.head_channels == [8, 16] and tiny.final_channels == 200
    assert large.channels == [32, 64, 128, 256] and large.final_channels == 1680
    assert (reg.f_thres, reg.b_thres, reg.dropout) == (7, 8, 0.22)
    assert (large.relu_slope, large.alpha, large.beta, large.conv_cap, large.gn_cap) == (0.4, 0.5, 0.3, 2.0, 1.0)
    m = create_model("lipmdeq_large", channels=[8] * 4, head_channels=[4] * 4, num_groups=4)
    assert m.injection is not None  # the reference code injects through conv1x1+BN+ReLU with > 2 branches
    assert create_model("lipmdeq_tiny").injection is None
    assert torch.equal(m.layer.fusion_w.diagonal(), torch.zeros(4, dtype=torch.float64))
