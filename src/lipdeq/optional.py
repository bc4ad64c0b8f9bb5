"""Optional dependencies, imported on demand with a message that names the extra to install."""

from __future__ import annotations

from types import ModuleType

from lipdeq.errors import LipdeqError

__all__ = ["MissingExtraError", "pyplot"]


class MissingExtraError(LipdeqError, ImportError):
    """An optional dependency is needed for what was asked and is not installed."""


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or a clear error naming ``lipdeq[plots]``."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError(
            "plotting needs matplotlib, which is not installed: pip install 'lipdeq[plots]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
