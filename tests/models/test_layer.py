"""The layer's fused norm/ReLU passes against the plain composition of its modules."""

from __future__ import annotations

import pytest
import torch

from lipdeq.models import layer as layer_module
from lipdeq.models import model_config
from lipdeq.models.layer import MultiscaleLayer

from .conftest import SMALL


def _plain_norm_act(norm, act, x):
    return act(norm(x))


def _plain_act_norm(act, norm, x, conv=None):
    return norm(act(x) if conv is None else conv(act(x)))


def _run(layer: MultiscaleLayer, seed: int) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    zs = [torch.randn(3, c, s, s, generator=gen, dtype=torch.float64, requires_grad=True)
          for c, s, _ in layer.shapes]
    inj = torch.randn(3, *layer.shapes[0], generator=gen, dtype=torch.float64)
    layer.reset_dropout(zs, generator=torch.Generator().manual_seed(seed + 1))
    out = layer(zs, inj)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in out]
    loss = sum((o * w).sum() for o, w in zip(out, weights))
    return [o.detach() for o in out], torch.autograd.grad(loss, [*zs, *layer.parameters()])


@pytest.mark.parametrize("preset", ["lipmdeq_tiny", "mdeq_tiny"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("branches", [2, 3])  # 3: a two-stage downsampling fuse with a ReLU between
def test_fused_layer_equals_the_plain_composition(monkeypatch, preset, training, branches):
    cfg = model_config(preset, **{**SMALL, "channels": [8] * branches, "head_channels": [4] * branches})
    torch.manual_seed(0)
    layer = MultiscaleLayer(cfg).double().train(training)
    with torch.no_grad():  # move off the 0.01-std initialisation so that every ReLU and clamp is active
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = {k: v.clone() for k, v in layer.state_dict().items()}  # training moves the caps' power iteration
    fused_out, fused_grads = _run(layer, seed=5)
    layer.load_state_dict(state)
    monkeypatch.setattr(layer_module, "norm_act", _plain_norm_act)
    monkeypatch.setattr(layer_module, "act_norm", _plain_act_norm)
    plain_out, plain_grads = _run(layer, seed=5)
    for a, b in zip(fused_out, plain_out):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def _conv1_calls(model) -> list[int]:
    calls: list[int] = []
    for blk in model.layer.branches:
        blk.conv1.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("preset", ["lipmdeq_tiny", "mdeq_tiny"])
@pytest.mark.parametrize("training", [True, False])
def test_first_evaluation_at_z0_skips_the_first_convs_and_changes_nothing(preset, training):
    """f(z0) skips each block's first conv; the value equals f at an equal zero state held elsewhere."""
    from lipdeq.models import MultiscaleDEQ
    from lipdeq.models.compiled import layer_step

    torch.manual_seed(0)
    model = MultiscaleDEQ(model_config(preset, **SMALL)).double().train(training)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    calls = _conv1_calls(model)
    with model.cached_weights(), torch.no_grad():
        f, z0 = model.fixed_point_problem(x, generator=torch.Generator().manual_seed(1))
        fast = f(z0)
        assert not calls  # skipped in every branch
        u = model.injection_of(x)
        plain = layer_step(model.layer, torch.zeros_like(z0), u)
        assert len(calls) == len(model.layer.branches)
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-15)
        f(z0.detach().view_as(z0))  # an alias of z0: skipped as well
        assert len(calls) == len(model.layer.branches)
        z0.add_(0.5)  # written in place: no longer zero, the convs run
        torch.testing.assert_close(f(z0), layer_step(model.layer, z0.clone(), u), rtol=0, atol=1e-15)
        assert len(calls) == 3 * len(model.layer.branches)  # f(z0) and the reference


def test_no_skip_when_the_state_carries_a_graph_or_a_weight_is_not_finite():
    from lipdeq.models import MultiscaleDEQ

    torch.manual_seed(0)
    model = MultiscaleDEQ(model_config("lipmdeq_tiny", **SMALL)).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    calls = _conv1_calls(model)
    f, z0 = model.fixed_point_problem(x)
    z = z0.detach().requires_grad_()  # the certified budget's K = 1 graph step: J^T needs the first convs
    cotangent = torch.randn(z0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (vjp,) = torch.autograd.grad(f(z), z, cotangent)
    assert len(calls) == len(model.layer.branches)
    z_elsewhere = torch.zeros_like(z0).requires_grad_()
    (expected,) = torch.autograd.grad(f(z_elsewhere), z_elsewhere, cotangent)
    torch.testing.assert_close(vjp, expected, rtol=0, atol=1e-14)
    assert vjp.abs().sum() > 0
    with torch.no_grad():
        model.layer.branches[0].conv1.parametrizations.weight.original0.fill_(float("nan"))
        f, z0 = model.fixed_point_problem(x)
        assert torch.isnan(f(z0)).any()  # the NaN weight shows at once, not one evaluation later


def test_inference_mode_evaluates_without_the_skip():
    """Inference tensors have no version counter: f(z0) runs the convs and gives the same value."""
    from lipdeq.models import MultiscaleDEQ

    torch.manual_seed(0)
    model = MultiscaleDEQ(model_config("lipmdeq_tiny", **SMALL)).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    calls = _conv1_calls(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    assert calls
