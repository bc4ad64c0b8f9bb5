"""Empirical Lipschitz estimates: lower bounds that a certificate must never fall below.

A certificate is an upper bound of Lip(F); every number computed here is a lower bound of it (up
to the convergence of the iteration and floating-point rounding): the norm ``||J v||`` of the
Jacobian applied to a unit vector, and the ratio ``||F(a) - F(b)|| / ||a - b||`` of a pair. Tests
and ``lipdeq certify --checkpoint`` compare the two; run them in float64, where round-off cannot
fake a ratio.

Every function takes a *batch-separable* map ``F``: (B, ...) -> (B, ...), sample b of the output
depending only on sample b of the input (an eval-mode DEQ map or classifier is one), and returns
per-sample figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from lipdeq.checks import check_int

__all__ = ["EmpiricalLipschitz", "empirical_lipschitz", "jacobian_norm", "pair_ascent"]

Map = Callable[[Tensor], Tensor]


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _unit(t: Tensor) -> Tensor:
    n = _per_sample_norm(t).clamp_min(torch.finfo(t.dtype).tiny)
    return t / n.view(-1, *([1] * (t.dim() - 1)))


def _rms(t: Tensor) -> Tensor:
    """Per-sample root-mean-square, shaped to broadcast over ``t`` (1 where the sample is zero)."""
    r = t.flatten(1).pow(2).mean(dim=1).sqrt()
    r = torch.where(r > 0, r, torch.ones_like(r))
    return r.view(-1, *([1] * (t.dim() - 1)))


def _check_batch(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a batch tensor of shape (B, ...) with B >= 1, got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def jacobian_norm(
    f: Map,
    x: Tensor,
    *,
    iters: int = 50,
    jvp: Literal["autograd", "finite_difference"] = "autograd",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample estimate of ``||J_f(x_b)||_2`` by power iteration on ``J^T J``; shape (B,).

    ``J^T u`` comes from one backward pass (first-order autograd, so an implicit-differentiation
    backward such as the DEQ's IFT hook is fine). ``J v`` comes from the double-backward trick
    (``jvp="autograd"``, exact) or, for maps whose backward is not itself differentiable (a DEQ
    solved with an implicit backward), from central differences with step ``1e-4 * rms(x_b)``
    (``jvp="finite_difference"``: error of order ``h^2``, negligible in float64). The returned
    value is the largest ``||J v||`` seen over unit vectors ``v``, which is a lower bound of the
    Jacobian's norm, hence of Lip(f), whatever the number of iterations.
    """
    _check_batch(x, "x")
    check_int("iters", iters, minimum=1)
    if jvp not in ("autograd", "finite_difference"):
        raise ValueError(f"jvp must be 'autograd' or 'finite_difference', got {jvp!r}")
    x = x.detach()
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        y = f(xg)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"f changed the batch size: {x.shape[0]} -> {y.shape[0]}")
    h = 1e-4 * _rms(x)

    def vjp(u: Tensor, create_graph: bool = False) -> Tensor:
        (g,) = torch.autograd.grad(y, xg, u, retain_graph=True, create_graph=create_graph)
        return g

    def jv(v: Tensor) -> Tensor:
        if jvp == "finite_difference":
            with torch.no_grad():
                return (f(x + h * v) - f(x - h * v)) / (2.0 * h.view(-1, *([1] * (y.dim() - 1))))
        # J v = d/du <J^T u, v>: J^T u is linear in u, so its gradient in u is exact
        u = torch.zeros_like(y, requires_grad=True)
        with torch.enable_grad():
            g = vjp(u, create_graph=True)
            (out,) = torch.autograd.grad(g, u, v)
        return out

    v = _unit(torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device))
    best = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        w = jv(v)
        best = torch.maximum(best, _per_sample_norm(w).detach())
        g = vjp(_unit(w).detach())
        if not bool(_per_sample_norm(g).gt(0).all()):
            break  # J^T J v = 0 for some sample: v lies in the kernel; keep what was seen
        v = _unit(g.detach())
    return best


def pair_ascent(f: Map, a: Tensor, b: Tensor, *, steps: int = 50, lr: float = 0.05) -> Tensor:
    """Per-sample ``max ||f(a') - f(b')|| / ||a' - b'||`` found by gradient ascent from ``(a, b)``.

    Both points move (Adam on ``log`` of the ratio, in units of each sample's RMS, so ``lr`` is
    relative to the data's scale); the best ratio seen, including the starting pair, is returned:
    every value is a ratio of an actual pair, hence a lower bound of Lip(f). Shape (B,).
    """
    _check_batch(a, "a")
    if not isinstance(b, Tensor) or b.shape != a.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {getattr(b, 'shape', b)!r}")
    check_int("steps", steps, minimum=0)
    scale = _rms(a.detach())
    pa = torch.zeros_like(a, requires_grad=True)
    pb = torch.zeros_like(b, requires_grad=True)
    opt = torch.optim.Adam([pa, pb], lr=lr)
    best = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    tiny = torch.finfo(a.dtype).tiny
    for step in range(steps + 1):
        with torch.enable_grad():
            ap, bp = a.detach() + scale * pa, b.detach() + scale * pb
            num = _per_sample_norm(f(ap) - f(bp))
            den = _per_sample_norm(ap - bp)
            ratio = num / den.clamp_min(tiny)
            valid = den > 0
            best = torch.where(valid, torch.maximum(best, ratio.detach()), best)
            if step == steps:
                break
            loss = -torch.log(ratio.clamp_min(tiny))[valid].sum()
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                opt.step()
    return best


@dataclass(frozen=True)
class EmpiricalLipschitz:
    """Largest empirical lower bounds of Lip(f): ``value`` is the max of the three methods."""

    value: float
    jacobian_data: float
    jacobian_random: float
    pairs: float

    def to_dict(self) -> dict[str, float]:
        """The four figures as a JSON-ready dict."""
        return asdict(self)


def empirical_lipschitz(
    f: Map,
    x: Tensor,
    *,
    random_points: Tensor | None = None,
    iters: int = 50,
    ascent_steps: int = 50,
    jvp: Literal["autograd", "finite_difference"] = "autograd",
    generator: torch.Generator | None = None,
) -> EmpiricalLipschitz:
    """Largest lower bound of Lip(f) from three methods: Jacobian power iteration at the data
    points ``x`` and at ``random_points`` (default: Gaussian points with each sample's RMS, as
    many as ``x``), and pair ascent from ``(x, x + delta)`` with a 1% Gaussian ``delta``."""
    _check_batch(x, "x")
    x = x.detach()

    def randn_like(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device)

    if random_points is None:
        random_points = randn_like(x) * _rms(x)
    _check_batch(random_points, "random_points")
    jd = float(jacobian_norm(f, x, iters=iters, jvp=jvp, generator=generator).max())
    jr = float(jacobian_norm(f, random_points, iters=iters, jvp=jvp, generator=generator).max())
    pr = float(pair_ascent(f, x, x + 0.01 * _rms(x) * randn_like(x), steps=ascent_steps).max())
    return EmpiricalLipschitz(value=max(jd, jr, pr), jacobian_data=jd, jacobian_random=jr, pairs=pr)
