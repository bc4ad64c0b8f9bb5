"""Containers that compose Lipschitz blocks and certify the composition.

* :class:`LipschitzSequential`: ``nn.Sequential`` with a :meth:`~LipschitzSequential.lipschitz_bound`
  (product of the blocks' bounds, tightened where linear pieces meet: docs/MATH.md section 10);
* :class:`Mix`: ``sum_k c_k f_k(x)``, bound ``sum_k |c_k| Lip(f_k)`` (a residual
  ``(1 - alpha) x + alpha f(x)`` is :func:`convex_residual`);
* :class:`BlockMatrix`: parallel branches ``y_i = sum_j f_ij(x_j)`` on lists of tensors, bound the
  spectral norm of the matrix of the blocks' bounds (section 4.2).

They nest freely (a Mix inside a LipschitzSequential inside a BlockMatrix) and plain
``nn.Sequential`` works in their place; :func:`lipschitz.lipschitz_bound` certifies any of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lipdeq.lipschitz.blocks import BoundOptions, lipschitz_bound, module_atoms
from lipdeq.lipschitz.certificate import LipschitzCertificate
from lipdeq.lipschitz.chain import chain_bound
from lipdeq.lipschitz.compose import Bound, block_matrix, mix
from lipdeq.lipschitz.operator_norm import _pair

__all__ = ["BlockMatrix", "LipschitzSequential", "Mix", "convex_residual"]


class LipschitzSequential(nn.Sequential):
    """``nn.Sequential`` that certifies itself: :meth:`lipschitz_bound`."""

    def lipschitz_bound(self, input_size: int | tuple[int, int] | None = None, *, training: bool | None = None,
                        mode: Literal["weights", "hyper"] = "weights", tighten: bool = True) -> LipschitzCertificate:
        """Certified l2 Lipschitz bound of the chain on inputs of spatial ``input_size`` (see
        :func:`lipdeq.lipschitz.lipschitz_bound`)."""
        return lipschitz_bound(self, input_size, training=training, mode=mode, tighten=tighten)


class Mix(nn.Module):
    """``x -> sum_k coefficients[k] * modules[k](x)``; Lipschitz bound ``sum_k |c_k| L_k``."""

    def __init__(self, modules: Sequence[nn.Module], coefficients: Sequence[float]) -> None:
        super().__init__()
        if len(modules) == 0 or len(modules) != len(coefficients):
            raise ValueError(f"need one coefficient per module, got {len(modules)} modules and "
                             f"{len(coefficients)} coefficients")
        coefs = [float(c) for c in coefficients]
        if not all(math.isfinite(c) for c in coefs):
            raise ValueError(f"coefficients must be finite, got {coefs}")
        self.terms = nn.ModuleList(modules)
        self.coefficients = coefs

    def forward(self, x: Tensor) -> Tensor:
        out = None
        for c, m in zip(self.coefficients, self.terms):
            term = c * m(x)
            out = term if out is None else out + term
        return out

    def _lipschitz_node(self, size: tuple[int, int] | int | None, opts: BoundOptions,
                        name: str) -> tuple[Bound, tuple[int, int] | None]:
        """The :class:`Bound` of the mix on inputs of ``size``, and its output size."""
        name = name or "Mix"
        size = None if size is None else _pair(size, "input_size", 1)
        terms, out = [], None
        for k, (c, m) in enumerate(zip(self.coefficients, self.terms)):
            atoms, term_out = module_atoms(m, size, opts, f"{name}.{k}")
            terms.append((c, chain_bound(atoms, f"{name}.{k}", tighten=opts.tighten)))
            out = out if out is not None else term_out
        return mix(terms, name=name), out

    def lipschitz_bound(self, input_size: int | tuple[int, int] | None = None, *, training: bool | None = None,
                        mode: Literal["weights", "hyper"] = "weights", tighten: bool = True) -> LipschitzCertificate:
        """Certified l2 Lipschitz bound (see :func:`lipdeq.lipschitz.lipschitz_bound`)."""
        return lipschitz_bound(self, input_size, training=training, mode=mode, tighten=tighten)

    def extra_repr(self) -> str:
        return f"coefficients={self.coefficients}"


def convex_residual(module: nn.Module, alpha: float) -> Mix:
    """``x -> (1 - alpha) x + alpha module(x)``: bound ``|1 - alpha| + |alpha| Lip(module)``."""
    return Mix([nn.Identity(), module], [1.0 - float(alpha), float(alpha)])


class BlockMatrix(nn.Module):
    """Parallel branches on lists of tensors: ``y_i = sum_j blocks[i][j](x_j)`` (None: no path).

    Bound (l2 over all branches together): the spectral norm of ``[Lip(blocks[i][j])]``.
    """

    def __init__(self, blocks: Sequence[Sequence[nn.Module | None]]) -> None:
        super().__init__()
        rows = [list(r) for r in blocks]
        if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError("blocks must be a non-empty rectangular list of lists of modules (or None)")
        if any(all(b is None for b in r) for r in rows):
            raise ValueError("every output branch needs at least one block")
        self.shape = (len(rows), len(rows[0]))
        self.present = [[b is not None for b in r] for r in rows]
        self.blocks = nn.ModuleList(nn.ModuleList(b if b is not None else nn.Identity() for b in r) for r in rows)

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        if len(xs) != self.shape[1]:
            raise ValueError(f"expected {self.shape[1]} input branches, got {len(xs)}")
        out = []
        for i in range(self.shape[0]):
            terms = [self.blocks[i][j](xs[j]) for j in range(self.shape[1]) if self.present[i][j]]
            out.append(torch.stack(terms).sum(0) if len(terms) > 1 else terms[0])
        return out

    def _lipschitz_node(self, input_sizes: Sequence | None, opts: BoundOptions,
                        name: str) -> tuple[Bound, None]:
        """The :class:`Bound` of the block matrix (one input size per input branch)."""
        cols = self.shape[1]
        sizes = [None] * cols if input_sizes is None else [None if s is None else _pair(s, "input_sizes[j]", 1)
                                                           for s in input_sizes]
        if len(sizes) != cols:
            raise ValueError(f"input_sizes must give one size per input branch ({cols}), got {len(sizes)}")
        entries = []
        for i in range(self.shape[0]):
            row = []
            for j in range(cols):
                label = f"{name}[{i},{j}]"
                if not self.present[i][j]:
                    row.append(Bound(label, 0.0, note="no path"))
                    continue
                atoms, _ = module_atoms(self.blocks[i][j], sizes[j], opts, label)
                row.append(chain_bound(atoms, label, tighten=opts.tighten))
            entries.append(row)
        return block_matrix(entries, name=name), None

    def lipschitz_bound(self, input_size: Sequence[int | tuple[int, int] | None] | None = None, *,
                        training: bool | None = None, mode: Literal["weights", "hyper"] = "weights",
                        tighten: bool = True) -> LipschitzCertificate:
        """Certified l2 Lipschitz bound; ``input_size``: one spatial size per input branch."""
        return lipschitz_bound(self, input_size, training=training, mode=mode, tighten=tighten)
