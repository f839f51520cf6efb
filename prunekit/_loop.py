"""`SparsityScheduler`: a schedule driving a `Pruner` from a plain loop, like torch's LR schedulers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prunekit._pruner import Pruner


class SparsityScheduler:
    """Prune to ``schedule(t)`` whenever ``schedule.is_update(t)``, ``t`` = optimizer steps taken.

    The plain-loop counterpart of the Lightning callback, in the idiom of
    ``torch.optim.lr_scheduler``: build it where training starts (the update due at
    ``t = 0`` happens then), and call :meth:`step` once after every ``optimizer.step()``.
    After ``n`` calls ``t == n``, so a loop of ``n`` steps reaches every update up to
    and including ``t = n`` (a schedule's last update usually sits at its ``end``).

    ``schedule`` is any object with ``schedule(t) -> sparsity`` and
    ``schedule.is_update(t) -> bool``, such as those of ``prunekit.schedules``.
    :meth:`state_dict` holds ``t``, the last target and the pruner's masks; to resume,
    build model, optimizer, pruner and scheduler as at the start, then load the model's,
    the optimizer's and this state (as with LR schedulers).

    >>> import torch
    >>> from torch import nn
    >>> from prunekit import Pruner
    >>> from prunekit.schedules import Linear
    >>> model = nn.Linear(10, 10)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> pruner = Pruner(model).attach(optimizer)
    >>> scheduler = SparsityScheduler(pruner, Linear(0.0, 0.5, begin=0, end=4, frequency=2))
    >>> for _ in range(4):
    ...     model(torch.randn(8, 10)).sum().backward()
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    ...     scheduler.step()
    >>> scheduler.t, scheduler.target, int((model.weight == 0).sum())
    (4, 0.5, 50)
    """

    def __init__(self, pruner: Pruner, schedule: Any) -> None:
        if not isinstance(pruner, Pruner):
            raise TypeError(f"pruner must be a prunekit.Pruner, got {type(pruner).__name__}")
        if not callable(schedule) or not callable(getattr(schedule, "is_update", None)):
            raise TypeError(
                f"schedule={schedule!r} must be callable (t -> sparsity) and have is_update(t); "
                "wrap a plain callable in prunekit.schedules.FromCallable"
            )
        self.pruner = pruner
        self.schedule = schedule
        self.t = 0
        self.target = 0.0  # the sparsity the masks were last brought to
        self._update(0)

    def step(self) -> None:
        """Count one optimizer step and prune if the schedule updates at the new ``t``."""
        self._update(self.t + 1)

    def _update(self, t: int) -> None:
        if self.schedule.is_update(t):
            target = self.schedule(t)
            if target != self.target:
                self.pruner.prune_to(target)  # validates first: nothing changes if it raises
                self.target = target
        self.t = t

    def state_dict(self) -> dict[str, Any]:
        """``t``, the last target, the schedule's description and the pruner's state."""
        return {
            "t": self.t,
            "target": self.target,
            "schedule": _describe(self.schedule),
            "pruner": self.pruner.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`: ``t``, the target and the masks (weights re-masked).

        Raises ``ValueError``, changing nothing, if the state was written with another
        schedule or belongs to other parameters.
        """
        if not isinstance(state, Mapping) or not {"t", "target", "pruner"} <= set(state):
            raise ValueError(
                "state is not a SparsityScheduler state_dict (needs t, target, pruner)"
            )
        t = state["t"]
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"state['t']={t!r} must be a non-negative int")
        saved, mine = state.get("schedule"), _describe(self.schedule)
        if saved is not None and mine is not None and saved != mine:
            raise ValueError(
                f"the state was written with schedule {saved}, this scheduler has {mine}; "
                "resume with the same schedule"
            )
        self.pruner.load_state_dict(state["pruner"])
        self.t = t
        self.target = float(state["target"])

    def __repr__(self) -> str:
        return f"SparsityScheduler(t={self.t}, target={self.target}, schedule={self.schedule!r})"


def _describe(schedule: Any) -> Any:
    """The schedule's ``to_dict()`` when it has a serialisable one, else None (not compared)."""
    to_dict = getattr(schedule, "to_dict", None)
    if to_dict is None:
        return None
    try:
        return to_dict()
    except (ValueError, TypeError):
        return None
