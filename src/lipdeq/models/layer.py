"""The multiscale equilibrium layer f (MDEQ's "fullstage"): residual blocks, fusion, post-fusion.

One module spans the MDEQ baseline and the Lipschitz MDEQ; the :class:`ModelConfig` fields select
the normalisation, the ReLU slope, the mixing and the operator-norm caps (docs/MATH.md section 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from lipdeq.lipschitz import (
    MeanOnlyGroupNorm,
    ScaledReLU,
    VariationalDropout2d,
    apply_operator_norm_cap,
)
from lipdeq.models.config import ModelConfig


def make_norm(cfg: ModelConfig, channels: int, *, groups: int | None = None, affine: bool = True) -> nn.Module:
    """Standard GroupNorm (MDEQ) or mean-only GroupNorm with clipped gamma (Lipschitz MDEQ)."""
    groups = groups or cfg.num_groups
    if cfg.norm == "group":
        return nn.GroupNorm(groups, channels, affine=affine)
    return MeanOnlyGroupNorm(groups, channels, affine=affine, gamma_cap=cfg.gn_cap)


def make_conv(
    cfg: ModelConfig,
    c_in: int,
    c_out: int,
    kernel_size: int,
    input_size: int,
    *,
    stride: int = 1,
    use_weight_norm: bool = False,
) -> nn.Conv2d:
    """A bias-free conv of f: N(0, conv_init_std^2) init (MDEQ's 0.01), optional weight norm, then the
    operator-norm cap.

    The cap is registered after weight norm, so it constrains the weight the forward really uses.
    """
    conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, cfg.conv_init_std)
    if use_weight_norm:
        weight_norm(conv, dim=0)
    if cfg.conv_cap is not None:
        apply_operator_norm_cap(conv, cfg.conv_cap, (input_size, input_size), cfg.cap_power_iterations)
    return conv


def _mix(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """``(1 - t) a + t b`` in one pass (``lerp``; under autocast the dtypes may differ, then promoted)."""
    if a.dtype != b.dtype:
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    return torch.lerp(a, b, t)


def norm_act(norm: nn.Module, act: ScaledReLU, x: torch.Tensor) -> torch.Tensor:
    """``act(norm(x))``; a mean-only GroupNorm takes a positive slope into its affine pass."""
    if isinstance(norm, MeanOnlyGroupNorm) and act.slope > 0:
        return norm(x, relu_slope=act.slope)
    return act(norm(x))


def act_norm(act: ScaledReLU, norm: nn.Module, x: torch.Tensor, conv: nn.Module | None = None) -> torch.Tensor:
    """``norm(act(x))``, or ``norm(conv(act(x)))`` with a bias-free ``conv`` in between.

    A positive slope commutes with the bias-free conv and folds into a mean-only GroupNorm's affine pass
    (``N(s y) = s gamma (y - mean) + beta``), which leaves a plain ReLU.
    """
    conv = conv if conv is not None else nn.Identity()
    if isinstance(norm, MeanOnlyGroupNorm) and act.slope > 0 and getattr(conv, "bias", None) is None:
        return norm(conv(torch.relu(x)), input_scale=act.slope)
    return norm(conv(act(x)))


class ResidualBlock(nn.Module):
    """Per-branch block: ``h1 = s relu(N1 C1 z)``, ``h2 = N2(drop(C2 h1) + u)``,
    ``h3 = (1 - alpha) z + alpha h2`` (or ``z + h2``), output ``N3(s relu(h3))``."""

    def __init__(self, cfg: ModelConfig, channels: int, size: int) -> None:
        super().__init__()
        hidden = cfg.expansion * channels
        self.mixing, self.alpha = cfg.mixing, cfg.alpha
        self.conv1 = make_conv(cfg, channels, hidden, 3, size, use_weight_norm=cfg.weight_norm)
        self.gn1 = make_norm(cfg, hidden)
        self.conv2 = make_conv(cfg, hidden, channels, 3, size, use_weight_norm=cfg.weight_norm)
        self.gn2 = make_norm(cfg, channels)
        self.gn3 = make_norm(cfg, channels)
        self.act = ScaledReLU(cfg.relu_slope)
        self.drop = VariationalDropout2d(cfg.dropout, rescale=cfg.dropout_rescale)

    def forward(
        self, z: torch.Tensor, injection: torch.Tensor | None = None, *, zero_state: bool = False
    ) -> torch.Tensor:
        """``zero_state``: the caller guarantees that ``z`` is exactly zero, so that the first conv (bias-free)
        is skipped: its output is exactly zero too, unless its weight is not finite (then it is NaN, and the
        NaN shows), or under autocast (then the conv runs, in autocast's dtype)."""
        if zero_state and not torch.is_autocast_enabled(z.device.type):
            # 0 * sum(weight): exact zeros, or NaN everywhere if a weight is not finite, as the conv would
            # give (NaN or Inf times 0); no host synchronisation to test the weight first
            zero = (self.conv1.weight.sum() * 0).to(z.dtype)
            h = zero.expand(z.shape[0], self.conv1.out_channels, *z.shape[2:]).contiguous()
        else:
            h = self.conv1(z)
        h = norm_act(self.gn1, self.act, h)
        h = self.drop(self.conv2(h))
        if injection is not None:
            h = h + injection
        h = self.gn2(h)
        h = z + h if self.mixing == "sum" else _mix(z, h, self.alpha)
        return act_norm(self.act, self.gn3, h)


class UpsampleFuse(nn.Module):
    """From a coarser branch: 1x1 conv, norm, nearest upsampling by ``2**level_diff``."""

    def __init__(self, cfg: ModelConfig, c_in: int, c_out: int, source_size: int, level_diff: int) -> None:
        super().__init__()
        self.level_diff = level_diff
        self.conv = make_conv(cfg, c_in, c_out, 1, source_size)
        self.norm = make_norm(cfg, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.norm(self.conv(x)), scale_factor=2**self.level_diff, mode="nearest")


class DownsampleFuse(nn.Module):
    """From a finer branch: ``level_diff`` stride-2 3x3 convs each followed by a norm, scaled ReLU
    between stages."""

    def __init__(self, cfg: ModelConfig, c_in: int, c_out: int, source_size: int, level_diff: int) -> None:
        super().__init__()
        convs, norms = [], []
        for k in range(level_diff):
            c_next = c_out if k == level_diff - 1 else c_in
            convs.append(make_conv(cfg, c_in, c_next, 3, source_size // 2**k, stride=2))
            norms.append(make_norm(cfg, c_next))
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        self.act = ScaledReLU(cfg.relu_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = act_norm(self.act, norm, x, conv) if k else norm(conv(x))
        return x


class PostFuse(nn.Module):
    """Post-fusion of a branch: ``N_post(C_post(s relu(y)))`` (N_post with ``num_groups // 2``
    groups, without affine by default)."""

    def __init__(self, cfg: ModelConfig, channels: int, size: int) -> None:
        super().__init__()
        self.act = ScaledReLU(cfg.relu_slope)
        self.conv = make_conv(cfg, channels, channels, 1, size, use_weight_norm=cfg.weight_norm)
        self.norm = make_norm(cfg, channels, groups=max(cfg.num_groups // 2, 1), affine=cfg.post_gn_affine)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return act_norm(self.act, self.norm, y, self.conv)


def fusion_weights(num_branches: int, mode: str) -> torch.Tensor:
    """``w[i, j]`` for fusing branch j into branch i (zero diagonal).

    ``"sum"``: all ones (MDEQ). ``"softmax"``: ``softmax_j(-p_ij)`` over ``j != i`` with
    ``p_ij = j - i`` for coarser sources and 0 for finer ones (Lipschitz MDEQ).
    """
    w = torch.zeros(num_branches, num_branches, dtype=torch.float64)
    for i in range(num_branches):
        others = [j for j in range(num_branches) if j != i]
        if not others:
            continue
        if mode == "sum":
            w[i, others] = 1.0
        else:
            logits = torch.tensor([-(j - i) if j > i else 0.0 for j in others], dtype=torch.float64)
            w[i, others] = torch.softmax(logits, dim=0)
    return w


class MultiscaleLayer(nn.Module):
    """The DEQ map f(z; x) on the list of branch states ``[z_1, ..., z_n]``.

    Branch i has ``channels[i]`` channels at resolution ``image_size / 2**i``. The input
    injection enters branch 1 additively, inside its residual block.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.num_branches
        self.sizes = [cfg.image_size // 2**i for i in range(n)]
        self.shapes = [(c, s, s) for c, s in zip(cfg.channels, self.sizes)]
        self.branches = nn.ModuleList(ResidualBlock(cfg, c, s) for c, s in zip(cfg.channels, self.sizes))
        fuse: list[nn.ModuleList] = []
        for i in range(n):
            row: list[nn.Module] = []
            for j in range(n):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:
                    row.append(UpsampleFuse(cfg, cfg.channels[j], cfg.channels[i], self.sizes[j], j - i))
                else:
                    row.append(DownsampleFuse(cfg, cfg.channels[j], cfg.channels[i], self.sizes[j], i - j))
            fuse.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse)
        self.post_fuse_layers = nn.ModuleList(PostFuse(cfg, c, s) for c, s in zip(cfg.channels, self.sizes))
        self.register_buffer("fusion_w", fusion_weights(n, cfg.fusion), persistent=False)
        self._fusion_scalars = self.fusion_w.tolist()  # plain floats for the forward (called every iteration)
        # Order of the flat state: NCHW per branch (default) or NHWC (channels_last), so that unpack
        # gives channels-last views without a copy when the convs run in that memory format.
        self.channels_last = False

    @property
    def state_dim(self) -> int:
        """Number of scalars of the flat state of one sample."""
        return sum(math.prod(s) for s in self.shapes)

    def pack(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate branch states ``(B, c_i, H_i, W_i)`` into a flat ``(B, D)`` state (each branch
        in NCHW order, or NHWC when :attr:`channels_last` is set)."""
        if self.channels_last:
            return torch.cat([z.permute(0, 2, 3, 1).flatten(1) for z in zs], dim=1)
        return torch.cat([z.flatten(1) for z in zs], dim=1)

    def unpack(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat ``(B, D)`` state into branch states."""
        if z.dim() != 2 or z.shape[1] != self.state_dim:
            raise ValueError(f"expected a flat state of shape (B, {self.state_dim}), got {tuple(z.shape)}")
        parts = torch.split(z, [math.prod(s) for s in self.shapes], dim=1)
        if self.channels_last:  # (B, H, W, C) data seen as (B, C, H, W) with channels-last strides
            return [p.reshape(z.shape[0], h, w, c).permute(0, 3, 1, 2) for p, (c, h, w) in zip(parts, self.shapes)]
        return [p.reshape(z.shape[0], *s) for p, s in zip(parts, self.shapes)]

    def reset_dropout(self, zs: list[torch.Tensor], generator: torch.Generator | None = None) -> None:
        """Draw new variational dropout masks (fixed until the next reset) for this batch."""
        for block, z in zip(self.branches, zs):
            block.drop.reset_mask(z, generator=generator)

    def forward(
        self, zs: list[torch.Tensor], injection: torch.Tensor, *, zero_state: bool = False
    ) -> list[torch.Tensor]:
        """f of the branch states ``zs``. ``zero_state``: the caller guarantees that every state is exactly
        zero (the solvers' first evaluation, at ``z0 = 0``); the blocks then skip their first conv."""
        n = len(self.branches)
        blocks = [blk(z, injection if i == 0 else None, zero_state=zero_state)
                  for i, (blk, z) in enumerate(zip(self.branches, zs))]
        out = []
        for i in range(n):
            fused = None
            for j in range(n):
                if j == i:
                    continue
                term = self.fuse_layers[i][j](blocks[j])
                w = self._fusion_scalars[i][j] if self.cfg.fusion == "softmax" else 1.0
                if fused is None:
                    fused = term if w == 1.0 else w * term  # two branches: the softmax weight is 1
                else:
                    fused = torch.add(fused, term, alpha=w)
            if fused is None:
                y = blocks[i]
            elif self.cfg.mixing == "sum":
                y = blocks[i] + fused
            else:
                y = _mix(blocks[i], fused, self.cfg.beta)
            out.append(self.post_fuse_layers[i](y))
        return out
