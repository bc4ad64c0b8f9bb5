"""Argument validators shared by the whole package (one copy, one convention).

A value of the wrong type raises ``TypeError``; a value of the right type outside its range raises
``ValueError``. ``bool`` is never accepted as a number.
"""

from __future__ import annotations

import math

__all__ = ["check_int", "check_real"]


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[minimum, maximum]`` (either end optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_real(
    name: str,
    value: object,
    *,
    above: float | None = None,
    inclusive: bool = False,
    below: float | None = None,
    below_inclusive: bool = False,
    finite: bool = True,
) -> float:
    """Return ``value`` as a float if it is a real number in the given open/closed interval.

    ``above``/``below`` are the ends (None: unbounded); ``inclusive``/``below_inclusive`` close them.
    NaN is always refused; infinities unless ``finite=False``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a real number, got nan")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    low_bad = above is not None and (value < above or (value == above and not inclusive))
    high_bad = below is not None and (value > below or (value == below and not below_inclusive))
    if low_bad or high_bad:
        parts = []
        if above is not None:
            parts.append(f"{'>=' if inclusive else '>'} {above}")
        if below is not None:
            parts.append(f"{'<=' if below_inclusive else '<'} {below}")
        raise ValueError(f"{name} must be {' and '.join(parts)}, got {value!r}")
    return float(value)
