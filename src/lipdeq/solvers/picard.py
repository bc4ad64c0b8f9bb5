"""Picard (fixed-point) iteration with optional damping: ``z <- (1 - tau) z + tau f(z)``."""

from __future__ import annotations

import torch

from lipdeq.checks import check_real


class Picard:
    """Damped Picard step; ``tau = 1`` is the plain iteration ``z <- f(z)``."""

    def __init__(self, z: torch.Tensor, *, tau: float = 1.0) -> None:
        check_real("picard option tau", tau, above=0.0)
        self.tau = float(tau)

    def residual_out(self) -> None:
        """No residual buffer: the driver allocates the residual."""
        return None

    def residual_sq_norm(self, g: torch.Tensor) -> None:
        """Not computed here: the driver takes the norm."""
        return None

    def step(self, z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Return ``z + tau (f(z) - z)``."""
        return fz if self.tau == 1.0 else z + self.tau * g
