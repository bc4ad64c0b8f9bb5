"""One conversion of results to strict JSON (no NaN/Infinity literals, no tuples or tensors)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["json_safe"]


def json_safe(obj: Any) -> Any:
    """Return ``obj`` with non-finite floats as strings (``"inf"``, ``"nan"``), mapping keys as
    strings, tuples as lists, paths as strings and 0-dim tensors / numpy scalars as Python numbers."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    item = getattr(obj, "item", None)  # torch / numpy scalars
    if callable(item) and getattr(obj, "ndim", 0) == 0:
        return json_safe(item())
    return obj
