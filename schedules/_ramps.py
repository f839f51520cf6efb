"""Ramps from ``initial`` to ``final`` over a window ``[begin, end]``: polynomial, linear, cosine."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

from ._checks import check_int, check_positive, check_sparsity, check_time
from ._core import Schedule, fields_dict, register_schedule

__all__ = ["Cosine", "Linear", "Polynomial"]


@dataclass(frozen=True)
class _Ramp(Schedule):
    """Shared window logic; subclasses give the shape of the ramp.

    Updates happen at ``begin, begin + frequency, ...`` inside the window and at ``end``.
    Between two update points the value is held at the value of the most recent one, so
    ``s(t)`` always equals the sparsity the pruner was last told. Before ``begin`` the
    value is ``initial``; from ``end`` on it is ``final``.
    """

    initial: float
    final: float
    begin: int
    end: int
    frequency: int = 1

    def __post_init__(self) -> None:
        initial = check_sparsity("initial", self.initial)
        final = check_sparsity("final", self.final)
        if final < initial:
            raise ValueError(f"final={self.final!r} must be >= initial={self.initial!r}")
        begin = check_int("begin", self.begin)
        end = check_int("end", self.end)
        if end <= begin:
            raise ValueError(f"end={self.end!r} must be > begin={self.begin!r}")
        frequency = check_int("frequency", self.frequency, minimum=1)
        for name, value in [
            ("initial", initial),
            ("final", final),
            ("begin", begin),
            ("end", end),
            ("frequency", frequency),
        ]:
            object.__setattr__(self, name, value)

    @abc.abstractmethod
    def _progress(self, x: float) -> float:
        """The fraction of the way from initial to final at ``x`` in [0, 1]; 0 at 0."""

    def __call__(self, t: int) -> float:
        t = check_time(t)
        if t < self.begin:
            return self.initial
        if t >= self.end:
            return self.final
        last_update = t - (t - self.begin) % self.frequency
        x = (last_update - self.begin) / (self.end - self.begin)
        value = self.initial + (self.final - self.initial) * self._progress(x)
        return min(value, self.final)  # guards against rounding one ulp past final

    def is_update(self, t: int) -> bool:
        t = check_time(t)
        on_grid = self.begin <= t < self.end and (t - self.begin) % self.frequency == 0
        return on_grid or t == self.end

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@register_schedule("polynomial")
@dataclass(frozen=True)
class Polynomial(_Ramp):
    """Gradual pruning of Zhu & Gupta (2017), power 3 by default.

    ``s(t) = final + (initial - final) * (1 - (u - begin) / (end - begin)) ** power``,
    where ``u`` is the most recent update point ``begin + k * frequency <= t``: the value
    is held between update points. ``initial`` before ``begin``, ``final`` from ``end`` on;
    updates at ``begin + k * frequency`` inside the window and at ``end``.

    >>> from prunekit.schedules import Polynomial
    >>> s = Polynomial(0.0, 0.9, begin=0, end=100)
    >>> round(s(50), 4), s(100), s(1000)
    (0.7875, 0.9, 0.9)
    """

    power: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "power", check_positive("power", self.power))

    def _progress(self, x: float) -> float:
        return 1.0 - (1.0 - x) ** self.power


@register_schedule("linear")
@dataclass(frozen=True)
class Linear(_Ramp):
    """A straight ramp: ``s(t) = initial + (final - initial) * (u - begin) / (end - begin)``.

    ``u`` is the most recent update point, as in `Polynomial`.

    >>> from prunekit.schedules import Linear
    >>> s = Linear(0.0, 0.8, begin=10, end=20, frequency=5)
    >>> [s(t) for t in (0, 10, 14, 15, 20)]
    [0.0, 0.0, 0.0, 0.4, 0.8]
    """

    def _progress(self, x: float) -> float:
        return x


@register_schedule("cosine")
@dataclass(frozen=True)
class Cosine(_Ramp):
    """A half-cosine ramp: ``initial + (final - initial) * (1 - cos(pi * x)) / 2``.

    ``x = (u - begin) / (end - begin)`` with ``u`` the most recent update point.

    >>> from prunekit.schedules import Cosine
    >>> s = Cosine(0.0, 0.8, begin=0, end=10)
    >>> round(s(5), 6), s(10)
    (0.4, 0.8)
    """

    def _progress(self, x: float) -> float:
        return (1.0 - math.cos(math.pi * x)) / 2.0
