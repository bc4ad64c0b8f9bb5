"""Gradients of fixed points: implicit differentiation, phantom and Jacobian-free backward,
and Jacobian diagnostics (Hutchinson regulariser, spectral norm)."""

from lipdeq.gradients.fixed_point import BACKWARDS, fixed_point
from lipdeq.gradients.jacobian import jacobian_frobenius_penalty, jacobian_spectral_norm

__all__ = ["BACKWARDS", "fixed_point", "jacobian_frobenius_penalty", "jacobian_spectral_norm"]
