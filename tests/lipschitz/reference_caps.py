"""Reference operator-norm caps for the tests: power iteration on one grid-shaped vector.

The library's :class:`lipdeq.lipschitz.OperatorNormCap` caps the circular convolution by a power
iteration per DFT frequency. These two references cap by the plain power iteration with
``F.conv2d`` / ``F.conv_transpose2d`` that most implementations use, on

* the same circular operator (``circular=True``): the same norm, reached far more slowly, because
  the singular values of neighbouring frequencies are close (measured: 10 steps per Adam step at
  lr 0.1 left 20% violations of the cap; 400 steps still up to 1.4%);
* the real zero-padded operator on the real input shape (``circular=False``): the least
  restrictive cap, equally slow, and the FFT certificate of a capped weight can exceed the cap
  (by about 2.5% on 8x8 inputs and 0.7% on 16x16 for random 3x3 kernels, more on 4x4 inputs).

The tests compare the library's cap with them; the library does not use them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lipdeq.lipschitz.operator_norm import (
    _effective_kernel,
    circular_grid_size,
    conv_adjoint,
    conv_apply,
    conv_padding,
)


class GridPowerIterationCap(nn.Module):
    """Parametrisation ``W -> W / max(1, sigma(W) / max_norm)``, sigma from one grid-shaped vector.

    ``v`` has shape (1, c_in, H', W'): the input shape (``circular=False``) or the circular grid
    ``N = n + 2p`` rounded up to a multiple of the stride (``circular=True``). Training mode advances
    ``v <- C^T C v / ||C^T C v||`` by ``n_power_iterations`` steps per call; sigma = ``||C(W) v||``
    (v is a unit vector) is differentiable in W.
    """

    v: Tensor

    def __init__(self, conv: nn.Conv2d, max_norm: float, input_size: tuple[int, int], *, circular: bool,
                 n_power_iterations: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        self.max_norm = float(max_norm)
        self.circular = circular
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.stride = tuple(conv.stride)
        self.padding = conv_padding(conv)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        if circular:
            k_eff = [_effective_kernel(conv.kernel_size[i], conv.dilation[i]) for i in range(2)]
            grid = [circular_grid_size(input_size[i], k_eff[i], self.padding[i], self.stride[i]) for i in range(2)]
            self.grid_size = (grid[0], grid[1])
        else:
            self.grid_size = (input_size[0], input_size[1])
        w = conv.weight
        v = torch.randn(1, conv.in_channels, *self.grid_size, dtype=w.dtype, device=w.device)
        self.register_buffer("v", v / v.norm().clamp_min(eps))

    def _apply_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return conv_apply(x, weight, self.stride, self.padding, self.dilation, self.groups, self.circular)

    def _adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        return conv_adjoint(y, weight, self.grid_size, self.stride, self.padding, self.dilation, self.groups,
                            self.circular)

    @torch.no_grad()
    def power_step(self, weight: Tensor, n_steps: int = 1) -> None:
        """Advance ``v`` by ``n_steps`` power-iteration steps on the detached ``weight``."""
        w = weight.detach()
        v = self.v.to(w.dtype)
        for _ in range(n_steps):
            z = self._adjoint(self._apply_op(v, w), w)
            nrm = z.norm()
            if not torch.isfinite(nrm) or nrm <= self.eps:
                break  # zero (or non-finite) weight: keep the current direction
            v = z / nrm
        self.v.copy_(v)

    @torch.no_grad()
    def warm_up(self, weight: Tensor, max_iterations: int, tol: float) -> float:
        """Power iteration in rounds of 10 steps until sigma changes by less than ``tol`` (relative)
        between rounds, at most ``max_iterations`` steps; returns sigma."""
        prev, sigma, done = 0.0, 0.0, 0
        while done < max_iterations:
            steps = min(10, max_iterations - done)
            self.power_step(weight, steps)
            done += steps
            sigma = float(self.sigma(weight))
            if abs(sigma - prev) <= tol * max(sigma, self.eps):
                break
            prev = sigma
        return sigma

    def sigma(self, weight: Tensor) -> Tensor:
        """``||C(W) v||``: a lower bound of the operator's norm, differentiable in ``weight``."""
        v = self.v.clone() if self.training else self.v
        return self._apply_op(v.to(weight.dtype), weight).square().sum().clamp_min(self.eps**2).sqrt()

    def forward(self, weight: Tensor) -> Tensor:
        """``weight / max(1, sigma / max_norm)``, advancing the power iteration in training mode."""
        if self.training and self.n_power_iterations > 0:
            self.power_step(weight, self.n_power_iterations)
        return weight / torch.clamp(self.sigma(weight) / self.max_norm, min=1.0)


def apply_reference_cap(conv: nn.Conv2d, max_norm: float, input_size: tuple[int, int], *, circular: bool,
                        warmup_iterations: int = 500, warmup_tol: float = 1e-7) -> GridPowerIterationCap:
    """Warm up a :class:`GridPowerIterationCap` on ``conv``'s current weight, register it on
    ``conv.weight`` (after existing parametrisations) and return it."""
    cap = GridPowerIterationCap(conv, max_norm, input_size, circular=circular)
    cap.warm_up(conv.weight.detach(), warmup_iterations, warmup_tol)
    parametrize.register_parametrization(conv, "weight", cap)
    return cap
