"""The `Pruning` callback: schedule-driven pruning inside a Lightning Trainer."""

from __future__ import annotations

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

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it at every hook call (to name the profiler action): build it once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(
                unit=self.unit,
                method=self.pruner_args["method"],
                scope=self.pruner_args["scope"],
                targets=repr(self.pruner_args["targets"]),
            )
        return self._state_key

    # --------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
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
    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        previous = self.pruner
        if previous is not None and previous.model is pl_module and not previous._removed:
            carried = previous.state_dict()  # a second fit with the same callback continues
            previous.remove()
        else:
            carried = None
        self.pruner = Pruner(pl_module, **self.pruner_args)
        state = self._pending_state
        if state is not None:
            self._restore(state)
        elif carried is not None:
            self.pruner.load_state_dict(carried)
        for optimizer in trainer.optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if any(id(pl_module.get_parameter(n)) in held for n in self.pruner.names):
                self.pruner.attach(optimizer)
        if self.reset_to_initial and self._initial is None:
            self._initial = {
                n: pl_module.get_parameter(n).detach().clone() for n in self.pruner.names
            }

    def _restore(self, state: dict[str, Any]) -> None:
        saved = state.get("schedule")
        if saved is not None and saved != _describe(self.schedule):
            raise ValueError(
                f"the checkpoint was written with schedule {saved}, this callback has "
                f"{_describe(self.schedule)}; resume with the same schedule"
            )
        assert self.pruner is not None
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
        if target == self._target:
            return
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
            "schedule": _describe(self.schedule),
            "unit": self.unit,
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
        if self.pruner is not None:  # strategies that restore after setup
            self._restore(self._pending_state)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["pruner"] = None  # holds hooks and the model; rebuilt at fit start
        return state

    def __repr__(self) -> str:
        name = type(self.schedule).__name__
        return (
            f"Pruning(schedule={name}(...), unit={self.unit!r}, "
            f"method={self.pruner_args['method']!r}, scope={self.pruner_args['scope']!r})"
        )


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
