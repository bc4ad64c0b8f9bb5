"""Precise BatchNorm: re-estimate the BatchNorm statistics on fixed training images before evaluating.

BatchNorm's running statistics are an exponential average (momentum 0.1) over the training batches,
starting from mean 0 and variance 1. With MDEQ's N(0, 0.01) init the stem's activations have a
variance near 1e-4, so for the first hundred or so steps the running statistics describe another
network and eval-mode predictions are at chance. Re-estimating them from a few hundred training
images (Wu and Johnson 2021, "Rethinking BatchNorm") gives the accuracy of the weights themselves.

Only the BatchNorm layers run in training mode during the re-estimation; every other module stays in
eval mode, so the statistics are those of the network that is then evaluated (no dropout masks,
and the operator-norm caps do not advance their power iterations, which would change the evaluated
weights), and no random number is drawn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lipdeq.data import derive_seed, to_float_normalized

__all__ = ["precise_batchnorm", "precise_bn_batches", "recalibrate_batchnorm"]


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recalibrate_batchnorm(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    amp: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` from ``batches``.

    The statistics are reset and then averaged with equal weight over the batches (cumulative
    average, ``momentum=None``) without gradients, with the BatchNorm layers in training mode and
    every other module in eval mode ("precise BN" of the eval-mode network: no dropout, no power
    iteration, no random numbers drawn). The momentum of each layer is restored afterwards and the
    model is left in eval mode. ``batches`` are normalised images (moved to the model's device);
    ``amp``: bf16 autocast, as the evaluation uses; ``should_stop`` is asked before every batch and
    ends the re-estimation early when it returns True. Returns the number of BatchNorm layers
    (0: nothing to do, no forward pass is run).
    """
    bns = _batchnorms(model)
    if not bns or not batches:
        return 0
    momenta = [m.momentum for m in bns]
    device = next(iter(model.parameters()), batches[0]).device
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for x in batches:
                if should_stop is not None and should_stop():
                    break
                model(x.to(device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return len(bns)


def precise_bn_batches(
    images_uint8: torch.Tensor,
    num_images: int,
    *,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """A fixed selection of ``num_images`` of ``images_uint8`` (all of them if there are fewer), without
    augmentation, normalised, on ``device``, in batches of at most ``batch_size`` of near-equal size
    (no small remainder batch: each batch weighs the same in the re-estimation).

    The selection is a permutation from a private generator seeded by ``("precise_bn", seed)``: it
    is the same for every evaluation of a run and draws nothing from the global RNG or the training
    data order. ``num_images=0`` gives no batches (precise BN off).
    """
    if num_images < 0 or batch_size < 1:
        raise ValueError(f"num_images must be >= 0 and batch_size >= 1, got {num_images} and {batch_size}")
    n = min(int(num_images), images_uint8.shape[0])
    if n == 0:
        return []
    gen = torch.Generator().manual_seed(derive_seed("precise_bn", seed))
    idx = torch.randperm(images_uint8.shape[0], generator=gen)[:n]
    chunks = torch.tensor_split(idx, -(-n // batch_size))
    return [to_float_normalized(images_uint8[i]).to(device) for i in chunks]


@contextlib.contextmanager
def precise_batchnorm(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    amp: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[int]:
    """Within the block, ``model``'s BatchNorm statistics are re-estimated from ``batches``
    (:func:`recalibrate_batchnorm`); on exit they, the momenta, every module's training flag and the
    torch RNG states are exactly as on entry, so that an evaluation inside changes nothing that
    training or a checkpoint reads. Yields the number of images re-estimated from (0: off).
    """
    bns = _batchnorms(model)
    if not bns or not batches:
        yield 0
        return
    saved = [(m.running_mean.clone(), m.running_var.clone(),
              None if m.num_batches_tracked is None else m.num_batches_tracked.clone(), m.momentum) for m in bns]
    modes = [(m, m.training) for m in model.modules()]
    device = next(iter(model.parameters()), batches[0]).device
    # Nothing here should draw a random number; the fork makes sure of it for any model.
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            recalibrate_batchnorm(model, batches, amp=amp, should_stop=should_stop)
        yield sum(int(x.shape[0]) for x in batches)
    finally:
        with torch.no_grad():
            for m, (mean, var, count, momentum) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if count is not None:
                    m.num_batches_tracked.copy_(count)
                m.momentum = momentum
        for m, flag in modes:
            m.training = flag
