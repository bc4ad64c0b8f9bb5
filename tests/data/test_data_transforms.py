"""Normalisation and the batched random crop + flip against plain per-sample references."""

from __future__ import annotations

import pytest
import torch

from lipdeq.data import CIFAR10_MEAN, CIFAR10_STD, random_crop_flip, to_float_normalized


def test_to_float_normalized_matches_formula() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    out = to_float_normalized(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for c in range(3):
        ref = (x[:, c].double() / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        torch.testing.assert_close(out[:, c].double(), ref, rtol=0, atol=1e-5)
    assert to_float_normalized(x[0]).shape == (3, 5, 6)


def test_to_float_normalized_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        to_float_normalized(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        to_float_normalized(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


def _reference(batch: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample loop: zero canvas, paste, slice the crop, maybe flip (same documented draw order)."""
    b, c, h, w = batch.shape
    top = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.empty_like(batch)
    for i in range(b):
        canvas = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=batch.dtype)
        canvas[:, padding : padding + h, padding : padding + w] = batch[i]
        crop = canvas[:, top[i] : top[i] + h, left[i] : left[i] + w]
        out[i] = torch.flip(crop, dims=[2]) if flip[i] else crop
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize(("padding", "h", "w"), [(4, 32, 32), (2, 5, 7), (0, 6, 6)])
def test_matches_per_sample_reference(dtype: torch.dtype, padding: int, h: int, w: int) -> None:
    torch.manual_seed(1)
    batch = torch.randint(1, 256, (37, 3, h, w)).to(dtype)
    out = random_crop_flip(batch, padding=padding, generator=torch.Generator().manual_seed(11))
    ref = _reference(batch, padding, torch.Generator().manual_seed(11))
    assert out.dtype == dtype and out.shape == batch.shape
    assert torch.equal(out, ref)


def test_offsets_and_flips_are_spread() -> None:
    """Each sample is a ramp image, so its crop offset and flip can be read back from the output."""
    b, p, s = 4000, 4, 32
    ramp = (torch.arange(s)[None, :] * 64 + torch.arange(s)[:, None] + 1).float()  # unique, nonzero
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(ramp.expand(b, 1, s, s).clone(), padding=p, generator=gen)
    centre = out[:, 0, p : s - p, p : s - p]  # never touches padding for |shift| <= p
    flipped = centre[:, 0, 1] < centre[:, 0, 0]
    assert 0.46 < flipped.float().mean().item() < 0.54
    # Output pixel (p, p) of an unflipped crop at padded offset (top, left) is the input pixel (top, left).
    value = torch.where(flipped, centre[:, 0, -1], centre[:, 0, 0]).long() - 1
    left, top = value // 64, value % 64
    assert set(left.tolist()) == set(range(2 * p + 1))
    assert set(top.tolist()) == set(range(2 * p + 1))


def test_deterministic_given_generator_and_keeps_device() -> None:
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.device == x.device


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        random_crop_flip(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(torch.zeros(1, 3, 8, 8), padding=-1)
