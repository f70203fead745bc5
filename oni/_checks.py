"""Argument checks shared by the public modules: one place for the messages users see."""
from __future__ import annotations

import numbers


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as an int, or a TypeError (not an int; bools are refused) / ValueError
    (below ``minimum``) naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
