"""lipdeq: deep equilibrium models with guaranteed and certified fixed-point convergence.

Top-level names are imported lazily so that ``lipdeq --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "fixed_point": "lipdeq.gradients",
    "solve": "lipdeq.solvers",
    "Solution": "lipdeq.solvers",
    "Status": "lipdeq.solvers",
    "LipdeqError": "lipdeq.errors",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lipdeq' has no attribute {name!r}")
