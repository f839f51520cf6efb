"""Simple kinds: one-shot, exponential (iterative), explicit steps, and user callables."""

from __future__ import annotations

import bisect
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._checks import (
    below_one,
    check_int,
    check_rate,
    check_real,
    check_sparsity,
    check_time,
)
from ._core import Schedule, fields_dict, register_schedule

__all__ = ["Constant", "Exponential", "FromCallable", "Steps"]


@register_schedule("constant")
@dataclass(frozen=True)
class Constant(Schedule):
    """One-shot pruning: ``sparsity`` from ``begin`` on (0 before), one update at ``begin``.

    >>> from prunekit.schedules import Constant
    >>> s = Constant(0.9, begin=5)
    >>> s(4), s(5), s(100), s.is_update(5), s.is_update(6)
    (0.0, 0.9, 0.9, True, False)
    """

    sparsity: float
    begin: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_sparsity("sparsity", self.sparsity))
        object.__setattr__(self, "begin", check_int("begin", self.begin))

    def __call__(self, t: int) -> float:
        return self.sparsity if check_time(t) >= self.begin else 0.0

    def is_update(self, t: int) -> bool:
        return check_time(t) == self.begin

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@register_schedule("exponential")
@dataclass(frozen=True)
class Exponential(Schedule):
    """Iterative pruning: each update removes ``rate`` of the weights that remain.

    Updates at ``begin, begin + frequency, ...``; after ``k`` of them the sparsity is
    ``1 - (1 - rate) ** k``, capped at ``final`` if given. Once the cap is reached there
    are no more updates. (Far along an uncapped schedule the value rounds to 1.0 in
    floating point; the largest float below 1 is returned instead.)

    >>> from prunekit.schedules import Exponential
    >>> s = Exponential(0.5, begin=0, frequency=10, final=0.8)
    >>> [s(t) for t in (0, 9, 10, 20, 30)], s.is_update(20), s.is_update(30)
    ([0.5, 0.5, 0.75, 0.8, 0.8], True, False)
    """

    rate: float
    begin: int = 0
    frequency: int = 1
    final: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", check_rate("rate", self.rate))
        object.__setattr__(self, "begin", check_int("begin", self.begin))
        object.__setattr__(self, "frequency", check_int("frequency", self.frequency, minimum=1))
        if self.final is not None:
            object.__setattr__(self, "final", check_sparsity("final", self.final))

    def _after(self, updates: int) -> float:
        value = 1.0 - (1.0 - self.rate) ** updates
        if self.final is not None:
            value = min(value, self.final)
        return below_one(value)

    def __call__(self, t: int) -> float:
        t = check_time(t)
        updates = 0 if t < self.begin else (t - self.begin) // self.frequency + 1
        return self._after(updates)

    def is_update(self, t: int) -> bool:
        t = check_time(t)
        if t < self.begin or (t - self.begin) % self.frequency:
            return False
        before = self._after((t - self.begin) // self.frequency)
        return self.final is None or before < self.final

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@register_schedule("steps")
@dataclass(frozen=True)
class Steps(Schedule):
    """Explicit ``(t, sparsity)`` points, held between them (0 before the first).

    Updates happen at the listed times, which must be strictly increasing.

    >>> from prunekit.schedules import Steps
    >>> s = Steps([(10, 0.5), (20, 0.75)])
    >>> [s(t) for t in (0, 10, 15, 20, 99)], s.is_update(20), s.is_update(21)
    ([0.0, 0.5, 0.5, 0.75, 0.75], True, False)
    """

    points: Sequence[tuple[int, float]]

    def __post_init__(self) -> None:
        if isinstance(self.points, str) or not isinstance(self.points, Sequence):
            raise TypeError(f"points={self.points!r} must be a sequence of (t, sparsity) pairs")
        if not self.points:
            raise ValueError("points=[] must hold at least one (t, sparsity) pair")
        points: list[tuple[int, float]] = []
        for i, point in enumerate(self.points):
            if isinstance(point, str) or not isinstance(point, Sequence) or len(point) != 2:
                raise TypeError(f"points[{i}]={point!r} must be a (t, sparsity) pair")
            t = check_int(f"points[{i}] time", point[0])
            sparsity = check_sparsity(f"points[{i}] sparsity", point[1])
            if points and t <= points[-1][0]:
                raise ValueError(
                    f"points[{i}] time={t} must be > the previous time {points[-1][0]} "
                    "(times must be strictly increasing, without duplicates)"
                )
            points.append((t, sparsity))
        object.__setattr__(self, "points", tuple(points))

    def __call__(self, t: int) -> float:
        index = bisect.bisect_right(self.points, check_time(t), key=lambda p: p[0])
        return self.points[index - 1][1] if index else 0.0

    def is_update(self, t: int) -> bool:
        t = check_time(t)
        index = bisect.bisect_left(self.points, t, key=lambda p: p[0])
        return index < len(self.points) and self.points[index][0] == t

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "points": [list(point) for point in self.points]}


def _reference(fn: Callable[..., Any]) -> str:
    """``"module:qualname"`` for an importable module-level function, else ``ValueError``."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        try:
            if _resolve(f"{module}:{qualname}") is fn:
                return f"{module}:{qualname}"
        except (ImportError, AttributeError, ValueError):
            pass
    raise ValueError(
        f"fn={fn!r} cannot be written to a dict: only a function that can be imported by "
        "'module:qualname' can (not a lambda, a nested function or a partial); "
        "define it with def at module level"
    )


def _resolve(reference: str) -> Callable[[int], float]:
    """Import ``"module:qualname"``."""
    module, sep, qualname = reference.partition(":")
    if not (sep and module and qualname):
        raise ValueError(f"fn={reference!r} must have the form 'module:qualname'")
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target  # type: ignore[no-any-return]


@register_schedule("callable")
@dataclass(frozen=True)
class FromCallable(Schedule):
    """A user function ``fn(t) -> sparsity``, checked on every call; updates every ``update_every``.

    A value outside [0, 1) (or NaN) raises ``ValueError`` naming it and ``t``. `to_dict`
    writes ``fn`` as ``"module:qualname"``, so only an importable module-level function
    serialises (a lambda raises ``ValueError``); `from_dict` imports it back.

    >>> import math
    >>> from prunekit.schedules import FromCallable
    >>> s = FromCallable(math.tanh, update_every=2)
    >>> round(s(1), 4), s.is_update(4), s.to_dict()
    (0.7616, True, {'kind': 'callable', 'fn': 'math:tanh', 'update_every': 2})
    """

    fn: Callable[[int], float]
    update_every: int = 1

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"fn={self.fn!r} must be callable")
        object.__setattr__(
            self, "update_every", check_int("update_every", self.update_every, minimum=1)
        )

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Schedule:
        if isinstance(fields.get("fn"), str):
            fields = {**fields, "fn": _resolve(fields["fn"])}
        return cls(**fields)

    def __call__(self, t: int) -> float:
        t = check_time(t)
        value = self.fn(t)
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        number = check_real(f"{name}(t={t}) returned value", value)
        if not 0.0 <= number < 1.0:
            raise ValueError(f"{name}(t={t}) returned {value!r}; a sparsity must be in [0, 1)")
        return number

    def is_update(self, t: int) -> bool:
        return check_time(t) % self.update_every == 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "fn": _reference(self.fn), "update_every": self.update_every}
