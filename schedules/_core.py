"""The `Schedule` base class, the registry of kinds, and dict / omegaconf conversion."""

from __future__ import annotations

import abc
import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ._checks import check_int, suggest

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = [
    "Schedule",
    "from_dict",
    "list_schedules",
    "register_schedule",
    "to_omegaconf",
    "update_points",
]

_REGISTRY: dict[str, type[Schedule]] = {}

S = TypeVar("S", bound="type[Schedule]")


class Schedule(abc.ABC):
    """A pure map from an integer time ``t`` to an absolute target sparsity in [0, 1).

    ``s(t)`` is the fraction of the targeted weights that should be zero at ``t``;
    ``s.is_update(t)`` says whether to prune at ``t``. Whether ``t`` counts optimizer
    steps or epochs is the caller's choice. There is no hidden state: the same ``t``
    always gives the same answer, so only ``t`` needs checkpointing. ``t`` must be a
    non-negative int (``TypeError`` / ``ValueError`` otherwise).

    >>> from prunekit.schedules import Constant
    >>> s = Constant(0.5, begin=2)
    >>> [s(t) for t in range(4)], [s.is_update(t) for t in range(4)]
    ([0.0, 0.0, 0.5, 0.5], [False, False, True, False])
    """

    kind: ClassVar[str]
    """The registered name of the class, written as ``kind`` by `to_dict`."""

    @abc.abstractmethod
    def __call__(self, t: int) -> float:
        """The absolute target sparsity at time ``t``."""

    @abc.abstractmethod
    def is_update(self, t: int) -> bool:
        """Whether pruning should happen at time ``t``."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (``{"kind": ..., **arguments}``) that `from_dict` turns back."""

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Schedule:
        """Build an instance from the keys of a dict, ``kind`` removed (override to convert)."""
        return cls(**fields)


def fields_dict(schedule: Schedule) -> dict[str, Any]:
    """``{"kind": ..., field: value, ...}`` for a dataclass schedule (tuples become lists)."""
    out: dict[str, Any] = {"kind": schedule.kind}
    for field in dataclasses.fields(schedule):  # type: ignore[arg-type]
        value = getattr(schedule, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def register_schedule(name: str) -> Callable[[S], S]:
    """Class decorator that registers a `Schedule` subclass under ``name``.

    The name is the ``kind`` that `to_dict` writes and `from_dict` reads. A name that
    is already taken raises ``ValueError``.

    >>> from prunekit.schedules import list_schedules
    >>> "polynomial" in list_schedules()
    True
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"{name=} must be a non-empty str")

    def decorator(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Schedule)):
            raise TypeError(f"register_schedule({name!r}) needs a Schedule subclass, got {cls!r}")
        if name in _REGISTRY:
            taken = _REGISTRY[name]
            raise ValueError(
                f"schedule kind {name!r} is already registered "
                f"(by {taken.__module__}.{taken.__qualname__})"
            )
        _REGISTRY[name] = cls
        cls.kind = name
        return cls

    return decorator


def list_schedules() -> list[str]:
    """The registered schedule kinds, sorted.

    >>> from prunekit.schedules import list_schedules
    >>> list_schedules()[:3]
    ['callable', 'constant', 'cosine']
    """
    return sorted(_REGISTRY)


def _plain(value: object) -> object:
    """Turn mappings and sequences (omegaconf containers included) into dicts and lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(item) for item in value]
    return value


def from_dict(config: Mapping[str, Any]) -> Schedule:
    """Build a schedule from ``{"kind": ..., **arguments}`` (a dict or an omegaconf DictConfig).

    An unknown ``kind`` or key raises ``ValueError`` listing the valid ones.

    >>> from prunekit.schedules import from_dict
    >>> from_dict({"kind": "linear", "initial": 0.0, "final": 0.5, "begin": 0, "end": 10})
    Linear(initial=0.0, final=0.5, begin=0, end=10, frequency=1)
    """
    data = _plain(config)
    if not isinstance(data, dict):
        raise TypeError(f"{config=} must be a mapping such as a dict or a DictConfig")
    kinds = list_schedules()
    if "kind" not in data:
        raise ValueError(f"{config=} has no 'kind' key; valid kinds: {', '.join(kinds)}")
    kind = data.pop("kind")
    if not isinstance(kind, str) or kind not in _REGISTRY:
        hint = suggest(kind, kinds) if isinstance(kind, str) else ""
        raise ValueError(f"unknown schedule {kind=}{hint}; valid kinds: {', '.join(kinds)}")
    cls = _REGISTRY[kind]
    params = inspect.signature(cls).parameters
    for key in data:
        if key not in params:
            raise ValueError(
                f"unknown key {key!r} for schedule kind {kind!r}{suggest(str(key), params)}; "
                f"valid keys: kind, {', '.join(params)}"
            )
    missing = [name for name, p in params.items() if p.default is p.empty and name not in data]
    if missing:
        raise ValueError(f"schedule kind {kind!r} is missing the key(s): {', '.join(missing)}")
    return cls._from_fields(data)


def to_omegaconf(schedule: Schedule) -> DictConfig:
    """The schedule's `to_dict` as an omegaconf ``DictConfig`` (omegaconf imported lazily).

    >>> from prunekit.schedules import Constant, from_dict, to_omegaconf
    >>> cfg = to_omegaconf(Constant(0.5))
    >>> cfg.kind, from_dict(cfg) == Constant(0.5)
    ('constant', True)
    """
    from omegaconf import OmegaConf

    return OmegaConf.create(schedule.to_dict())


def update_points(schedule: Schedule, until: int) -> list[int]:
    """The times ``0 <= t <= until`` at which ``schedule.is_update(t)`` is true.

    >>> from prunekit.schedules import Polynomial, update_points
    >>> update_points(Polynomial(0.0, 0.8, begin=2, end=9, frequency=3), until=20)
    [2, 5, 8, 9]
    """
    until = check_int("until", until)
    return [t for t in range(until + 1) if schedule.is_update(t)]
