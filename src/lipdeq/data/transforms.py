"""Batch-level normalisation and augmentation (random crop with zero padding, horizontal flip)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lipdeq.checks import check_int

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "to_float_normalized", "random_crop_flip"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def to_float_normalized(images_uint8: Tensor) -> Tensor:
    """Map uint8 images (..., 3, H, W) to float32 ``(x / 255 - CIFAR10_MEAN) / CIFAR10_STD``."""
    if not isinstance(images_uint8, Tensor):
        raise TypeError(f"images_uint8 must be a torch.Tensor, got {type(images_uint8).__name__}")
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"images_uint8 must have dtype torch.uint8, got {images_uint8.dtype}")
    if images_uint8.dim() < 3 or images_uint8.shape[-3] != 3:
        raise ValueError(f"images_uint8 must have shape (..., 3, H, W), got {tuple(images_uint8.shape)}")
    dev = images_uint8.device
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32, device=dev).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32, device=dev).view(3, 1, 1)
    return (images_uint8.to(torch.float32) / 255.0 - mean) / std


def random_crop_flip(batch: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random crop after zero padding, then random horizontal flip with probability 0.5.

    ``batch`` is (B, C, H, W) of any dtype; the output has the same shape, dtype and device. The pad
    value is 0, so apply this to raw uint8 or [0, 1] images (0 = black) before normalisation; this
    matches torchvision's ``RandomCrop(H, padding)`` followed by ``RandomHorizontalFlip()``.
    Random draws, in order, from ``generator`` (on its own device, CPU by default):
    ``top = randint(0, 2*padding + 1, (B,))``, ``left = randint(0, 2*padding + 1, (B,))``,
    ``flip = rand(B) < 0.5``. The result is therefore deterministic given the generator state.
    """
    if not isinstance(batch, Tensor):
        raise TypeError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
    if batch.dim() != 4:
        raise ValueError(f"batch must have shape (B, C, H, W), got {tuple(batch.shape)}")
    check_int("padding", padding, minimum=0)
    b, _, h, w = batch.shape
    gdev = generator.device if generator is not None else torch.device("cpu")
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev).to(batch.device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev).to(batch.device)
    flip = (torch.rand(b, generator=generator, device=gdev) < 0.5).to(batch.device)
    padded = F.pad(batch, (padding, padding, padding, padding)) if padding else batch
    rows = top[:, None] + torch.arange(h, device=batch.device)  # (B, H)
    cols = left[:, None] + torch.arange(w, device=batch.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # Gather rows then columns with index arithmetic on the padded batch.
    out = torch.gather(padded, 2, rows[:, None, :, None].expand(b, padded.shape[1], h, padded.shape[3]))
    return torch.gather(out, 3, cols[:, None, None, :].expand(b, padded.shape[1], h, w))
