"""Shared oracles for the lipschitz tests: dense matrices of linear maps and empirical Lipschitz constants."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor


def dense_matrix(op: Callable[[Tensor], Tensor], in_shape: tuple[int, ...]) -> Tensor:
    """Dense float64 matrix of a batch-wise linear map ``op`` on single inputs of ``in_shape`` (1, ...).

    Column j is ``op(e_j)``: all basis vectors are pushed through ``op`` as one batch.
    """
    if in_shape[0] != 1:
        raise ValueError("in_shape must describe a single sample (1, ...)")
    n = 1
    for d in in_shape:
        n *= d
    with torch.no_grad():
        images = op(torch.eye(n, dtype=torch.float64).reshape(n, *in_shape[1:]))
    return images.reshape(n, -1).T.contiguous()


def spectral_norm(m: Tensor) -> float:
    """Largest singular value of a dense matrix (float64)."""
    return float(torch.linalg.matrix_norm(m.detach().to(torch.float64), ord=2))


def empirical_lipschitz(f: Callable[[Tensor], Tensor], shape: tuple[int, ...], n_pairs: int = 64,
                        n_points: int = 2, seed: int = 0) -> float:
    """Lower bound of Lip(f): max over random pairs of ||f(x)-f(y)||/||x-y|| (at several distances)
    and over random points of the spectral norm of the dense Jacobian (autograd)."""
    g = torch.Generator().manual_seed(seed)
    batch = (n_pairs, *shape[1:])  # f acts sample by sample (shape[0] == 1): all pairs in one batch
    x = torch.randn(batch, generator=g, dtype=torch.float64)
    scale = 10.0 ** torch.empty(n_pairs, *([1] * (len(shape) - 1)), dtype=torch.float64).uniform_(
        -3.0, 0.0, generator=g)
    y = x + scale * torch.randn(batch, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ratios = (f(x) - f(y)).reshape(n_pairs, -1).norm(dim=1) / (x - y).reshape(n_pairs, -1).norm(dim=1)
    best = float(ratios.max())
    n = 1
    for d in shape:
        n *= d
    for _ in range(n_points):
        # Dense Jacobian by forward-mode AD: one batch holding x once per input coordinate, with the
        # basis vectors as tangents (f acts sample by sample, shape[0] == 1).
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        with torch.no_grad(), fwAD.dual_level():
            primal = x.expand(n, *shape[1:]).contiguous()
            tangent = torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])
            out = fwAD.unpack_dual(f(fwAD.make_dual(primal, tangent))).tangent
        best = max(best, spectral_norm(out.reshape(n, -1).T))
    return best


@pytest.fixture
def oracles() -> SimpleNamespace:
    """The oracles: ``dense(op, in_shape)``, ``norm(matrix)``, ``empirical(f, shape)``."""
    return SimpleNamespace(dense=dense_matrix, norm=spectral_norm, empirical=empirical_lipschitz)
