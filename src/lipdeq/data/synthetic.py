"""The embedded default dataset: procedurally generated 10-class 32x32 RGB texture images.

Each class is a family of patterns, told apart by shape, orientation and frequency but not by colour:

====  =============================================================
0-3   low-frequency stripes, wave vector at 0, 45, 90, 135 deg (+-12)
4     checkerboard, any rotation
5     concentric rings around a random centre
6     a few Gaussian blobs
7     a cross of two perpendicular bars, any rotation
8     high-frequency stripes, any orientation
9     concentric squares (L-infinity rings), any rotation
====  =============================================================

Nuisances per image: random phase, frequency, position, window size, edge sharpness, foreground and
background colours (independent of the class, so mean colour says almost nothing), low-contrast
clutter blobs and uniform pixel noise. Generation is vectorised torch on CPU and deterministic: images come
in chunks of 1000 seeded by ``(seed, split, chunk)``, so ``make_synthetic(n)`` is a prefix of
``make_synthetic(m)`` for ``n <= m``, and the train and test splits use different streams.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lipdeq.checks import check_int
from lipdeq.data.loader import derive_seed

__all__ = ["SYNTHETIC_CLASSES", "make_synthetic"]

SYNTHETIC_CLASSES = (
    "stripes_0", "stripes_45", "stripes_90", "stripes_135", "checkerboard",
    "rings", "blobs", "cross", "fine_stripes", "squares",
)
_CHUNK = 1000
_NOISE_BANK = 128
_SIZE = 32


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _gaussian(x: Tensor, y: Tensor, cx: Tensor, cy: Tensor, radius: Tensor) -> Tensor:
    """Separable isotropic Gaussian bump exp(-|p - c|^2 / (2 r^2)), shape (n, 32, 32)."""
    gx = torch.exp(-((x[:, :1, :] - cx) ** 2) / (2 * radius**2))  # (n, 1, 32)
    gy = torch.exp(-((y[:, :, :1] - cy) ** 2) / (2 * radius**2))  # (n, 32, 1)
    return gy * gx


def _rotate(x: Tensor, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    return x * c + y * s, -x * s + y * c


def _patterns(cls: int, gen: torch.Generator, n: int, x: Tensor, y: Tensor) -> Tensor:
    """Raw pattern of class ``cls`` for ``n`` images, values roughly in [-1, 1], shape (n, 32, 32)."""
    # x, y: (1, 32, 32) in [-1, 1]; a period of f cycles per image width corresponds to pi * f here.
    cx = _uniform(gen, n, -0.5, 0.5)[:, None, None]
    cy = _uniform(gen, n, -0.5, 0.5)[:, None, None]
    phase = _uniform(gen, n, 0.0, 2 * math.pi)[:, None, None]
    any_angle = _uniform(gen, n, 0.0, math.pi)
    xs, ys = x - cx, y - cy
    if cls <= 3:
        theta = cls * math.pi / 4 + _uniform(gen, n, -0.21, 0.21)
        freq = _uniform(gen, n, 2.5, 4.5)[:, None, None]
        u, _ = _rotate(xs, ys, theta)
        return torch.cos(math.pi * freq * u + phase)
    if cls == 4:
        freq = _uniform(gen, n, 2.5, 4.0)[:, None, None]
        u, v = _rotate(xs, ys, any_angle)
        return torch.cos(math.pi * freq * u + phase) * torch.cos(math.pi * freq * v) * 2.0
    if cls == 5:
        freq = _uniform(gen, n, 2.5, 4.5)[:, None, None]
        r = torch.sqrt(xs**2 + ys**2)
        return torch.cos(math.pi * freq * r + phase)
    if cls == 6:
        out = torch.full((n, _SIZE, _SIZE), -1.0)
        count = torch.randint(2, 5, (n,), generator=gen)
        for j in range(4):
            bx = _uniform(gen, n, -0.8, 0.8)[:, None, None]
            by = _uniform(gen, n, -0.8, 0.8)[:, None, None]
            rad = _uniform(gen, n, 0.12, 0.3)[:, None, None]
            blob = 2.0 * _gaussian(x, y, bx, by, rad) - 1.0
            out = torch.where((j < count)[:, None, None], torch.maximum(out, blob), out)
        return out
    if cls == 7:
        width = _uniform(gen, n, 0.12, 0.3)[:, None, None]
        u, v = _rotate(xs, ys, any_angle)
        bar = torch.minimum(torch.abs(u), torch.abs(v))
        return (width - bar) / width
    if cls == 8:
        freq = _uniform(gen, n, 7.0, 10.0)[:, None, None]
        u, _ = _rotate(xs, ys, 2 * any_angle)
        return torch.cos(math.pi * freq * u + phase)
    if cls == 9:
        freq = _uniform(gen, n, 2.5, 4.5)[:, None, None]
        u, v = _rotate(xs, ys, any_angle)
        return torch.cos(math.pi * freq * torch.maximum(torch.abs(u), torch.abs(v)) + phase)
    raise AssertionError(cls)


def _chunk(seed: int, split: str, index: int) -> tuple[Tensor, Tensor]:
    """Generate chunk ``index`` (``_CHUNK`` images, balanced in every block of 10)."""
    gen = torch.Generator().manual_seed(derive_seed("synthetic", seed, split, index))
    n = _CHUNK
    labels = torch.argsort(torch.rand(n // 10, 10, generator=gen), dim=1).reshape(-1)
    lin = torch.linspace(-1.0, 1.0, _SIZE)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    x, y = x[None], y[None]
    raw = torch.empty(n, _SIZE, _SIZE)
    for cls in range(10):
        idx = (labels == cls).nonzero().squeeze(1)
        raw[idx] = _patterns(cls, gen, idx.numel(), x, y)
    sharp = _uniform(gen, n, 1.0, 5.0)[:, None, None]
    pattern = 0.5 + 0.5 * torch.tanh(sharp * raw)
    # Soft elliptical window at a random place: outside it only background and clutter remain.
    wx = _uniform(gen, n, -0.4, 0.4)[:, None, None]
    wy = _uniform(gen, n, -0.4, 0.4)[:, None, None]
    wr = _uniform(gen, n, 0.55, 1.5)[:, None, None]
    window = torch.sigmoid((wr - torch.sqrt((x - wx) ** 2 + (y - wy) ** 2)) * 12.0)
    mask = (pattern * window)[:, None]
    bg = _uniform(gen, 3 * n, 0.1, 0.9).view(n, 3, 1, 1)
    direction = torch.randn(n, 3, generator=gen)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-6)
    fg = (bg + (direction * _uniform(gen, n, 0.35, 0.7)[:, None]).view(n, 3, 1, 1)).clamp(0.0, 1.0)
    img = torch.lerp(bg.expand(n, 3, _SIZE, _SIZE), fg.expand(n, 3, _SIZE, _SIZE), mask)
    # Clutter: two faint coloured blobs anywhere, then uniform pixel noise of standard deviation sigma.
    for _ in range(2):
        bx = _uniform(gen, n, -1.0, 1.0)[:, None, None]
        by = _uniform(gen, n, -1.0, 1.0)[:, None, None]
        rad = _uniform(gen, n, 0.1, 0.35)[:, None, None]
        tint = _uniform(gen, 3 * n, -0.25, 0.25).view(n, 3, 1, 1)
        img.addcmul_(tint, _gaussian(x, y, bx, by, rad)[:, None])
    # Noise tiles come from a bank of _NOISE_BANK uniform fields per chunk (drawing 3 * 1024 fresh
    # values per image would dominate the cost); each image picks a tile at random.
    sigma = _uniform(gen, n, 0.02, 0.10).view(n, 1, 1, 1) * math.sqrt(12.0)
    bank = torch.rand(_NOISE_BANK, 3, _SIZE, _SIZE, generator=gen).sub_(0.5)
    img.addcmul_(sigma, bank[torch.randint(0, _NOISE_BANK, (n,), generator=gen)])
    images = img.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return images, labels


def make_synthetic(n: int, split: Literal["train", "test"], seed: int = 0) -> tuple[Tensor, Tensor]:
    """Generate ``n`` images: (uint8 (n, 3, 32, 32), int64 labels (n,)); class counts differ by <= 1.

    Deterministic in ``(n, split, seed)``; the first ``n`` images do not depend on how many follow.
    """
    check_int("n", n, minimum=1)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    check_int("seed", seed)
    images = torch.empty(n, 3, _SIZE, _SIZE, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    for i in range(math.ceil(n / _CHUNK)):
        chunk_images, chunk_labels = _chunk(seed, split, i)
        keep = min(_CHUNK, n - i * _CHUNK)
        images[i * _CHUNK : i * _CHUNK + keep] = chunk_images[:keep]
        labels[i * _CHUNK : i * _CHUNK + keep] = chunk_labels[:keep]
    return images, labels
