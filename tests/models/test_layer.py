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
