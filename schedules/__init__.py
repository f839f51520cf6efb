"""Pure, validated, serialisable sparsity schedules and lottery-ticket round plans.

A schedule maps an integer time ``t`` (steps or epochs: the caller decides) to an
absolute target sparsity in [0, 1) and says at which ``t`` to prune. Every kind
round-trips through ``to_dict`` / `from_dict` (and omegaconf). Standard library only.

>>> from prunekit.schedules import Polynomial, from_dict
>>> s = Polynomial(0.0, 0.9, begin=0, end=100)
>>> from_dict(s.to_dict()) == s
True
"""

from ._basic import Constant, Exponential, FromCallable, Steps
from ._core import (
    Schedule,
    from_dict,
    list_schedules,
    register_schedule,
    to_omegaconf,
    update_points,
)
from ._join import Join, join
from ._lottery import LotteryTicketPlan
from ._plot import plot_schedule
from ._ramps import Cosine, Linear, Polynomial

__all__ = [
    "Constant",
    "Cosine",
    "Exponential",
    "FromCallable",
    "Join",
    "Linear",
    "LotteryTicketPlan",
    "Polynomial",
    "Schedule",
    "Steps",
    "from_dict",
    "join",
    "list_schedules",
    "plot_schedule",
    "register_schedule",
    "to_omegaconf",
    "update_points",
]
