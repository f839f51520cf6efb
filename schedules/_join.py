"""End-to-end composition of schedules (optax ``join_schedules`` semantics)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._checks import check_int, check_time
from ._core import Schedule, from_dict, register_schedule

__all__ = ["Join", "join"]


@register_schedule("join")
@dataclass(frozen=True)
class Join(Schedule):
    """Schedules joined end to end: for ``t >= boundaries[i]``, ``schedules[i + 1]`` is used
    at the shifted time ``t - boundaries[i]``; ``is_update`` delegates the same way.

    Needs ``len(boundaries) == len(schedules) - 1`` and strictly increasing boundaries
    ``> 0``. Serialises as ``{kind: join, schedules: [...], boundaries: [...]}``.

    >>> from prunekit.schedules import Constant, Join, Linear
    >>> s = Join([Constant(0.0), Linear(0.0, 0.5, begin=0, end=5), Constant(0.5)], [10, 15])
    >>> [s(t) for t in (0, 9, 10, 12, 15, 99)]
    [0.0, 0.0, 0.0, 0.2, 0.5, 0.5]
    """

    schedules: Sequence[Schedule]
    boundaries: Sequence[int]

    def __post_init__(self) -> None:
        for name in ("schedules", "boundaries"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise TypeError(f"{name}={value!r} must be a sequence")
        if not self.schedules:
            raise ValueError("schedules=[] must hold at least one schedule")
        for i, schedule in enumerate(self.schedules):
            if not isinstance(schedule, Schedule):
                raise TypeError(f"schedules[{i}]={schedule!r} must be a Schedule")
        if len(self.boundaries) != len(self.schedules) - 1:
            raise ValueError(
                f"boundaries={list(self.boundaries)!r} must hold len(schedules) - 1 = "
                f"{len(self.schedules) - 1} times"
            )
        boundaries: list[int] = []
        for i, boundary in enumerate(self.boundaries):
            boundaries.append(check_int(f"boundaries[{i}]", boundary, minimum=1))
            if i and boundaries[i] <= boundaries[i - 1]:
                raise ValueError(
                    f"boundaries[{i}]={boundary!r} must be > boundaries[{i - 1}]="
                    f"{boundaries[i - 1]} (boundaries must be strictly increasing)"
                )
        object.__setattr__(self, "schedules", tuple(self.schedules))
        object.__setattr__(self, "boundaries", tuple(boundaries))

    def _locate(self, t: int) -> tuple[Schedule, int]:
        index = bisect.bisect_right(self.boundaries, t)
        start = self.boundaries[index - 1] if index else 0
        return self.schedules[index], t - start

    def __call__(self, t: int) -> float:
        schedule, local = self._locate(check_time(t))
        return schedule(local)

    def is_update(self, t: int) -> bool:
        schedule, local = self._locate(check_time(t))
        return schedule.is_update(local)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "schedules": [schedule.to_dict() for schedule in self.schedules],
            "boundaries": list(self.boundaries),
        }

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Schedule:
        schedules = fields["schedules"]
        if isinstance(schedules, list):
            schedules = [from_dict(s) if isinstance(s, dict) else s for s in schedules]
        return cls(**{**fields, "schedules": schedules})


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Join:
    """Join ``schedules`` end to end at ``boundaries`` (see `Join`; optax ``join_schedules``).

    >>> from prunekit.schedules import Constant, Polynomial, join
    >>> s = join([Constant(0.0), Polynomial(0.0, 0.9, begin=0, end=100)], boundaries=[50])
    >>> s(49), s(150), s.is_update(50)
    (0.0, 0.9, True)
    """
    return Join(schedules, boundaries)
