"""Tiny classifiers for the whole-network bound and certified-robustness tests (float64, seconds)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lipdeq.data import load_dataset
from lipdeq.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from lipdeq.lipschitz import MeanOnlyGroupNorm, OperatorNormCap
from lipdeq.models import MultiscaleDEQ, model_config
from lipdeq.models.config import ModelConfig

TINY = dict(channels=[8, 8], head_channels=[2, 2], final_channels=8, num_groups=4, expansion=2, dropout=0.0)
ROBUST = dict(explicit_norm="mean_only", explicit_cap=1.0)
# The empirical side solves to round-off: every estimate is then one of the true equilibrium map.
TIGHT = dict(f_tol=1e-9, b_tol=1e-9, f_thres=100, b_thres=100, stop_mode="abs")


def tiny_cfg(image_size: int = 8, **kw) -> ModelConfig:
    return model_config("lipmdeq_tiny", **{**TINY, "image_size": image_size, **kw})


def randomise(model: MultiscaleDEQ, generator: torch.Generator) -> MultiscaleDEQ:
    """Random weights of a working network: conv and linear weights N(0, 2 / fan_in) (weight norm:
    directions N(0, 1), gains in [0.5, 1.5]; the caps still apply), biases N(0, 0.1^2), norm gains in
    [0.5, 1.5], BatchNorm statistics: means N(0, 0.1^2), variances in [0.05, 2]."""

    def fill(t: torch.Tensor, kind: str) -> None:
        if kind == "gain":
            t.copy_(0.5 + torch.rand(t.shape, generator=generator, dtype=t.dtype))
        else:
            std = 0.1 if kind == "bias" else (2.0 / max(t[0].numel(), 1)) ** 0.5
            t.copy_(std * torch.randn(t.shape, generator=generator, dtype=t.dtype))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                if parametrize.is_parametrized(m, "weight"):
                    orig = m.parametrizations.weight
                    if hasattr(orig, "original0"):  # weight norm: (g, v)
                        fill(orig.original0, "gain")
                        fill(orig.original1, "weight")
                    else:
                        fill(orig.original, "weight")
                else:
                    fill(m.weight, "weight")
                if m.bias is not None:
                    fill(m.bias, "bias")
            elif isinstance(m, nn.BatchNorm2d | MeanOnlyGroupNorm | nn.GroupNorm) and m.weight is not None:
                fill(m.weight, "gain")
                fill(m.bias, "bias")
            if isinstance(m, nn.BatchNorm2d):
                fill(m.running_mean, "bias")
                m.running_var.copy_(0.05 + 1.95 * torch.rand(m.running_var.shape, generator=generator,
                                                               dtype=m.running_var.dtype))
        _warm_caps(model)
    return model


def _warm_caps(model: nn.Module) -> None:
    """Set every operator-norm cap's vectors to the exact top singular vectors of the new weights
    (as at registration), so that the caps hold for the random weights from the first forward."""
    for m in model.modules():
        if not parametrize.is_parametrized(m, "weight"):
            continue
        chain = m.parametrizations.weight
        if hasattr(chain, "original0"):
            w, rest = chain[0](chain.original0, chain.original1), list(chain)[1:]
        else:
            w, rest = chain.original, list(chain)
        for p in rest:
            if isinstance(p, OperatorNormCap):
                p.warm_up(w)
            elif isinstance(getattr(p, "cap", None), OperatorNormCap):
                p.cap.warm_up(w[:, :, None, None])
            w = p(w)


def frozen_copy(model: MultiscaleDEQ, **overrides) -> MultiscaleDEQ:
    """The same eval-mode network (same effective weights) without parametrisations, with solver
    ``overrides``: the map the empirical estimates and attacks run on."""
    model.eval()
    twin = MultiscaleDEQ(model.cfg.model_copy(update=overrides)).to(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    twin.eval()
    for m in list(twin.modules()):
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    for a, b in zip(_weights(model), _weights(twin)):
        assert torch.equal(a, b)
    return twin


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def pixel_stats(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(CIFAR10_MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=dtype).view(1, 3, 1, 1)
    return mean, std


def pixel_map(model: MultiscaleDEQ):
    """x in pixel units ([0, 1] images) -> logits, through lipdeq's normalisation."""
    mean, std = pixel_stats(next(model.parameters()).dtype)
    return lambda p: model((p - mean) / std)


def train_briefly(model: MultiscaleDEQ, images: torch.Tensor, labels: torch.Tensor, *, steps: int, lr: float,
                  batch_size: int | None = None) -> float:
    """``steps`` Adam steps on pixel images, cycling through them ``batch_size`` at a time (default:
    all at once); returns the last loss. The model is left in eval mode."""
    mean, std = pixel_stats(images.dtype)
    x = (images - mean) / std
    bs = batch_size or x.shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        rows = torch.arange(step * bs, (step + 1) * bs) % x.shape[0]
        loss = F.cross_entropy(model(x[rows]), labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


@functools.cache
def trained_robust_model() -> MultiscaleDEQ:
    """A tiny robust model (8x8 inputs) after 150 Adam steps at learning rate 0.05 (50 times the
    presets') fitting random labels of 8 random images, float32, returned in float64, eval mode: the
    caps and gain clamps active and f's weights at their caps. Shared by the tests of one session
    (call :func:`frozen_copy` before solving differently)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(21)
    images = torch.rand(8, 3, 8, 8, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    model = MultiscaleDEQ(tiny_cfg(**ROBUST, f_thres=12, b_thres=12))
    train_briefly(model, images, labels, steps=150, lr=0.05)
    return model.double().eval()


def downsampled_test_images(data_dir: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` CIFAR-10 test images, 4x4-average-pooled to 8x8, as float64 pixels in [0, 1]."""
    images, labels = load_dataset("cifar10", "test", data_dir=data_dir, subset=n)
    return F.avg_pool2d(images.to(torch.float64) / 255.0, 4), labels
