"""The round plan of iterative magnitude pruning (lottery tickets, Frankle & Carbin 2019)."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._checks import below_one, check_int, check_rate, check_time, suggest
from ._core import Schedule, register_schedule

__all__ = ["LotteryTicketPlan"]


@register_schedule("lottery_ticket")
@dataclass(frozen=True)
class LotteryTicketPlan(Schedule):
    """Prune ``rate`` of the remaining weights per round, for ``rounds`` rounds.

    ``layer_rates`` gives some layers their own per-round rate, keyed by any layer name
    (``"output"``, ``"fc3.weight"``); other layers use ``rate``. After ``r`` rounds a
    layer with rate ``q`` has sparsity ``1 - (1 - q) ** r`` (the largest float below 1 where
    that rounds to 1.0). As a `Schedule`, ``t`` counts completed rounds: ``plan(t)`` is the
    sparsity at ``rate`` after ``min(t, rounds)`` rounds (per-layer rates need `sparsity` or
    `layer_sparsities`), and ``is_update(t)`` is true for ``1 <= t <= rounds``.

    Frankle & Carbin prune LeNet-300-100's hidden layers by 20 % and its output layer
    by 10 % per round:

    >>> from prunekit.schedules import LotteryTicketPlan
    >>> plan = LotteryTicketPlan(rounds=20, rate=0.2, layer_rates={"output": 0.1})
    >>> round(plan.sparsity(2), 4), round(plan.sparsity(2, "output"), 4)
    (0.36, 0.19)
    >>> overall, counts = plan.remaining(1, {"fc1": 235_200, "fc2": 30_000, "output": 1_000})
    >>> round(100 * overall, 2), counts
    (80.04, {'fc1': 188160, 'fc2': 24000, 'output': 900})
    """

    rounds: int
    rate: float
    layer_rates: Mapping[str, float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rounds", check_int("rounds", self.rounds, minimum=1))
        object.__setattr__(self, "rate", check_rate("rate", self.rate))
        given = {} if self.layer_rates is None else self.layer_rates
        if not isinstance(given, Mapping):
            raise TypeError(f"layer_rates={given!r} must be a mapping from layer name to rate")
        rates: dict[str, float] = {}
        for name, rate in given.items():
            if not isinstance(name, str):
                raise TypeError(f"layer_rates key {name!r} must be a str (a layer name)")
            if not name:
                raise ValueError("layer_rates key '' must be a non-empty layer name")
            rates[name] = check_rate(f"layer_rates[{name!r}]", rate)
        object.__setattr__(self, "layer_rates", rates)  # a copy: the caller's dict is theirs

    def _rate(self, layer: str | None) -> float:
        rates: Mapping[str, float] = self.layer_rates or {}
        return rates.get(layer, self.rate) if layer is not None else self.rate

    def _check_round(self, round: object) -> int:
        value = check_int("round", round)
        if value > self.rounds:
            raise ValueError(f"{round=} must be in [0, rounds={self.rounds}]")
        return value

    def _check_names(self, names: Iterable[str], argument: str) -> None:
        names = list(names)
        for name in self.layer_rates or {}:
            if name not in names:
                raise ValueError(
                    f"layer_rates names {name!r}, which is not in {argument}"
                    f"{suggest(name, names)}; {argument}: {', '.join(names)}"
                )

    def sparsity(self, round: int, layer: str | None = None) -> float:
        """Absolute sparsity of ``layer`` after ``round`` rounds: ``1 - (1 - rate) ** round``.

        >>> from prunekit.schedules import LotteryTicketPlan
        >>> LotteryTicketPlan(rounds=3, rate=0.5).sparsity(2)
        0.75
        """
        return below_one(1.0 - (1.0 - self._rate(layer)) ** self._check_round(round))

    def layer_sparsities(self, round: int, layer_names: Iterable[str]) -> dict[str, float]:
        """``{name: sparsity(round, name)}``; every ``layer_rates`` key must be among the names.

        >>> from prunekit.schedules import LotteryTicketPlan
        >>> plan = LotteryTicketPlan(rounds=3, rate=0.5, layer_rates={"out": 0.25})
        >>> plan.layer_sparsities(1, ["fc", "out"])
        {'fc': 0.5, 'out': 0.25}
        """
        names = list(layer_names)
        self._check_names(names, "layer_names")
        return {name: self.sparsity(round, name) for name in names}

    def remaining(self, round: int, layer_sizes: Mapping[str, int]) -> tuple[float, dict[str, int]]:
        """Weights left after ``round`` rounds: ``(overall fraction, {layer: count})``.

        A layer of ``n`` weights keeps ``n - round(s * n)``, as the engine prunes
        ``round(s * n)`` per tensor; the overall fraction is the kept total over ``n`` total.

        >>> from prunekit.schedules import LotteryTicketPlan
        >>> LotteryTicketPlan(rounds=3, rate=0.5).remaining(2, {"a": 10, "b": 6})
        (0.25, {'a': 2, 'b': 2})
        """
        if not isinstance(layer_sizes, Mapping):
            raise TypeError(f"{layer_sizes=} must be a mapping from layer name to size")
        if not layer_sizes:
            raise ValueError(f"{layer_sizes=} must name at least one layer")
        sizes = {
            name: check_int(f"layer_sizes[{name!r}]", n, minimum=1)
            for name, n in layer_sizes.items()
        }
        sparsities = self.layer_sparsities(round, sizes)
        kept = {name: n - builtins.round(sparsities[name] * n) for name, n in sizes.items()}
        return sum(kept.values()) / sum(sizes.values()), kept

    def __call__(self, t: int) -> float:
        return self.sparsity(min(check_time(t), self.rounds))

    def is_update(self, t: int) -> bool:
        return 1 <= check_time(t) <= self.rounds

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rounds": self.rounds,
            "rate": self.rate,
            "layer_rates": dict(self.layer_rates or {}),
        }
