"""The `Pruning` callback: schedule-driven pruning inside a Lightning Trainer."""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from prunekit.schedules import FromCallable, Schedule
from torch import nn
from torch.distributed.tensor import DTensor
from typing_extensions import override

from prunekit import (
    GROUP_OPTIONS,
    SCOPES,
    GroupPruner,
    Pruner,
    Targets,
    check_group_arguments,
    get_method,
    pack_mask,
)

UNITS = ("step", "epoch")
#: options of structure="groups" (passed to GroupPruner)
#: GroupPruner's defaults: a resume compares options with these filled in
_GROUP_DEFAULTS = {"reduce": "normalized", "blocks_only": False}
#: What a checkpoint entry of this callback holds: 2 adds the arguments it was written with.
_STATE_FORMAT = 2


class Pruning(Callback):
    """Prune a LightningModule to ``schedule(t)`` whenever ``schedule.is_update(t)``, or
    by a relative ``amount`` of what remains at every ``t >= 1``.

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
        schedule: a :class:`prunekit.schedules.Schedule` (absolute sparsity over time),
            or any ``t -> sparsity`` callable (then checked at every ``t``).
        amount: instead of a schedule, prune this much of what remains at every
            ``t >= 1`` (at each epoch end with ``unit="epoch"``): a fraction in [0, 1)
            (of the remaining weights, or of the remaining slices for structured
            methods, rounded with Python's ``round``), an int count, or a callable
            ``t -> fraction or count`` (0 skips ``t``). Like ``ModelPruning``'s
            ``amount``, counted per target (``scope="layer"``) or over all of them.
        unit: ``"step"`` or ``"epoch"``.
        targets, method, scope, exclude, seed, options: as for :class:`prunekit.Pruner`;
            ``targets`` may also hold ``(module, "weight")`` pairs.
        after_validation: apply updates at the end of each validation run (not during
            the sanity check) instead of at step or epoch boundaries: the updates due
            since the last one are applied there (``t`` is the ``global_step``, or the
            current epoch + 1 with ``unit="epoch"``).
        on_update: called as ``on_update(pruner, t)`` after each update (after
            ``reset_to_initial``), e.g. to re-sample the surviving weights.
        reset_to_initial: after each update, reset surviving weights to their values
            at fit start (lottery-ticket style, like ``ModelPruning``'s
            ``use_lottery_ticket_hypothesis``).
        make_permanent: at fit end, detach all hooks and leave plain weights with zeros.
        log_per_layer: also log ``sparsity/<parameter name>``.
        verbose: print what is targeted (``Pruner.describe``) at fit start and the
            per-layer sparsity table at every update (rank zero).
        name: tells two ``Pruning`` callbacks of one Trainer apart (their checkpoint
            entries are keyed by it); needed only when there are several.
        structure: ``"weights"`` (default: ``method`` decides what goes) or ``"groups"``:
            structured pruning of whole dependency groups with a
            :class:`prunekit.GroupPruner` (channels with their bias, BatchNorm entries
            and the next layers' inputs; coupled residual channels; attention heads), so
            that :func:`prunekit.compact` can remove them afterwards with the same
            outputs. The schedule's sparsity, and the logged ``sparsity/actual``, then
            count **groups** (channels), per layer (``scope="layer"``) or over all
            layers (``"global"``, scores divided by each layer's mean). Needs a schedule
            (not ``amount``), the default ``method`` and no ``targets``; ``exclude``
            (parameter names or globs of the LightningModule) leaves the dependency
            groups with a member it matches dense, and they do not count in the
            sparsity (see ``GroupPruner``); ``options`` may hold ``reduce`` and
            ``blocks_only``. A schedule that goes down is refused (masks only shrink).
        example_input: with ``structure="groups"``, an input of the LightningModule's
            ``forward`` for the trace (a tensor or a tuple of them; moved to the
            module's device, floating-point tensors cast to its dtype, e.g. under
            ``precision="bf16-true"``); ``None`` uses ``pl_module.example_input_array``.

    >>> from prunekit.schedules import Polynomial
    >>> Pruning(Polynomial(0.0, 0.9, begin=0, end=100, frequency=10), unit="step")
    Pruning(schedule=Polynomial(...), unit='step', method='magnitude', scope='global')
    >>> Pruning(amount=0.3, unit="epoch")  # 30 % of what remains, at each epoch end
    Pruning(amount=0.3, unit='epoch', method='magnitude', scope='global')
    >>> Pruning(Polynomial(0.0, 0.5, begin=0, end=100, frequency=10), structure="groups",
    ...         example_input=torch.zeros(1, 1, 28, 28), scope="layer")  # half the channels
    Pruning(schedule=Polynomial(...), unit='step', structure='groups', scope='layer')
    """

    def __init__(
        self,
        schedule: Schedule | Callable[[int], float] | None = None,
        *,
        amount: float | int | Callable[[int], float | int] | None = None,
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
        after_validation: bool = False,
        on_update: Callable[[Pruner, int], Any] | None = None,
        structure: str = "weights",
        example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        if (schedule is None) == (amount is None):
            raise TypeError(
                f"give a schedule or an amount, exactly one ({schedule=!r}, {amount=!r})"
            )
        if amount is not None:
            if not callable(amount):
                _relative_amount(amount, "amount")
        elif not isinstance(schedule, Schedule):
            if not callable(schedule):
                raise TypeError(
                    f"schedule={schedule!r} must be a Schedule or a callable t -> sparsity"
                )
            schedule = FromCallable(schedule)
        if not isinstance(after_validation, bool):
            raise TypeError(f"after_validation={after_validation!r} must be True or False")
        if on_update is not None and not callable(on_update):
            raise TypeError(f"on_update={on_update!r} must be a callable (pruner, t) or None")
        if unit not in UNITS:
            raise ValueError(f"unit={unit!r} must be one of {UNITS}")
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} must be one of {SCOPES}")
        get_method(method)
        _check_structure(structure, example_input, amount, method, targets, exclude, options)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name={name!r} must be a non-empty str or None")
        self.name = name
        self.structure = structure
        self.example_input = example_input
        self.schedule = schedule
        self.amount = amount
        self.unit = unit
        self.after_validation = after_validation
        self.on_update = on_update
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
        self.pruner: Pruner | GroupPruner | None = None
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
        if self.after_validation and (
            not trainer.limit_val_batches or not is_overridden("validation_step", pl_module)
        ):
            raise ValueError(
                "after_validation=True prunes when a validation run ends, but this fit "
                f"validates nothing (limit_val_batches={trainer.limit_val_batches}, "
                f"validation_step defined: {is_overridden('validation_step', pl_module)})"
            )
        self._build(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pruner is not None:
            self._follow_optimizers(trainer)
        if self.unit == "step" and not self.after_validation:
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
        if self.unit == "step" and not self.after_validation:
            self._maybe_update(trainer, pl_module, trainer.global_step)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch" and not self.after_validation:
            self._maybe_update(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch" and not self.after_validation:
            self._maybe_update(trainer, pl_module, trainer.current_epoch + 1)
        if self.pruner is not None:
            self._log(pl_module, self._metrics(), to_logger=True)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.after_validation or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        t = trainer.global_step if self.unit == "step" else trainer.current_epoch + 1
        self._maybe_update(trainer, pl_module, t, catch_up=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.after_validation and self.schedule is not None and self.pruner is not None:
            t = trainer.global_step if self.unit == "step" else trainer.current_epoch
            if self.schedule(t) > self._target:
                rank_zero_warn(
                    f"after_validation=True: the schedule asks for {self.schedule(t):.4f} by "
                    f"{self.unit} {t}, but no validation ran after it; the masks stay at "
                    f"{self._target:.4f}"
                )
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
            try:  # a second fit of the same module continues
                carried = previous.state_dict()
                previous.remove()
            except (RuntimeError, ValueError) as e:  # the engine found a replaced parameter
                self.pruner = None
                raise _changed(pl_module, e) from e
        # (a pruner of another module stays with it: its hooks keep that module's zeros)
        self.pruner = self._make_pruner(pl_module)
        self._check_overlap(trainer, pl_module)
        if self.verbose:
            rank_zero_info(f"prunekit: {self.pruner.describe()}")
        self._live, self._hold, self._seen_optimizers = True, False, []
        state = self._pending_state
        if state is not None:
            self._restore(state)
        elif carried is not None:
            try:
                self.pruner.load_state_dict(carried)
            except ValueError as e:
                self.pruner = None
                raise _changed(pl_module, e) from e
            self._last_t, self._hold = None, True  # t restarts with this trainer's step count
        else:  # a new module (or a copy of this callback): start afresh
            self._last_t, self._target, self._initial = None, 0.0, None
        self._follow_optimizers(trainer)
        if self.reset_to_initial and self._initial is None:
            self._initial = {
                n: pl_module.get_parameter(n).detach().clone() for n in self.pruner.names
            }

    def _make_pruner(self, pl_module: pl.LightningModule) -> Pruner | GroupPruner:
        if self.structure == "weights":
            return Pruner(pl_module, **self._pruner_kwargs(pl_module))
        example = self.example_input
        if example is None:
            example = getattr(pl_module, "example_input_array", None)
        if example is None:
            raise ValueError(
                "structure='groups' traces the module and needs an example input: pass "
                f"Pruning(..., example_input=...) or set {type(pl_module).__name__}.example_input_array"
            )
        options = {k: v for k, v in self.pruner_args.items() if k in GROUP_OPTIONS}
        return GroupPruner(
            pl_module,
            example,
            scope=self.pruner_args["scope"],
            exclude=self.pruner_args["exclude"],
            **options,
        )

    def _pruner_kwargs(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The Pruner's arguments, ``(module, "weight")`` pairs in ``targets`` named."""
        kwargs = dict(self.pruner_args)
        targets = kwargs["targets"]
        if isinstance(targets, tuple) and len(targets) == 2 and isinstance(targets[0], nn.Module):
            targets = [targets]
        if isinstance(targets, list | tuple) and any(isinstance(t, tuple) for t in targets):
            names = {id(m): n for n, m in pl_module.named_modules(remove_duplicate=False)}
            kwargs["targets"] = [_pair_name(t, names, pl_module) for t in targets]
        return kwargs

    def _check_overlap(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.pruner is not None
        for other in trainer.callbacks:
            if not isinstance(other, Pruning) or other is self or not other._live:
                continue
            shared = set(self.pruner.names) & set(other.pruner.names if other.pruner else ())
            if shared and other.pruner is not None and other.pruner.model is pl_module:
                self.pruner = None
                raise ValueError(
                    f"{sorted(shared)} are targets of two Pruning callbacks ({other!r} and "
                    f"{self!r}); each weight follows one schedule: exclude= them from one, "
                    "or join the schedules (prunekit.schedules.join)"
                )

    def _follow_optimizers(self, trainer: pl.Trainer) -> None:
        assert self.pruner is not None
        self._seen_optimizers = follow_optimizers(self.pruner, trainer, self._seen_optimizers)

    def _arguments(self) -> dict[str, Any]:
        """What a checkpoint entry must have been written with to be continued."""
        assert self.pruner is not None
        options = {
            k: v
            for k, v in self.pruner_args.items()
            if k not in ("targets", "method", "scope", "exclude", "seed")
        }
        return {
            "schedule": self._describe(),
            "unit": self.unit,
            "structure": self.structure,
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
        if saved.get("structure") == "groups" and self.structure == "groups":
            # the defaults spelled out or left out are the same options
            saved = {**saved, "options": {**_GROUP_DEFAULTS, **(saved.get("options") or {})}}
            mine = {**mine, "options": {**_GROUP_DEFAULTS, **mine["options"]}}
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
        self._pending_state = None  # (a refused state is not retried by a later fit)
        self._check_arguments(state)
        self.pruner.load_state_dict(state["pruner"])
        self._last_t = state.get("last_t")
        self._target = float(state.get("target", 0.0))
        if state.get("initial") is not None:
            self._initial = state["initial"]

    def _maybe_update(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int, catch_up: bool = False
    ) -> None:
        """Prune at ``t`` if the schedule (or the relative amount) says so; ``catch_up``:
        also when an update was due since the last ``t`` checked (after validation)."""
        if t == self._last_t or self.pruner is None:
            return
        self._last_t = t
        if self.schedule is None:
            self._relative_update(trainer, pl_module, t)
            return
        if not (catch_up or self.schedule.is_update(t)):
            return
        target = self.schedule(t)
        if target == self._target or ((self._hold or catch_up) and target < self._target):
            return
        if self.structure == "groups" and target < self._target:  # (GroupPruner would hold)
            raise ValueError(_goes_down(t, target, self._target))
        self._follow_optimizers(trainer)
        self.pruner.prune_to(target)
        self._target = target
        self._after_update(trainer, pl_module, t)

    def _relative_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        assert self.pruner is not None
        if t < 1:  # nothing has trained yet
            return
        amount = self.amount(t) if callable(self.amount) else self.amount
        amount = _relative_amount(amount, f"amount(t={t})" if callable(self.amount) else "amount")
        if not amount:
            return
        masks, method = self.pruner.masks, self.pruner_args["method"]
        slices = get_method(method).ranks == "slices"
        dim = self.pruner_args.get("dim", 0) if slices else None
        counts: dict[str, tuple[int, int]] = {}  # name -> (kept, total), in slices if structured
        # whole-tensor counts when sharded (a DTensor's count_nonzero is this rank's share)
        pruned = {t.name: t.pruned for t in self.pruner.sparsity().targets} if dim is None else {}
        for name, mask in masks.items():
            if dim is None:
                counts[name] = (mask.numel() - pruned[name], mask.numel())
            else:
                if isinstance(mask, DTensor):  # slices span ranks: the whole mask
                    mask = mask.full_tensor()
                alive = mask.flatten(1) if dim == 0 else mask.movedim(dim, 0).flatten(1)
                counts[name] = (int(alive.any(dim=1).sum()), mask.shape[dim])
        target: int | dict[str, int]
        if self.pruner_args["scope"] == "global":
            kept = sum(k for k, _ in counts.values())
            total = sum(n for _, n in counts.values())
            target = total - kept + _count_of(amount, kept, "everything")
        else:
            target = {
                n: total - kept + _count_of(amount, kept, n) for n, (kept, total) in counts.items()
            }
        self._follow_optimizers(trainer)
        self.pruner.prune_to(target)
        self._target = self.pruner.sparsity().fraction
        self._after_update(trainer, pl_module, t)

    def _after_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        assert self.pruner is not None
        if self._initial is not None:
            self._reset_survivors(pl_module)
        if self.on_update is not None:
            self.on_update(self.pruner, t)
        self._check_ranks_agree(trainer)
        self._log_update(trainer, pl_module)
        if self.verbose:
            rank_zero_info(
                f"pruned to {self._target:.4f} at {self.unit} {t}\n{self.pruner.sparsity()}"
            )

    @torch.no_grad()
    def _reset_survivors(self, pl_module: pl.LightningModule) -> None:
        assert self.pruner is not None and self._initial is not None
        for name, initial in self._initial.items():
            pl_module.get_parameter(name).copy_(initial)
        self.pruner.apply_masks()

    def _check_ranks_agree(self, trainer: pl.Trainer) -> None:
        """Under DDP, compare a checksum of the masks across ranks; divergence is an error."""
        # Sharded (DTensor) masks differ between ranks by design: each holds its shard,
        # cut by decisions all ranks took from the same all-reduced histograms.
        replicated = (
            [m for m in self.pruner.masks.values() if not isinstance(m, DTensor)]
            if self.pruner
            else []
        )
        if trainer.world_size <= 1 or not replicated:
            return
        checksum = torch.stack([_mask_checksum(m) for m in replicated]).to(
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
        # epoch updates (and those after validation, where self.log is not allowed) reach
        # the progress bar from on_train_epoch_end
        if self.unit == "step" and not self.after_validation:
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
            "schedule": self._describe(),
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

    def _describe(self) -> Any:
        if self.schedule is not None:
            return _describe(self.schedule)
        return None if callable(self.amount) else {"kind": "relative", "amount": self.amount}

    def __repr__(self) -> str:
        if self.schedule is None:
            what = f"amount={'<callable>' if callable(self.amount) else self.amount!r}"
        else:
            what = f"schedule={type(self.schedule).__name__}(...)"
        name = "" if self.name is None else f", name={self.name!r}"
        how = (
            "structure='groups'"
            if self.structure == "groups"
            else f"method={self.pruner_args['method']!r}"
        )
        return (
            f"Pruning({what}, unit={self.unit!r}, {how}, scope={self.pruner_args['scope']!r}{name})"
        )


def _check_structure(
    structure: Any,
    example_input: Any,
    amount: Any,
    method: str,
    targets: Any,
    exclude: Any,
    options: Mapping[str, Any] | None,
) -> None:
    """``structure`` and what ``structure="groups"`` cannot be combined with."""
    check_group_arguments(structure, example_input, method=method, targets=targets, options=options)
    if structure == "weights":
        return
    if amount is not None:
        raise ValueError(
            "structure='groups' needs a schedule of group sparsity; amount= (pruning a share "
            "of the remaining weights) is not supported with it"
        )
    if not isinstance(exclude, str | Iterable) or isinstance(exclude, Mapping):
        raise TypeError(f"exclude={exclude!r} must be a name, a glob or a list of them")


def follow_optimizers(
    pruner: Pruner, trainer: pl.Trainer, seen: list[tuple[Any, int]]
) -> list[tuple[Any, int]]:
    """Attach every optimizer of ``trainer`` that holds one of ``pruner``'s targets; cheap
    when nothing changed since ``seen`` (same optimizer objects, same number of parameter
    groups). Returns what to pass as ``seen`` next time."""
    optimizers = list(trainer.optimizers)
    if len(seen) == len(optimizers) and all(
        o is s and len(o.param_groups) == n for o, (s, n) in zip(optimizers, seen, strict=True)
    ):
        return seen
    targets = {id(pruner.model.get_parameter(n)) for n in pruner.names}
    for optimizer in optimizers:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if held & targets:
            pruner.attach(optimizer)
    return [(o, len(o.param_groups)) for o in optimizers]


def _goes_down(t: int, target: float, reached: float) -> str:
    return (
        f"schedule({t})={target} is below the sparsity the masks were already brought to "
        f"({reached}); masks only shrink: give a schedule that does not go down"
    )


def _changed(pl_module: nn.Module, error: Exception) -> ValueError:
    return ValueError(
        f"{type(pl_module).__name__} changed since its previous fit with this callback "
        f"({error}); its masks cannot be carried over: use a new Pruning callback to start afresh"
    )


def _relative_amount(value: Any, name: str) -> float | int:
    """A relative amount: a fraction in [0, 1) of what remains, or an int count >= 0
    (numpy numbers count as what they hold)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name}={value!r} must be a fraction in [0, 1), an int count or a callable"
        )
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"{name}={value} must be a count >= 0")
        return int(value)
    value = float(value)
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise ValueError(f"{name}={value} must be a fraction of what remains, in [0, 1)")
    return value


def _count_of(amount: float | int, kept: int, where: str) -> int:
    if isinstance(amount, int):
        if amount > kept:
            raise ValueError(f"amount={amount} is more than the {kept} left in {where}")
        return amount
    return round(amount * kept)


def _pair_name(entry: Any, names: Mapping[int, str], pl_module: nn.Module) -> Any:
    """``(module, "weight")`` -> ``"path.to.module.weight"``; other entries pass through."""
    if not isinstance(entry, tuple):
        return entry
    if len(entry) != 2 or not isinstance(entry[0], nn.Module) or not isinstance(entry[1], str):
        raise TypeError(
            f"targets entry {entry!r} must be a name, a glob, a module type or a (module, 'weight') pair"
        )
    module, pname = entry
    if id(module) not in names:
        raise ValueError(
            f"targets entry ({type(module).__name__}, {pname!r}): the module is not part of "
            f"{type(pl_module).__name__}"
        )
    if not isinstance(getattr(module, pname, None), torch.Tensor):
        raise ValueError(
            f"targets entry ({type(module).__name__}, {pname!r}): the module has no parameter {pname!r}"
        )
    path = names[id(module)]
    return f"{path}.{pname}" if path else pname


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
