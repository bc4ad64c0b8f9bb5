"""The operator-norm cap: it constrains the weight the forward uses, once per cached forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from lipdeq.lipschitz import (
    OperatorNormCap,
    apply_operator_norm_cap,
    conv_operator_norm,
    effective_weight,
    find_operator_norm_cap,
)

from .reference_caps import apply_reference_cap


def pre_cap_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight-norm output (before the cap), from g and v."""
    plist = conv.parametrizations.weight
    return plist[0](plist.original0, plist.original1).detach()


@pytest.mark.parametrize("stride", [1, 2])
def test_cap_holds_under_large_adam_steps_with_weight_norm(stride):
    torch.manual_seed(0)
    max_norm, size = 1.0, (8, 8)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=1, bias=False)
    weight_norm(conv)
    # 30 per-frequency power steps per forward: enough for the estimate to be within 1e-3 of the
    # exact norm after every lr-0.1 step (asserted below); a capped norm is then at most
    # max_norm / (1 - 1e-3).
    apply_operator_norm_cap(conv, max_norm, size, n_power_iterations=30)
    cap = find_operator_norm_cap(conv)
    opt = torch.optim.Adam(conv.parameters(), lr=0.1)
    x = torch.randn(2, 3, *size)
    raw_norms = []
    for _ in range(8):
        loss = -conv(x).square().mean()  # pushes the weight (and g) up
        opt.zero_grad()
        loss.backward()
        opt.step()
        w_eff = effective_weight(conv)  # training mode: runs the cap with fresh power steps
        raw = conv_operator_norm(pre_cap_weight(conv), size, stride=stride)
        raw_norms.append(raw)
        assert float(cap.last_sigma) <= raw * (1 + 1e-5)
        assert float(cap.last_sigma) >= raw * (1 - 1e-3)
        assert conv_operator_norm(w_eff, size, stride=stride) <= max_norm * (1 + 1e-3)
    assert max(raw_norms) > 1.3 * max_norm  # the cap was active, not vacuous


def test_rescaling_weight_data_is_undone_by_weight_norm():
    # docs/MATH.md section 6.1: with weight norm, conv.weight is recomputed from (g, v) at every forward.
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    weight_norm(conv)
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(50.0)
    before = conv_operator_norm(conv.weight.detach(), (8, 8))
    assert before > 2.0
    w = conv.weight
    w.data.mul_(1.0 / before)  # the "cap" of the existing implementation
    after = conv_operator_norm(conv.weight.detach(), (8, 8))
    assert after == pytest.approx(before, rel=1e-6)


@pytest.mark.parametrize("operator", ["fft", "circular", "zero_padded"])
def test_each_operator_mode_caps_its_operator(operator, oracles):
    # "fft" is the library's cap; "circular" and "zero_padded" are the grid power-iteration
    # references of tests/lipschitz/reference_caps.py.
    torch.manual_seed(2)
    size, max_norm = (6, 6), 1.5
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.mul_(20.0)
    if operator == "fft":
        apply_operator_norm_cap(conv, max_norm, size)
    else:
        apply_reference_cap(conv, max_norm, size, circular=operator == "circular", warmup_iterations=1000,
                            warmup_tol=1e-10)
    w = effective_weight(conv)
    real = oracles.norm(oracles.dense(lambda x: F.conv2d(x, w, stride=2, padding=1), (1, 2, *size)))
    cert = conv_operator_norm(w, size, stride=2)
    if operator == "zero_padded":
        assert real == pytest.approx(max_norm, rel=1e-3)
        assert conv.parametrizations.weight[-1].v.shape == (1, 2, *size)
    else:
        assert cert == pytest.approx(max_norm, rel=1e-3)
        assert real <= max_norm * (1 + 1e-3)


def test_cached_forward_evaluates_cap_once_and_advances_vectors_once():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    weight_norm(conv)
    apply_operator_norm_cap(conv, 0.5, (8, 8), n_power_iterations=2)
    cap = find_operator_norm_cap(conv)
    # Expected vectors: the same cap advanced by one call's power steps on the same weight.
    expected = copy.deepcopy(cap)
    expected.power_step(pre_cap_weight(conv), 2)
    calls = []
    handle = cap.register_forward_hook(lambda *args: calls.append(1))
    updates = cap.n_updates
    x = torch.randn(2, 3, 8, 8)
    with parametrize.cached():
        outs = [conv(x) for _ in range(5)]
    handle.remove()
    assert len(calls) == 1
    assert cap.n_updates == updates + 1
    torch.testing.assert_close(cap.v, expected.v, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(outs[0], o) for o in outs)
    # Without the cache, every call runs the parametrisation again.
    calls.clear()
    handle = cap.register_forward_hook(lambda *args: calls.append(1))
    for _ in range(3):
        conv(x)
    handle.remove()
    assert len(calls) == 3


def test_eval_mode_reuses_stored_vectors():
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
    apply_operator_norm_cap(conv, 0.1, (6, 6))
    cap = find_operator_norm_cap(conv)
    conv.eval()
    v0 = cap.v.clone()
    updates = cap.n_updates
    w1 = effective_weight(conv)
    w2 = effective_weight(conv)
    assert torch.equal(cap.v, v0) and cap.n_updates == updates
    assert torch.equal(w1, w2)


def test_state_dict_round_trip_and_dtype_move():
    torch.manual_seed(5)

    def make(seed: int) -> nn.Conv2d:
        torch.manual_seed(seed)
        conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        weight_norm(conv)
        return apply_operator_norm_cap(conv, 0.7, (8, 8))

    a, b = make(5), make(6)
    sd = a.state_dict()
    assert "parametrizations.weight.1.v" in sd
    b.load_state_dict(sd)
    a.eval()
    b.eval()
    torch.testing.assert_close(find_operator_norm_cap(b).v, find_operator_norm_cap(a).v)
    torch.testing.assert_close(effective_weight(b), effective_weight(a))
    a.double()
    assert find_operator_norm_cap(a).v.dtype == torch.float64
    assert a(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_cap_gradient_matches_finite_differences():
    torch.manual_seed(7)
    cap = OperatorNormCap(1.0, (5, 5), 2, 3, stride=2, padding=1, dtype=torch.float64)
    w = (3.0 * torch.randn(3, 2, 3, 3, dtype=torch.float64)).requires_grad_()
    cap.warm_up(w)
    cap.eval()  # fixed vectors: W -> W / max(1, sigma(W)) is a smooth function near w
    assert float(cap.sigma(w).detach()) > 1.0
    assert torch.autograd.gradcheck(cap, (w,), eps=1e-6, atol=1e-6)


def test_zero_weight_gives_finite_gradients():
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
    nn.init.zeros_(conv.weight)
    apply_operator_norm_cap(conv, 1.0, (6, 6))
    conv(torch.randn(1, 2, 6, 6)).sum().backward()
    assert torch.isfinite(conv.parametrizations.weight.original.grad).all()


def test_groups_and_dilation_and_bad_inputs():
    torch.manual_seed(8)
    conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False)
    with torch.no_grad():
        conv.weight.mul_(10.0)
    apply_operator_norm_cap(conv, 1.0, (7, 7))
    cert = conv_operator_norm(effective_weight(conv), (7, 7), padding=2, dilation=2, groups=2)
    assert cert == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="already"):
        apply_operator_norm_cap(conv, 1.0, (7, 7))
    with pytest.raises(ValueError, match="max_norm"):
        apply_operator_norm_cap(nn.Conv2d(2, 2, 3), -1.0, (7, 7))
    with pytest.raises(ValueError, match="padding_mode"):
        apply_operator_norm_cap(nn.Conv2d(2, 2, 3, padding_mode="reflect"), 1.0, (7, 7))
    with pytest.raises(TypeError, match="operator"):  # one operator only: there is no mode to choose
        apply_operator_norm_cap(nn.Conv2d(2, 2, 3), 1.0, (7, 7), operator="reshape")


@pytest.mark.parametrize("stride", [1, 2])
def test_one_by_one_conv_cap_is_matrix_norm_cap(stride):
    torch.manual_seed(9)
    conv = nn.Conv2d(6, 5, 1, stride=stride, bias=False)
    weight_norm(conv)
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(10.0)
    apply_operator_norm_cap(conv, 2.0, (8, 8))
    w = effective_weight(conv)
    assert float(torch.linalg.matrix_norm(w[:, :, 0, 0], ord=2)) == pytest.approx(2.0, rel=1e-5)
    assert conv_operator_norm(w, (8, 8), stride=stride) == pytest.approx(2.0, rel=1e-5)
