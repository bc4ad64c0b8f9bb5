"""Batched Anderson acceleration (type II, as in Bai et al.'s DEQ code and TorchDEQ), made safe.

With the last ``n <= m`` iterates ``x_i``, images ``f_i`` and residuals ``g_i = f_i - x_i``, the mixing
weights ``alpha`` minimise ``||sum_i alpha_i g_i||^2 + lam sum_i ||g_i||^2 alpha_i^2`` subject to
``sum_i alpha_i = 1``, i.e. ``alpha = H^-1 1 / (1^T H^-1 1)`` with ``H = G G^T + lam diag(G G^T)``.
Weighting the Tikhonov term by each entry's own squared residual makes ``lam`` scale-invariant, also
when the residuals in the window span many orders of magnitude; an absolute ``lam`` (TorchDEQ)
degrades the method to plain averaging once the residuals are small. The next iterate is
``sum_i alpha_i (x_i + beta g_i)``. The Gram matrix is updated
incrementally (one new row per step), and any sample whose small solve fails or gives non-finite
weights takes a plain (``beta``-damped) Picard step instead.

The residuals live in one ``(B, m, D)`` buffer (the driver writes each new one into its slot, and
the Gram row is one batched product over it); the images are kept by reference, as the driver hands
them over (never written to afterwards), and mixed by ``n`` fused multiply-adds: copying each image
into a buffer for one batched product cost more than the product saved (a pass over the state).
"""

from __future__ import annotations

import torch

from lipdeq.checks import check_int, check_real


class Anderson:
    """Anderson mixing with memory ``m``, relative regularisation ``lam`` and mixing ``beta``."""

    def __init__(self, z: torch.Tensor, *, m: int = 6, lam: float = 1e-4, beta: float = 1.0) -> None:
        check_int("anderson option m", m, minimum=1)
        check_real("anderson option lam", lam, above=0.0, inclusive=True)
        check_real("anderson option beta", beta, above=0.0)
        B, D = z.shape
        self.m, self.lam, self.beta = m, float(lam), float(beta)
        # history of images f(x_i) (by reference) and residuals f(x_i) - x_i; only filled slots are read
        self.F: list[torch.Tensor | None] = [None] * m
        self.G = torch.empty(B, m, D, dtype=z.dtype, device=z.device)
        # The small (m x m) system in at least float32: torch has no half/bfloat16 LU on CPU, and squared
        # residual norms overflow float16's range long before the state does.
        self.gram_dtype = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
        self.GG = torch.zeros(B, m, m, dtype=self.gram_dtype, device=z.device)  # Gram matrix G G^T
        self.ones = torch.ones(B, m, 1, dtype=self.gram_dtype, device=z.device)
        self.eye = torch.eye(m, dtype=self.gram_dtype, device=z.device)  # row j: weights of a plain Picard step
        self.count = 0
        self._row: tuple[int, torch.Tensor] | None = None  # (count, Gram row) taken by residual_sq_norm

    def residual_out(self) -> torch.Tensor:
        """The history slot that the next residual goes to (saves a copy per iteration)."""
        return self.G[:, self.count % self.m]

    def _gram_row(self, g: torch.Tensor) -> torch.Tensor:
        """Store ``g`` in its slot and return ``(B, n)``: ``<g_i, g>`` over the filled slots, ``g``'s included."""
        j, n = self.count % self.m, min(self.count + 1, self.m)
        if g.data_ptr() != self.G[:, j].data_ptr():
            self.G[:, j] = g
        # As g^T G^T, not G g: on CPU the latter is a ~10x slower gemv layout.
        gd = self.gram_dtype
        return torch.bmm(g.unsqueeze(1).to(gd), self.G[:, :n].transpose(1, 2).to(gd)).squeeze(1)

    def residual_sq_norm(self, g: torch.Tensor) -> torch.Tensor:
        """Compute the step's Gram row now and return its diagonal entry ``||g||^2`` (a pass saved).

        The step uses this row. Rows of samples whose ``g`` is not finite come out non-finite and stay
        in their own Gram matrices; those samples have stopped, so their steps are masked.
        """
        self._row = (self.count, self._gram_row(g))
        return self._row[1][:, self.count % self.m]

    def step(self, z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Store ``(f(z), g)`` in the history and return the Anderson-mixed next iterate."""
        j = self.count % self.m
        row = self._row[1] if self._row is not None and self._row[0] == self.count else self._gram_row(g)
        self._row = None
        if g.data_ptr() != self.G[:, j].data_ptr():  # the driver replaced g after the row was taken
            self.G[:, j] = g
        self.count += 1
        n = min(self.count, self.m)
        self.F[j] = fz
        self.GG[:, j, :n] = row
        self.GG[:, :n, j] = row
        if n == 1:
            return fz if self.beta == 1.0 else z + self.beta * g
        H = self.GG[:, :n, :n].clone()
        H.diagonal(dim1=1, dim2=2).mul_(1.0 + self.lam)  # H + lam diag(H)
        x, info = torch.linalg.solve_ex(H, self.ones[:, :n])
        total = x.sum(dim=1)  # (B, 1); NaN or Inf if any weight is
        ok = (info == 0) & (total.view(-1) > 0) & (total.view(-1) < torch.inf)
        alpha = torch.where(ok[:, None, None], (x / total[:, None]).transpose(1, 2), self.eye[j, :n]).to(fz.dtype)
        a = alpha.squeeze(1)  # (B, n)
        z_next = torch.mul(self.F[0], a[:, :1])
        for i in range(1, n):
            z_next.addcmul_(self.F[i], a[:, i:i + 1])
        if self.beta != 1.0:
            z_next = z_next - (1.0 - self.beta) * torch.bmm(alpha, self.G[:, :n]).squeeze(1)
        return z_next
