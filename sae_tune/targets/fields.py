"""Checks every variant type runs on construction: allowed words, and ints (not bools or strings) in a
range, optionally powers of two. Errors name the field as ``Owner.field``."""

from __future__ import annotations

from collections.abc import Mapping


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_fields(
    owner: str,
    obj: object,
    words: Mapping[str, tuple[str, ...]],
    ints: Mapping[str, tuple[int, int, bool]],
) -> None:
    """ValueError / TypeError naming the first field of ``obj`` outside its allowed words or int bounds
    (``ints`` maps a field to (lowest, highest, power of two))."""
    for name, allowed in words.items():
        value = getattr(obj, name)
        if type(value) is not str or value not in allowed:
            raise ValueError(f"{owner}.{name} must be one of {list(allowed)}, got {value!r}")
    for name, (lo, hi, pow2) in ints.items():
        value = getattr(obj, name)
        if type(value) is not int:
            raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{owner}.{name} must be in [{lo}, {hi}], got {value}")
        if pow2 and not is_pow2(value):
            raise ValueError(f"{owner}.{name} must be a power of two, got {value}")
