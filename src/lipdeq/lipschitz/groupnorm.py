"""Mean-only GroupNorm: an orthogonal projection followed by a capped per-channel affine map."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MeanOnlyGroupNorm"]


class MeanOnlyGroupNorm(nn.Module):
    """Subtract the per-(sample, group) mean, then ``clamp(gamma_c) * x + b_c``.

    The mean subtraction over (channels of the group, spatial dims) is an orthogonal projection
    (Lipschitz 1, idempotent); there is no division by the standard deviation. ``gamma`` is clamped to
    ``[-gamma_cap, gamma_cap]`` in the forward, so the Lipschitz bound ``gamma_cap`` holds whatever
    the optimiser does to the raw parameter. Inputs have shape (B, C, *spatial).
    """

    def __init__(self, num_groups: int, num_channels: int, affine: bool = True,
                 gamma_cap: float | None = 1.0) -> None:
        super().__init__()
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        if not isinstance(num_channels, int) or num_channels < 1 or num_channels % num_groups:
            raise ValueError(
                f"num_channels={num_channels!r} must be a positive multiple of num_groups={num_groups}"
            )
        if gamma_cap is not None and not gamma_cap > 0:
            raise ValueError(f"gamma_cap must be positive or None, got {gamma_cap!r}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.affine = affine
        self.gamma_cap = None if gamma_cap is None else float(gamma_cap)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def clamped_weight(self) -> Tensor | None:
        """The per-channel gamma the forward uses (clamped), or None without affine."""
        if self.weight is None:
            return None
        if self.gamma_cap is None:
            return self.weight
        return self.weight.clamp(-self.gamma_cap, self.gamma_cap)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the projection and the capped affine map to ``x`` of shape (B, C, *spatial)."""
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected input of shape (B, {self.num_channels}, ...), got {tuple(x.shape)}")
        b = x.shape[0]
        xg = x.reshape(b, self.num_groups, -1)
        y = (xg - xg.mean(dim=-1, keepdim=True)).reshape(x.shape)
        if self.weight is None:
            return y
        view = (1, self.num_channels) + (1,) * (x.dim() - 2)
        # one fused pass for the affine map (y * gamma + beta would be two)
        return torch.addcmul(self.bias.view(view), y, self.clamped_weight().view(view))

    def lipschitz_constant(self) -> float:
        """l2 Lipschitz bound: ``max |clamped gamma|`` (1.0 without affine)."""
        w = self.clamped_weight()
        if w is None:
            return 1.0
        return float(w.detach().abs().max())

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, affine={self.affine}, gamma_cap={self.gamma_cap}"
