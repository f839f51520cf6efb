"""Argument checks shared by every schedule: one place, one wording for errors."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable


def check_int(name: str, value: object, *, minimum: int = 0) -> int:
    """Require an int (not a bool) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    return int(value)


def check_time(t: object) -> int:
    """Require a time ``t`` that is a non-negative int."""
    return check_int("t", t)


def check_real(name: str, value: object) -> float:
    """Require a real number (not a bool) and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a real number, got {type(value).__name__}")
    return float(value)


def check_sparsity(name: str, value: object) -> float:
    """Require a sparsity in [0, 1) (NaN fails)."""
    number = check_real(name, value)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1)")
    return number


def check_rate(name: str, value: object) -> float:
    """Require a pruning rate in (0, 1) (NaN fails)."""
    number = check_real(name, value)
    if not 0.0 < number < 1.0:
        raise ValueError(f"{name}={value!r} must be in (0, 1)")
    return number


def check_positive(name: str, value: object) -> float:
    """Require a finite real number > 0."""
    number = check_real(name, value)
    if not (number > 0.0 and math.isfinite(number)):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
    return number


_BELOW_ONE = math.nextafter(1.0, 0.0)


def below_one(value: float) -> float:
    """``value``, or the largest float below 1 where ``1 - tiny`` rounded up to 1.0."""
    return min(value, _BELOW_ONE)


def suggest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean ...?)' hint for an unknown name, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
