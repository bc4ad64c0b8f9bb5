"""Channels-last memory format (``train.channels_last``): the same network, the same results."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from lipdeq.models import MultiscaleDEQ, model_config

SMALL = dict(channels=[8, 16], head_channels=[4, 4], final_channels=16, num_groups=4, image_size=16,
             f_thres=8, b_thres=8)


def _pair(preset: str):
    torch.manual_seed(0)
    plain = MultiscaleDEQ(model_config(preset, **SMALL))
    nhwc = copy.deepcopy(plain)
    nhwc.use_channels_last()
    return plain, nhwc


def test_flat_state_in_nhwc_order_unpacks_to_channels_last_views():
    plain, nhwc = _pair("lipmdeq_tiny")
    layer = nhwc.layer
    z = torch.randn(3, layer.state_dim, generator=torch.Generator().manual_seed(0))
    parts = layer.unpack(z)
    # views of z (no copy) with channel stride 1 (the batch stride stays that of the flat state)
    assert all(p.stride()[1] == 1 and p.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
               for p in parts)
    torch.testing.assert_close(layer.pack(parts), z, rtol=0, atol=0)
    # oracle: the NHWC flat vector is each branch's NCHW tensor transposed, then flattened
    oracle = torch.cat([p.contiguous().permute(0, 2, 3, 1).reshape(3, -1) for p in parts], dim=1)
    torch.testing.assert_close(oracle, z, rtol=0, atol=0)
    assert torch.equal(plain.layer.pack(parts), torch.cat([p.reshape(3, -1) for p in parts], dim=1))


def test_channels_last_model_equals_the_default_format():
    """Training step (dropout masks, IFT backward) and evaluation of both presets' kinds agree within
    float32 rounding; the 4-D weights really are stored channels-last."""
    for preset in ("lipmdeq_tiny", "mdeq_tiny"):
        plain, nhwc = _pair(preset)
        conv = nhwc.layer.branches[0].conv1.parametrizations.weight.original1
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        out = []
        for model in (plain, nhwc):
            torch.manual_seed(5)  # the same dropout masks
            model.train()
            logits = model(x)
            F.cross_entropy(logits, y).backward()
            out.append((logits.detach(), model.last_solution, [p.grad for p in model.parameters()]))
        (la, sa, ga), (lb, sb, gb) = out
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-6)
        assert torch.equal(sa.nstep, sb.nstep) and sa.backward.n_f_evals == sb.backward.n_f_evals
        # float32 rounding of a different summation order, on the scale of the largest gradient (some
        # gradients are zero in exact arithmetic: a bias before a mean subtraction)
        scale = max(float(g.abs().max()) for g in ga)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)
        with torch.no_grad():
            plain.eval()
            nhwc.eval()
            torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-4, atol=1e-6)
        bound, bound_nhwc = plain.lipschitz_bound().value, nhwc.lipschitz_bound().value
        assert bound_nhwc == bound or abs(bound_nhwc - bound) <= 1e-6 * bound  # inf for the baseline
