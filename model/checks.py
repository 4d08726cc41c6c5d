"""Argument checks shared by the later stages' student files (given code, not an exercise).

``model/lora_variants.py`` (Stage 5) and ``training/memory.py`` (Stage 6) check their arguments with
these, so every error names the argument and its allowed values in the same words.
"""

from __future__ import annotations

import math


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise a ValueError unless ``value`` is an int >= ``minimum`` (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_number(
    name: str, value: object, low: float, high: float, *, open_low: bool = False, open_high: bool = False
) -> None:
    """Raise a ValueError unless ``value`` is a finite number in [low, high] (an open end if asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        if math.isinf(low) and math.isinf(high):
            where = ""
        elif math.isinf(high):
            where = f" {'>' if open_low else '>='} {low:g}"
        else:
            where = f" in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
