"""The certificate really holds: empirical Lipschitz constants of f never exceed it."""

from __future__ import annotations

import math

import pytest
import torch

from lipdeq.gradients import jacobian_spectral_norm
from lipdeq.lipschitz import conv_operator_norm, effective_weight, find_operator_norm_cap, power_iteration_conv_norm
from lipdeq.models import MultiscaleDEQ
from lipdeq.solvers import solve


def _capped_convs(model: MultiscaleDEQ):
    for name, module in model.layer.named_modules():
        if isinstance(module, torch.nn.Conv2d) and find_operator_norm_cap(module) is not None:
            yield name, module


def _input_size(model: MultiscaleDEQ, name: str, conv: torch.nn.Conv2d) -> int:
    cap = find_operator_norm_cap(conv)
    return cap.input_size[0]


def _randomise(model: MultiscaleDEQ, std: float, gen: torch.Generator) -> None:
    """Large random weights (the caps then bind) and random gammas, some beyond the gamma cap."""
    with torch.no_grad():
        for p in model.layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if p.dim() == 1 else 0.0))


def _empirical_lipschitz(model: MultiscaleDEQ, x: torch.Tensor, gen: torch.Generator) -> float:
    """Max over: ||J|| at the fixed point and at random states (power iteration), and
    ||f(a) - f(b)|| / ||a - b|| over random pairs."""
    model.eval()
    with torch.no_grad(), model.cached_weights():
        f, z0 = model.fixed_point_problem(x)
        z_star = solve(f, z0, tol=1e-6, max_iter=100).value
        states = [z_star, torch.randn(z0.shape, generator=gen), 3 * torch.randn(z0.shape, generator=gen)]
        best = 0.0
        for z in states:
            best = max(best, float(jacobian_spectral_norm(f, z, n_iter=30, generator=gen).max()))
        for scale in (1e-3, 1.0, 10.0):
            a = torch.randn(z0.shape, generator=gen)
            b = a + scale * torch.randn(z0.shape, generator=gen)
            ratio = (f(a) - f(b)).norm(dim=1) / (a - b).norm(dim=1)
            best = max(best, float(ratio.max()))
    return best


def test_certificate_bounds_empirical_lipschitz_random_weights(small_lip_cfg):
    gen = torch.Generator().manual_seed(0)
    model = MultiscaleDEQ(small_lip_cfg)
    _randomise(model, 0.3, gen)
    cert = model.lipschitz_bound()
    emp = _empirical_lipschitz(model, torch.randn(3, 3, 16, 16, generator=gen), gen)
    assert 0 < emp <= cert.value < 1.0
    assert math.isfinite(cert.value) and cert.reason is None
    assert {"branch0.conv1", "branch1.block", "fuse0<-1", "fuse1<-0", "branch0.post"} <= set(cert.parts)


def test_certificate_bounds_a_non_contractive_lipschitz_layer(small_lip_cfg):
    # With s = 1 and large caps the bound exceeds 1; it must still bound the empirical constant.
    cfg = small_lip_cfg.model_copy(update={"relu_slope": 1.0, "conv_cap": 4.0, "gn_cap": 2.0})
    gen = torch.Generator().manual_seed(1)
    model = MultiscaleDEQ(cfg)
    _randomise(model, 0.5, gen)
    cert = model.lipschitz_bound()
    emp = _empirical_lipschitz(model, torch.randn(2, 3, 16, 16, generator=gen), gen)
    assert cert.value > 1.0 and emp <= cert.value


def test_cap_holds_and_certificate_after_aggressive_training(small_lip_cfg):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    model = MultiscaleDEQ(small_lip_cfg)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.randn(8, 3, 16, 16, generator=gen)
    for _ in range(200):  # a large learning rate on a loss that pushes every weight towards its cap
        with model.cached_weights():
            f, z0 = model.fixed_point_problem(x)
            loss = -f(torch.randn(z0.shape, generator=gen)).norm()
        opt.zero_grad()
        loss.backward()
        opt.step()
    cap = small_lip_cfg.conv_cap
    norms = []
    for name, conv in _capped_convs(model):
        size = _input_size(model, name, conv)
        w = effective_weight(conv)
        fft = conv_operator_norm(w, (size, size), stride=conv.stride[0])
        power = power_iteration_conv_norm(w, (size, size), stride=conv.stride[0], n_iter=200,
                                          generator=torch.Generator().manual_seed(0))
        assert power <= fft * (1 + 1e-9), name  # the FFT value is an upper bound ...
        assert fft <= power * 1.15, name  # ... and a close one
        assert fft <= cap * (1 + 2e-3), f"{name}: operator norm {fft} exceeds the cap {cap}"
        norms.append(fft)
    assert max(norms) > 0.5 * cap  # the training did push the weights towards the caps
    cert = model.lipschitz_bound()
    assert cert.value < 1.0
    emp = _empirical_lipschitz(model, x[:3], gen)
    assert emp <= cert.value


@pytest.mark.parametrize("train_steps", [0, 30])
def test_lipschitz_model_converges_within_a_priori_bound(small_lip_cfg, train_steps):
    torch.manual_seed(0)
    cfg = small_lip_cfg.model_copy(update={"solver": "picard", "budget": "residual", "stop_mode": "abs",
                                            "f_tol": 1e-5, "b_tol": 1e-5, "f_thres": 200, "b_thres": 200,
                                            "dropout": 0.0})
    model = MultiscaleDEQ(cfg)
    x = torch.randn(4, 3, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(train_steps):
        opt.zero_grad()
        model(x).logsumexp(1).sum().backward()
        opt.step()
    model.eval()
    L = model.lipschitz_bound(strict=True).value
    logits = model(x.requires_grad_())
    sol = model.last_solution
    with torch.no_grad(), model.cached_weights():
        f, z0 = model.fixed_point_problem(x)
        first_step = (f(z0) - z0).norm(dim=1)
    # Picard: ||z_k - z*|| <= L^k / (1 - L) ||z_1 - z_0||, and the residual ||f(z_k) - z_k|| <= L^k ||z_1 - z_0||.
    bound = torch.ceil(torch.log(cfg.f_tol / first_step) / math.log(L)).clamp_min(1)
    assert sol.all_converged and (sol.nstep <= bound + 1).all()
    logits.sum().backward()
    assert sol.backward.all_converged and (sol.backward.nstep <= cfg.b_thres).all()
    assert sol.error_bound is not None and (sol.error_bound <= L / (1 - L) * cfg.f_tol * 1.0001).all()
