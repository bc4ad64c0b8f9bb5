"""Model behaviour: smoke over every preset, gradients, statistics, input checks, eval independence."""

from __future__ import annotations

import pytest
import torch

from lipdeq.models import MultiscaleDEQ, create_model, list_models
from lipdeq.solvers import Status

SMALL = dict(channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4)


@pytest.mark.parametrize("name", list_models())
def test_smoke_forward_backward_eval_every_registered_model(name):
    branches = 4 if "large" in name else 2
    model = create_model(name, channels=[8] * branches, head_channels=[4] * branches, final_channels=16,
                         num_groups=4, f_thres=6, b_thres=6)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    assert all(p.grad.abs().sum() > 0 for p in model.layer.parameters())
    stats = model.solver_stats()
    assert {"forward_nstep_mean", "backward_nstep_mean", "forward_rel_residual_max"} <= set(stats)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_default_tiny_presets_run_at_full_width():
    for name in ("lipmdeq_tiny", "mdeq_tiny"):
        model = create_model(name)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert model.last_solution.backward is not None


def test_eval_mode_sample_does_not_depend_on_its_batch(small_lip_cfg, small_mdeq_cfg):
    for cfg in (small_lip_cfg, small_mdeq_cfg):
        model = MultiscaleDEQ(cfg)
        model(torch.randn(8, 3, 16, 16))  # move the BatchNorm statistics away from their init
        model.eval()
        x = torch.randn(5, 3, 16, 16)
        with torch.no_grad():
            together = model(x)
            alone = torch.cat([model(x[i : i + 1]) for i in range(5)])
            shuffled = model(x.flip(0)).flip(0)
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together, shuffled, rtol=1e-4, atol=1e-5)


def test_lipschitz_eval_reports_certified_error_bounds(small_lip_cfg):
    model = MultiscaleDEQ(small_lip_cfg).eval()
    with torch.no_grad():
        model(torch.randn(3, 3, 16, 16))
    sol = model.last_solution
    assert sol.error_bound is not None and sol.error_bound.shape == (3,)
    assert sol.statuses() == [Status.CONVERGED] * 3
    assert "forward_error_bound_max" in model.solver_stats()


def test_dropout_mask_is_fixed_across_solver_iterations(small_lip_cfg):
    model = MultiscaleDEQ(small_lip_cfg.model_copy(update={"dropout": 0.5})).train()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), model.cached_weights():
        f, z0 = model.fixed_point_problem(x)
        z = torch.randn(z0.shape)
        first = f(z)
        torch.testing.assert_close(f(z), first, rtol=0, atol=0)  # same mask on every call
        f2, _ = model.fixed_point_problem(x)  # a new batch draws a new mask
        assert not torch.equal(f2(z), first)


def test_pretraining_mode_and_jacobian_penalty(small_mdeq_cfg):
    model = MultiscaleDEQ(small_mdeq_cfg)
    x = torch.randn(2, 3, 16, 16)
    out = model(x, unrolled=True)
    assert model.last_solution is None
    out.sum().backward()
    assert all(p.grad is not None for p in model.layer.parameters())
    model.zero_grad()
    logits, jac = model(x, return_jac_loss=True)
    assert jac.dim() == 0 and jac > 0 and jac.requires_grad
    (logits.sum() + jac).backward()


@pytest.mark.parametrize(
    "x,message",
    [
        (torch.randn(2, 1, 16, 16), "expected 3 channels"),
        (torch.randn(3, 16, 16), "dimensions"),
        (torch.randn(2, 3, 8, 8), "16x16 images"),
        (torch.randint(0, 255, (2, 3, 16, 16)), "floating-point"),
        (torch.full((2, 3, 16, 16), float("nan")), "NaN or Inf"),
    ],
)
def test_bad_inputs_are_named(small_lip_cfg, x, message):
    with pytest.raises(ValueError, match=message):
        MultiscaleDEQ(small_lip_cfg)(x)


def test_input_gradients_in_eval_mode(small_lip_cfg):
    model = MultiscaleDEQ(small_lip_cfg).eval()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_autocast_keeps_the_solver_state_in_float32(small_lip_cfg):
    model = MultiscaleDEQ(small_lip_cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 16, 16))
    assert model.last_solution.value.dtype == torch.float32
    logits.float().sum().backward()
    assert model.last_solution.backward.all_converged
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.layer.parameters())
