"""Variational (per-sample, per-channel) dropout whose mask stays fixed across solver iterations."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lipdeq.checks import check_real

__all__ = ["VariationalDropout2d"]


class VariationalDropout2d(nn.Module):
    """Channel dropout with a (B, C, 1, 1) mask drawn once per batch by :meth:`reset_mask`.

    A DEQ calls ``reset_mask(x)`` once per forward, then evaluates its layer many times with the
    same mask (the map stays a fixed function of z). ``rescale=True`` (MDEQ behaviour, inverted
    dropout) multiplies by ``mask / (1 - p)`` in training, which raises the training-time Lipschitz
    constant to ``1 / (1 - p)`` (docs/MATH.md section 8); ``rescale=False`` multiplies by the plain mask in
    training and by ``(1 - p)`` in eval mode, so the expected activation matches and the map is
    never expansive.
    """

    mask: Tensor | None

    def __init__(self, p: float, rescale: bool) -> None:
        super().__init__()
        self.p = check_real("p", p, above=0.0, inclusive=True, below=1.0)
        self.rescale = bool(rescale)
        self.mask = None

    def reset_mask(self, x_like: Tensor, generator: torch.Generator | None = None) -> None:
        """Draw a new Bernoulli(1 - p) mask of shape (B, C, 1, 1) for batches shaped like ``x_like``.

        Only in training mode with ``p > 0``; otherwise the mask is cleared (not needed).
        """
        if x_like.dim() < 2:
            raise ValueError(f"x_like must have shape (B, C, ...), got {tuple(x_like.shape)}")
        if not (self.training and self.p > 0):
            self.mask = None
            return
        shape = (x_like.shape[0], x_like.shape[1]) + (1,) * (x_like.dim() - 2)
        dev = generator.device if generator is not None else x_like.device
        keep = torch.rand(shape, generator=generator, device=dev) >= self.p
        self.mask = keep.to(device=x_like.device, dtype=x_like.dtype)

    def clear_mask(self) -> None:
        """Forget the current mask."""
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        """Multiply by the fixed mask (training) or by the eval-mode factor."""
        if self.p == 0:
            return x
        if not self.training:
            return x if self.rescale else x * (1.0 - self.p)
        if self.mask is None or self.mask.shape[:2] != x.shape[:2] or self.mask.dim() != x.dim():
            got = None if self.mask is None else tuple(self.mask.shape)
            raise RuntimeError(
                f"VariationalDropout2d: no mask for an input of shape {tuple(x.shape)} "
                f"(current mask: {got}); "
                "call reset_mask(x) once per forward pass before evaluating the layer in training mode"
            )
        mask = self.mask.to(dtype=x.dtype)
        if self.rescale:
            return x * mask / (1.0 - self.p)
        return x * mask

    def lipschitz_constant(self, training: bool | None = None) -> float:
        """l2 Lipschitz bound in training or eval mode (default: the module's current mode).

        Training: ``1 / (1 - p)`` with rescaling, else 1. Eval: 1 with rescaling, else ``1 - p``.
        """
        training = self.training if training is None else training
        if self.p == 0:
            return 1.0
        if training:
            return 1.0 / (1.0 - self.p) if self.rescale else 1.0
        return 1.0 if self.rescale else 1.0 - self.p

    def extra_repr(self) -> str:
        return f"p={self.p}, rescale={self.rescale}"
