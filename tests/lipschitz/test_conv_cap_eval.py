"""The cap in eval mode: never stale after an in-place weight change, computed once while unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from lipdeq.lipschitz import apply_operator_norm_cap, conv_operator_norm, effective_weight, find_operator_norm_cap


def _capped(stride: int = 1, max_norm: float = 2.0, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, bias=False).double()
    weight_norm(conv)
    return apply_operator_norm_cap(conv, max_norm, (8, 8))


def _forward_norm(conv: nn.Conv2d) -> float:
    cap = find_operator_norm_cap(conv)
    return conv_operator_norm(effective_weight(conv), cap.input_size, stride=cap.stride, padding=cap.padding)


@pytest.mark.parametrize("stride", [1, 2])
def test_in_place_edit_in_eval_mode_is_capped(stride):
    """The issue's case: a weight edited in place in eval mode (here x5, far above the cap) must not
    run with the norm of the old vectors' estimate: the forward's weight is at most the cap."""
    conv = _capped(stride)
    cap = find_operator_norm_cap(conv)
    conv.train()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for _ in range(3):
        conv(x)
    conv.eval()
    conv(x)
    v_train, updates = cap.v.clone(), cap.n_updates
    with torch.no_grad():
        direction = conv.parametrizations.weight.original1
        g = torch.Generator().manual_seed(1)
        direction.add_(torch.randn(direction.shape, generator=g, dtype=direction.dtype))  # a new direction
        conv.parametrizations.weight.original0.mul_(5.0)  # and five times the gain
    assert _forward_norm(conv) <= 2.0 * (1 + 1e-9)
    assert _forward_norm(conv) >= 2.0 * (1 - 1e-9)  # the edited weight is above the cap: capped to it
    # the training state is untouched: evaluating changes nothing of a training run
    assert torch.equal(cap.v, v_train) and cap.n_updates == updates


def test_stale_vectors_would_have_underestimated():
    """The oracle side of the test above: the stored training vectors, used on the edited weight,
    give a sigma below its exact norm (so a cap that reused them would let the weight through)."""
    conv = _capped(seed=3)
    cap = find_operator_norm_cap(conv)
    with torch.no_grad():
        conv.parametrizations.weight.original1.copy_(torch.randn_like(conv.parametrizations.weight.original1))
        conv.parametrizations.weight.original0.mul_(5.0)
        plist = conv.parametrizations.weight
        pre = plist[0](plist.original0, plist.original1)
        stale = float(cap.sigma(pre))
    exact = conv_operator_norm(pre, (8, 8), padding=(1, 1))
    assert stale < exact * (1 - 1e-3)
    conv.eval()
    assert _forward_norm(conv) <= 2.0 * (1 + 1e-9)


def test_eval_reuses_the_capped_weight_while_unchanged(monkeypatch):
    conv = _capped(seed=5)
    cap = find_operator_norm_cap(conv)
    conv.eval()
    calls = []
    blocks = cap._blocks
    monkeypatch.setattr(cap, "_blocks", lambda w: calls.append(1) or blocks(w))
    with torch.no_grad():
        w1 = conv.weight
        w2 = conv.weight
    assert torch.equal(w1, w2) and len(calls) == 1  # one DFT of the weight, then reuse
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(0.5)
        w3 = conv.weight
    assert len(calls) == 2 and not torch.equal(w3, w1)


def test_eval_with_grad_gives_the_same_weight_and_a_gradient():
    conv = _capped(seed=7)
    conv.eval()
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(4.0)
        w_nograd = conv.weight.clone()
    w = conv.weight
    assert w.requires_grad
    torch.testing.assert_close(w.detach(), w_nograd, rtol=1e-12, atol=1e-14)
    w.square().sum().backward()
    g = conv.parametrizations.weight.original1.grad
    assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
