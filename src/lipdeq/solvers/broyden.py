"""Batched limited-memory ("good") Broyden method for the root of ``g(z) = f(z) - z``.

The inverse Jacobian of ``g`` is approximated as ``Binv = -I + sum_i u_i v_i^T`` (so the first step is
a Picard step), with the Sherman-Morrison form of Broyden's good update after each step
``s = z_k - z_(k-1)``, ``y = g_k - g_(k-1)``: ``u = (s - Binv y) / (s^T Binv y)``, ``v = Binv^T s``.
The last ``m`` pairs are kept in a ring buffer, as in Bai et al.'s DEQ code. Per sample, an update
whose denominator is (relatively) zero or non-finite is skipped, so the batch never crashes on a
degenerate sample and the stored updates stay finite.
"""

from __future__ import annotations

import torch

from lipdeq.checks import check_int


class Broyden:
    """Limited-memory good Broyden with ``m`` stored rank-one updates."""

    def __init__(self, z: torch.Tensor, *, m: int = 30) -> None:
        check_int("broyden option m", m, minimum=1)
        B, D = z.shape
        self.m = m
        # rank-one factors; only filled slots are ever read
        self.U = torch.empty(B, m, D, dtype=z.dtype, device=z.device)
        self.V = torch.empty(B, m, D, dtype=z.dtype, device=z.device)
        self.count = 0
        self.z_prev: torch.Tensor | None = None
        self.g_prev: torch.Tensor | None = None
        self.tiny = torch.finfo(z.dtype).eps

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``Binv x`` for ``x`` of shape (B, D)."""
        n = min(self.count, self.m)
        if n == 0:
            return -x
        vx = torch.bmm(x.unsqueeze(1), self.V[:, :n].transpose(1, 2))  # (B, 1, n); x^T V^T is fast on CPU
        return -x + torch.bmm(vx, self.U[:, :n]).squeeze(1)

    def _rmatvec(self, x: torch.Tensor) -> torch.Tensor:
        """``Binv^T x`` for ``x`` of shape (B, D)."""
        n = min(self.count, self.m)
        if n == 0:
            return -x
        ux = torch.bmm(x.unsqueeze(1), self.U[:, :n].transpose(1, 2))
        return -x + torch.bmm(ux, self.V[:, :n]).squeeze(1)

    def residual_out(self) -> None:
        """No residual buffer: the driver allocates the residual."""
        return None

    def residual_sq_norm(self, g: torch.Tensor) -> None:
        """Not computed here: the driver takes the norm."""
        return None

    def step(self, z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Update the inverse-Jacobian approximation with the last step and return ``z - Binv g``."""
        bg = self._matvec(g)
        if self.z_prev is not None:
            # The last step was z = z_prev - Binv g_prev, so Binv y = Binv g + s: no second matvec.
            s = z - self.z_prev
            by = bg + s
            v = self._rmatvec(s)
            den = (v * (g - self.g_prev)).sum(dim=1)
            size = torch.linalg.vector_norm(s, dim=1) * torch.linalg.vector_norm(by, dim=1)
            # A NaN/Inf in v, s or Binv y makes den or size non-finite, so ``ok`` also certifies that
            # u and v are finite; a skipped update stores zeros (u = 0 through den = inf).
            ok = torch.isfinite(den) & (den.abs() > self.tiny * size)
            j = self.count % self.m
            u = torch.div(s - by, torch.where(ok, den, torch.inf)[:, None], out=self.U[:, j])
            v = torch.where(ok[:, None], v, v.new_zeros(()), out=self.V[:, j])
            self.count += 1
            bg = bg + u * (v * g).sum(dim=1, keepdim=True)  # Binv_new g by Sherman-Morrison
        self.z_prev, self.g_prev = z, g
        return z - bg
