"""Input checks shared by the modules that take user numbers."""

from __future__ import annotations

import math
import numbers


def finite(value, name: str = "alpha") -> float:
    """``value`` as a float, or a ValueError naming it when it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not a finite number")
    return float(value)
