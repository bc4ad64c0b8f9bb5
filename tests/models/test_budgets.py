"""Solver budgets from the certificate on the models: the running certificate, gradients, training."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lipdeq.models import create_model, model_config
from lipdeq.models.certify import layer_certificate
from lipdeq.models.mdeq import MultiscaleDEQ
from lipdeq.solvers import SolverWarning

SMALL = dict(channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4, image_size=8)


def _batch(n: int, size: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def test_running_certificate_is_never_below_the_exact_one():
    """Two hundred Adam steps at lr 0.05 (weights and gains move fast), refreshed every 40: at every
    step the running bound of the current weights is at least their exact FFT certificate
    (training-time map), and at a refresh it is the product form of the exact norms."""
    torch.manual_seed(0)
    model = MultiscaleDEQ(model_config("lipmdeq_tiny", **SMALL, certificate_refresh=40, conv_init_std=0.3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    ratios = []
    for step in range(200):
        x, y = _batch(8, 8, seed=step)
        with model.cached_weights():
            running = model.running_certificate(training=True)
            exact = layer_certificate(model.layer, training=True).value
            if running.refreshed:  # at a refresh: the product form of the exact norms
                product = layer_certificate(model.layer, training=True, tighten=False).value
                assert math.isclose(running.value, product, rel_tol=1e-12)
        assert running.value >= exact * (1 - 1e-12), (step, running.value, exact)
        ratios.append(running.value / exact)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert max(ratios) > 1.0 and math.isfinite(max(ratios))


def test_budgeted_adjoint_of_lipmdeq_tiny_is_within_its_bound():
    """lipmdeq_tiny in float64: the adjoint the certified budget uses (1e-3 tolerance) against the exact
    IFT adjoint (residual solves to 1e-12), per sample, within the reported certified bound."""
    torch.manual_seed(1)
    x, _ = _batch(3, 32, seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(3, 10, generator=g, dtype=torch.float64)

    def adjoint(**overrides):
        torch.manual_seed(1)
        model = create_model("lipmdeq_tiny", **overrides).double().eval()
        logits = model(x)
        (logits * weights).sum().backward()
        return model.last_solution

    budget = adjoint(budget="certified", f_tol=1e-12, b_tol=1e-3)
    exact = adjoint(budget="residual", f_tol=1e-12, b_tol=1e-12, f_thres=60, b_thres=60, stop_mode="abs")
    assert exact.all_converged and exact.backward.all_converged
    assert budget.backward.n_f_evals < exact.backward.n_f_evals and budget.extra_f_evals == 0
    w, w_star = budget.backward.value, exact.backward.value
    err = torch.linalg.vector_norm(w - w_star, dim=1)
    norm = torch.linalg.vector_norm(w_star, dim=1)
    # both forwards are solved to 1e-12: the Jacobians they differentiate differ by that much
    assert bool((err <= budget.backward.error_bound + 1e-9 * norm).all()), (err, budget.backward.error_bound)
    assert bool((budget.backward.error_bound <= 1e-3 * norm).all())


def test_solver_stats_count_the_work_done(small_lip_cfg, small_mdeq_cfg):
    x, y = _batch(4, 16, seed=3)
    for cfg, budget in ((small_lip_cfg, "certified"), (small_lip_cfg, "residual"), (small_mdeq_cfg, "residual")):
        model = MultiscaleDEQ(cfg.model_copy(update={"budget": budget})).train()
        F.cross_entropy(model(x), y).backward()
        stats, sol = model.solver_stats(), model.last_solution
        extra = 0 if budget == "certified" else 1  # the residual path re-evaluates f at z* with a graph
        assert stats["forward_f_evals"] == sol.n_f_evals + extra
        assert stats["backward_vjps"] == sol.backward.n_f_evals
        assert ("lipschitz" in stats) == cfg.is_lipschitz
        if budget == "certified":
            assert stats["forward_error_bound_max"] <= cfg.f_tol and stats["backward_error_bound_max"] < math.inf


def test_certified_budget_needs_a_certificate():
    with pytest.warns(SolverWarning, match="budget='certified' needs a certificate"):
        model = MultiscaleDEQ(model_config("mdeq_tiny", **SMALL, budget="certified"))
    assert model.budget == "residual"
    x, _ = _batch(2, 8, seed=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        model.eval()(x)
    assert model.last_solution.method == "anderson"
    with pytest.raises(ValueError, match="phantom"):
        model_config("lipmdeq_tiny", backward="phantom")


def test_a_certificate_above_one_falls_back_with_a_warning():
    model = MultiscaleDEQ(model_config("lipmdeq_tiny", **SMALL, conv_cap=50.0, conv_init_std=1.0)).train()
    x, y = _batch(4, 8, seed=4)
    with pytest.warns(SolverWarning, match="needs a Lipschitz constant below 1"):
        F.cross_entropy(model(x), y).backward()
    assert model.last_lipschitz >= 1.0 and model.last_solution.method == "anderson"


def _trajectory(budget: str, tol: float, steps: int = 12, mask_seed: int = 0) -> list[float]:
    torch.manual_seed(0)
    model = MultiscaleDEQ(model_config("lipmdeq_tiny", **SMALL, budget=budget, f_tol=tol, b_tol=tol,
                                       conv_init_std=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(mask_seed)  # the dropout masks
    losses = []
    for step in range(steps):
        x, y = _batch(16, 8, seed=100 + step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _first_gradient(budget: str, tol: float) -> torch.Tensor:
    torch.manual_seed(0)
    model = MultiscaleDEQ(model_config("lipmdeq_tiny", **SMALL, budget=budget, f_tol=tol, b_tol=tol,
                                       conv_init_std=0.1)).double()
    torch.manual_seed(0)
    x, y = _batch(16, 8, seed=100, dtype=torch.float64)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _gap(a: list[float], b: list[float]) -> float:
    return max(abs(u - v) for u, v in zip(a, b))


def test_training_with_and_without_budgets_follows_the_same_losses():
    """Twelve Adam steps from the same init, data and dropout masks. At tolerance 1e-3 the certified
    budget and residual checks differ by less than residual runs whose dropout masks differ (the
    run-to-run noise; measured: 0.026 against 0.038-0.052, Adam amplifies small gradient differences);
    at 1e-6 the two give the same gradient to 1e-5 (float64), so the difference comes from the
    tolerance (the certified budget stops where its bound says 1e-3, residual Anderson usually
    overshoots it), not from a different gradient. (Trajectories at 1e-6 are not compared: Adam
    divides by the gradient's running size, so float32 rounding in near-zero gradient entries
    already separates two runs of the same solver.)"""
    certified = _trajectory("certified", 1e-3)
    residual = _trajectory("residual", 1e-3)
    noise = min(_gap(residual, _trajectory("residual", 1e-3, mask_seed=k)) for k in (1, 2, 4))
    assert _gap(certified, residual) < noise, (_gap(certified, residual), noise)
    a, b = _first_gradient("certified", 1e-6), _first_gradient("residual", 1e-6)
    assert float((a - b).norm() / b.norm()) < 1e-5
    assert abs(certified[-1] - certified[0]) > 0.01  # the losses move


def test_running_certificate_refreshes_before_its_drift_raises_the_budget(monkeypatch):
    """With refreshes on the schedule pushed out of reach, Adam's steps make the running bound drift:
    the model refreshes exactly when the drifted value would buy more evaluations or adjoint terms than
    the value of the last refresh, so every step solves with the budget of a refreshed value. Without
    the early refresh (the plain running value) the drift raises the budget above the refreshed one."""
    from lipdeq.gradients.budgeted import budget_counts

    def run(adaptive: bool) -> tuple[int, int]:
        torch.manual_seed(0)
        cfg = model_config("lipmdeq_tiny", **SMALL, certificate_refresh=10_000, conv_init_std=0.05)
        model = MultiscaleDEQ(cfg)
        if not adaptive:
            monkeypatch.setattr(model, "_training_bound", lambda: model.running_certificate(training=True).value)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        model.train()
        raised = early = 0
        for step in range(12):
            x, y = _batch(4, 8, seed=step)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SolverWarning)
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            stats, running = model.solver_stats(), model.running_certificate
            budget = budget_counts(model.last_lipschitz, cfg.f_tol, cfg.b_tol)
            # the solve used that budget: its forward may stop early on the a-posteriori bound
            assert stats["forward_f_evals"] <= min(budget[0], cfg.f_thres)
            assert stats["backward_vjps"] == min(budget[1], cfg.b_thres)
            raised += any(b > r for b, r in zip(budget, budget_counts(running.reference, cfg.f_tol, cfg.b_tol)))
            early += step > 0 and running.age == 0
            opt.step()
            opt.zero_grad()
        return raised, early

    raised, early = run(adaptive=True)
    assert raised == 0 and early >= 1
    raised, early = run(adaptive=False)
    assert raised >= 1 and early == 0
