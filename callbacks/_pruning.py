"""The `Pruning` callback: schedule-driven pruning inside a Lightning Trainer."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from prunekit.schedules import FromCallable, Schedule
from typing_extensions import override

from prunekit import Pruner, get_method, pack_mask
from prunekit._pruner import SCOPES, Targets

UNITS = ("step", "epoch")
#: What a checkpoint entry of this callback holds: 2 adds the arguments it was written with.
_STATE_FORMAT = 2


class Pruning(Callback):
    """Prune a LightningModule to ``schedule(t)`` whenever ``schedule.is_update(t)``.

    ``t`` counts optimizer steps taken (``unit="step"``, the trainer's ``global_step``,
    so gradient accumulation counts optimizer steps, not batches) or epochs completed
    (``unit="epoch"``). At fit start a :class:`prunekit.Pruner` is built on the module
    and attached to its optimizers, so pruned weights stay zero through every step.
    Updates happen between optimizer steps, never during the sanity check or
    validation. ``sparsity/target`` and ``sparsity/actual`` are logged through the
    trainer's loggers at every update and at epoch end; the schedule position and the
    masks are saved in checkpoints, and a resumed run continues exactly.

    What changes under the callback is followed or refused by name:

    - A resumed run finds its checkpoint entry even if the entry's key differs (an older
      prunekit, another ``name``), as long as it is the only unclaimed one; if it was
      written with other arguments (schedule, unit, method, scope, targets, seed,
      options), fitting fails naming them: a run never resumes dense.
    - Reused for another module (``fit(m1)`` then ``fit(m2)``), it starts afresh on the
      new module; ``m1`` keeps its zeros.
    - A second ``fit`` of the same module (a new Trainer) carries the masks over: ``t``
      restarts at the new trainer's ``global_step``, and targets below the sparsity
      already reached are held (masks never regrow) until the schedule passes it.
    - Optimizers that appear during the fit (replaced, or given targets by
      ``add_param_group``, e.g. ``BackboneFinetuning``) are attached before the next
      step. Frozen targets (``requires_grad=False``) are pruned like the others.

    Args:
        schedule: a :class:`prunekit.schedules.Schedule`, or any ``t -> sparsity``
            callable (then checked at every ``t``).
        unit: ``"step"`` or ``"epoch"``.
        targets, method, scope, exclude, seed, options: as for :class:`prunekit.Pruner`.
        reset_to_initial: after each update, reset surviving weights to their values
            at fit start (lottery-ticket style, like ``ModelPruning``'s
            ``use_lottery_ticket_hypothesis``).
        make_permanent: at fit end, detach all hooks and leave plain weights with zeros.
        log_per_layer: also log ``sparsity/<parameter name>``.
        verbose: print the per-layer sparsity table at every update (rank zero).
        name: tells two ``Pruning`` callbacks of one Trainer apart (their checkpoint
            entries are keyed by it); needed only when there are several.

    >>> from prunekit.schedules import Polynomial
    >>> Pruning(Polynomial(0.0, 0.9, begin=0, end=100, frequency=10), unit="step")
    Pruning(schedule=Polynomial(...), unit='step', method='magnitude', scope='global')
    """

    def __init__(
        self,
        schedule: Schedule | Callable[[int], float],
        *,
        unit: str = "step",
        targets: Targets = None,
        method: str = "magnitude",
        scope: str = "global",
        exclude: str | Iterable[str] = (),
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
        reset_to_initial: bool = False,
        make_permanent: bool = False,
        log_per_layer: bool = False,
        verbose: bool = False,
        name: str | None = None,
    ) -> None:
        if not isinstance(schedule, Schedule):
            if not callable(schedule):
                raise TypeError(
                    f"schedule={schedule!r} must be a Schedule or a callable t -> sparsity"
                )
            schedule = FromCallable(schedule)
        if unit not in UNITS:
            raise ValueError(f"unit={unit!r} must be one of {UNITS}")
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} must be one of {SCOPES}")
        get_method(method)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name={name!r} must be a non-empty str or None")
        self.name = name
        self.schedule = schedule
        self.unit = unit
        self.pruner_args: dict[str, Any] = {
            "targets": targets,
            "method": method,
            "scope": scope,
            "exclude": exclude,
            "seed": seed,
            **dict(options or {}),
        }
        self.reset_to_initial = reset_to_initial
        self.make_permanent = make_permanent
        self.log_per_layer = log_per_layer
        self.verbose = verbose
        self.pruner: Pruner | None = None
        self._last_t: int | None = None  # the last time checked against the schedule
        self._target = 0.0  # the sparsity the masks were last brought to
        self._pending_state: dict[str, Any] | None = None
        self._initial: dict[str, torch.Tensor] | None = None
        self._state_key: str | None = None
        self._live = False  # the pruner was built for the fit now running
        self._hold = False  # a later fit of the same module: targets below _target are held
        self._seen_optimizers: list[tuple[torch.optim.Optimizer, int]] = []

    @property
    @override
    def state_key(self) -> str:
        # Not built from the pruning arguments: a resume with other arguments must find
        # its entry (and be refused by name), not be skipped. Lightning reads the key at
        # every hook call (to name the profiler action): build it once.
        if self._state_key is None:
            self._state_key = (
                type(self).__qualname__
                if self.name is None
                else self._generate_state_key(name=self.name)
            )
        return self._state_key

    # --------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._live = False
        if stage == "fit":
            self._check_unique_key(trainer)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        entry = self._find_entry(trainer, checkpoint.get("callbacks") or {})
        if entry is not None:  # (an entry under this state_key reaches load_state_dict)
            self.load_state_dict(copy.deepcopy(entry))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pruner is not None:
            self._follow_optimizers(trainer)
        if self.unit == "step":
            self._maybe_update(trainer, pl_module, trainer.global_step)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.unit == "step":
            self._maybe_update(trainer, pl_module, trainer.global_step)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch":
            self._maybe_update(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch":
            self._maybe_update(trainer, pl_module, trainer.current_epoch + 1)
        if self.pruner is not None:
            self._log(pl_module, self._metrics(), to_logger=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.make_permanent and self.pruner is not None:
            self.pruner.remove()

    # ---------------------------------------------------------- internals
    def _check_unique_key(self, trainer: pl.Trainer) -> None:
        twins = [
            c
            for c in trainer.callbacks
            if isinstance(c, Pruning) and c is not self and c.state_key == self.state_key
        ]
        if twins:
            raise ValueError(
                f"two Pruning callbacks in one Trainer share state_key={self.state_key!r}, so "
                "their checkpoint entries would overwrite each other; give each a distinct "
                "name=, e.g. Pruning(..., name='encoder')"
            )

    def _find_entry(
        self, trainer: pl.Trainer, states: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        """This callback's checkpoint entry when it is not under its own state_key: the one
        Pruning entry no other Pruning callback of the trainer claims (e.g. written by an
        older prunekit, whose keys held the arguments)."""
        if self.state_key in states:
            return None
        claimed = {c.state_key for c in trainer.callbacks if isinstance(c, Pruning)}
        orphans = [k for k, v in states.items() if k not in claimed and _is_pruning_state(v)]
        if len(orphans) > 1:
            raise ValueError(
                f"the checkpoint holds {len(orphans)} Pruning entries {orphans} and none under "
                f"this callback's state_key={self.state_key!r}; give each callback the name= "
                "it was saved with"
            )
        return states[orphans[0]] if orphans else None

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        previous = self.pruner
        carried = None
        if previous is not None and previous.model is pl_module:
            carried = previous.state_dict()  # a second fit of the same module continues
            previous.remove()
        # (a pruner of another module stays with it: its hooks keep that module's zeros)
        self.pruner = Pruner(pl_module, **self.pruner_args)
        self._live, self._hold, self._seen_optimizers = True, False, []
        state = self._pending_state
        if state is not None:
            self._restore(state)
        elif carried is not None:
            self.pruner.load_state_dict(carried)
            self._last_t, self._hold = None, True  # t restarts with this trainer's step count
        else:  # a new module (or a copy of this callback): start afresh
            self._last_t, self._target, self._initial = None, 0.0, None
        self._follow_optimizers(trainer)
        if self.reset_to_initial and self._initial is None:
            self._initial = {
                n: pl_module.get_parameter(n).detach().clone() for n in self.pruner.names
            }

    def _follow_optimizers(self, trainer: pl.Trainer) -> None:
        """Attach every optimizer of the trainer that holds a target; cheap when nothing
        changed (same optimizer objects, same number of parameter groups)."""
        assert self.pruner is not None
        optimizers = list(trainer.optimizers)
        seen = self._seen_optimizers
        if len(seen) == len(optimizers) and all(
            o is s and len(o.param_groups) == n for o, (s, n) in zip(optimizers, seen, strict=True)
        ):
            return
        model = self.pruner.model
        targets = {id(model.get_parameter(n)) for n in self.pruner.names}
        for optimizer in optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if held & targets:
                self.pruner.attach(optimizer)
        self._seen_optimizers = [(o, len(o.param_groups)) for o in optimizers]

    def _arguments(self) -> dict[str, Any]:
        """What a checkpoint entry must have been written with to be continued."""
        assert self.pruner is not None
        options = {
            k: v
            for k, v in self.pruner_args.items()
            if k not in ("targets", "method", "scope", "exclude", "seed")
        }
        return {
            "schedule": _describe(self.schedule),
            "unit": self.unit,
            "method": self.pruner_args["method"],
            "scope": self.pruner_args["scope"],
            "targets": self.pruner.names,
            "seed": self.pruner_args["seed"],
            "options": options,
        }

    def _check_arguments(self, state: Mapping[str, Any]) -> None:
        saved = state.get("args")
        if saved is None:  # an entry written before the arguments were stored
            pruner = state["pruner"]
            saved = {
                "schedule": state.get("schedule"),
                "unit": state.get("unit"),
                "method": pruner.get("method"),
                "scope": pruner.get("scope"),
                "targets": list(pruner.get("masks", {})),
            }
        mine = self._arguments()
        differ = [
            key
            for key, value in saved.items()
            if key in mine and value is not None and value != mine[key]
        ]
        if differ:
            there = ", ".join(f"{k}={_short(saved[k])}" for k in differ)
            here = ", ".join(f"{k}={_short(mine[k])}" for k in differ)
            raise ValueError(
                f"the checkpoint was written with {there}; this Pruning callback has {here}; "
                f"resume with the same {' and '.join(differ)}"
            )

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.pruner is not None
        self._check_arguments(state)
        self.pruner.load_state_dict(state["pruner"])
        self._last_t = state.get("last_t")
        self._target = float(state.get("target", 0.0))
        if state.get("initial") is not None:
            self._initial = state["initial"]
        self._pending_state = None

    def _maybe_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        if t == self._last_t or self.pruner is None:
            return
        self._last_t = t
        if not self.schedule.is_update(t):
            return
        target = self.schedule(t)
        if target == self._target or (self._hold and target < self._target):
            return
        self._follow_optimizers(trainer)
        self.pruner.prune_to(target)
        self._target = target
        if self._initial is not None:
            self._reset_survivors(pl_module)
        self._check_ranks_agree(trainer)
        self._log_update(trainer, pl_module)
        if self.verbose:
            rank_zero_info(f"pruned to {target:.4f} at {self.unit} {t}\n{self.pruner.sparsity()}")

    @torch.no_grad()
    def _reset_survivors(self, pl_module: pl.LightningModule) -> None:
        assert self.pruner is not None and self._initial is not None
        for name, initial in self._initial.items():
            pl_module.get_parameter(name).copy_(initial)
        self.pruner.apply_masks()

    def _check_ranks_agree(self, trainer: pl.Trainer) -> None:
        """Under DDP, compare a checksum of the masks across ranks; divergence is an error."""
        if trainer.world_size <= 1 or self.pruner is None:
            return
        checksum = torch.stack([_mask_checksum(m) for m in self.pruner.masks.values()]).to(
            trainer.strategy.root_device
        )
        gathered = trainer.strategy.all_gather(checksum)
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(
                f"pruning masks differ between ranks after an update: {gathered.tolist()}"
            )

    def _metrics(self) -> dict[str, float]:
        assert self.pruner is not None
        report = self.pruner.sparsity()
        metrics = {"sparsity/target": self._target, "sparsity/actual": report.fraction}
        if self.log_per_layer:
            metrics.update({f"sparsity/{n}": f for n, f in report.per_target().items()})
        return metrics

    def _log_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every update reaches the loggers, whatever ``log_every_n_steps`` says (Lightning
        only writes ``self.log`` step values at its logging steps); ``self.log`` feeds the
        progress bar and ``callback_metrics``."""
        metrics = self._metrics()
        for logger in trainer.loggers:
            logger.log_metrics(
                {**metrics, "epoch": trainer.current_epoch}, step=trainer.global_step
            )
        if self.unit == "step":  # epoch updates reach the progress bar from on_train_epoch_end
            self._log(pl_module, metrics, to_logger=False)

    @staticmethod
    def _log(pl_module: pl.LightningModule, metrics: dict[str, float], *, to_logger: bool) -> None:
        for key, value in metrics.items():
            pl_module.log(
                key,
                value,
                on_step=not to_logger,
                on_epoch=to_logger,
                logger=to_logger,
                prog_bar=key == "sparsity/actual",
                sync_dist=False,  # identical on every rank
                batch_size=1,
            )

    # -------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "name": self.name,
            "schedule": _describe(self.schedule),
            "unit": self.unit,
            "args": None if self.pruner is None else self._arguments(),
            "last_t": self._last_t,
            "target": self._target,
            "pruner": None if self.pruner is None else self.pruner.state_dict(),
            "initial": self._initial,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("pruner") is None:
            return
        self._pending_state = dict(state_dict)
        if self._live:  # strategies that restore after setup
            self._restore(self._pending_state)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # The pruner holds hooks and the model, the optimizers their state: rebuilt at fit
        # start. A copy is a callback that has not been fitted yet.
        state.update(pruner=None, _live=False, _seen_optimizers=[])
        return state

    def __repr__(self) -> str:
        kind = type(self.schedule).__name__
        name = "" if self.name is None else f", name={self.name!r}"
        return (
            f"Pruning(schedule={kind}(...), unit={self.unit!r}, "
            f"method={self.pruner_args['method']!r}, scope={self.pruner_args['scope']!r}{name})"
        )


def _is_pruning_state(value: Any) -> bool:
    return isinstance(value, Mapping) and {"schedule", "pruner", "last_t"} <= set(value)


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(repr, value[:3]))}, ... ({len(value)} names)]"
    return repr(value)


def _describe(schedule: Schedule) -> Any:
    try:
        return schedule.to_dict()
    except (ValueError, TypeError):  # e.g. a lambda: not serialisable, not compared
        return None


def _mask_checksum(mask: torch.Tensor) -> torch.Tensor:
    """Kept count and a position-weighted sum of the packed bytes: equal masks, equal sums."""
    packed = pack_mask(mask).to(torch.int64)
    weights = torch.arange(1, packed.numel() + 1, dtype=torch.int64) % 65_521
    return torch.stack([mask.count_nonzero().cpu(), (packed * weights).sum()])
