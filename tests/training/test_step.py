"""``train_step``: its backward accumulates exactly the gradients a plain ``loss.backward()`` gives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from lipdeq.configs import load_config
from lipdeq.models import MultiscaleDEQ
from lipdeq.training.step import train_step
from lipdeq.training.trainer import build_optimizer

TINY = ["model.channels=[4,4]", "model.head_channels=[2,4]", "model.final_channels=8", "model.num_groups=2",
        "model.image_size=8", "train.batch_size=4", "train.pretrain_steps=0"]


@pytest.mark.parametrize("preset", ["lipmdeq_tiny", "mdeq_tiny"])
def test_parameter_gradients_equal_a_plain_backward(preset: str) -> None:
    """Oracle: the same forward (same seed, so the same dropout masks) and a plain ``loss.backward()``.
    The step restricts its backward to the parameters (so the graph step's input leaf gets no gradient)."""
    cfg = load_config(preset, TINY)
    torch.manual_seed(0)
    model = MultiscaleDEQ(cfg.model).train()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    opt = build_optimizer(model, cfg)
    opt.step = lambda *a, **k: None  # keep the gradients and the weights as they are
    torch.manual_seed(2)
    res = train_step(model, model, x, y, opt, cfg, pretrain=False, use_jac=False)
    assert res.finite
    torch.manual_seed(2)
    F.cross_entropy(ref(x), y).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in ref.named_parameters():
        if p.grad is None:
            assert grads[n] is None, n
        else:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads.values())
