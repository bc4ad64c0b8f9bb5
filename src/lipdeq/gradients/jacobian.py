"""Jacobian diagnostics of a fixed-point map: the Hutchinson regulariser and the spectral norm."""

from __future__ import annotations

from collections.abc import Callable

import torch


def jacobian_frobenius_penalty(
    f_out: torch.Tensor,
    z_in: torch.Tensor,
    *,
    n_samples: int = 1,
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Hutchinson estimate of ``||J||_F^2 / dim`` with ``J = d f_out / d z_in`` (Bai et al. 2021).

    ``E_v ||v^T J||^2 = ||J||_F^2`` for ``v ~ N(0, I)``; the estimate is averaged over
    ``n_samples`` probes and divided by ``z_in.numel()``, as in the Jacobian-regularised MDEQ.
    ``f_out`` must have been computed from ``z_in`` with gradients enabled.

    Returns:
        A scalar tensor, differentiable in the parameters of ``f`` when ``create_graph``.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if not f_out.requires_grad:
        raise ValueError("f_out does not require grad: evaluate f(z_in) with gradients enabled")
    total = f_out.new_zeros(())
    for _ in range(n_samples):
        v = torch.randn(f_out.shape, generator=generator, dtype=f_out.dtype).to(f_out.device)
        (vjp,) = torch.autograd.grad(f_out, z_in, v, retain_graph=True, create_graph=create_graph)
        total = total + vjp.pow(2).sum()
    return total / (n_samples * z_in.numel())


def jacobian_spectral_norm(
    f: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    *,
    n_iter: int = 30,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample spectral norm ``||J_b||_2`` of ``J = df/dz`` at ``z`` by power iteration on ``J^T J``.

    Uses one Jacobian-vector product (forward-mode through the double-vjp trick) and one
    vector-Jacobian product per step. Assumes the samples of the batch do not interact (the
    Jacobian is block-diagonal over the batch), which holds for DEQ maps in eval mode. The result
    is a lower bound that converges to the true norm from below.

    Returns:
        A ``(B,)`` tensor of estimates, detached.
    """
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    batch = z.shape[0]
    z = z.detach().requires_grad_()
    with torch.enable_grad():
        out = f(z)
        if out.shape != z.shape:
            raise ValueError(f"f maps shape {tuple(z.shape)} to {tuple(out.shape)}; they must agree")
        # The double-vjp trick gives J v from the graph of u -> J^T u, which is linear in u.
        u = torch.zeros_like(out, requires_grad=True)
        (jt_u,) = torch.autograd.grad(out, z, u, create_graph=True)
        v = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        sigma = z.new_zeros(batch)
        for _ in range(n_iter):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(batch, *([1] * (z.dim() - 1)))
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            (jtjv,) = torch.autograd.grad(out, z, jv, retain_graph=True)
            sigma = jv.flatten(1).norm(dim=1)
            v = jtjv
    return sigma.detach()
