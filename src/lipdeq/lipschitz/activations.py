"""Scaled ReLU: ``slope * relu(x)``, Lipschitz ``|slope|``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lipdeq.checks import check_real

__all__ = ["ScaledReLU"]


class ScaledReLU(nn.Module):
    """``slope * max(0, x)`` elementwise; Lipschitz constant ``|slope|`` in any norm."""

    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = check_real("slope", slope)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``slope * relu(x)``."""
        return torch.relu(x) if self.slope == 1.0 else torch.relu(x) * self.slope

    def lipschitz_constant(self) -> float:
        """``|slope|``."""
        return abs(self.slope)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"
