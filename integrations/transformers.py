"""`PruningCallback`: schedule-driven pruning inside a Hugging Face `Trainer`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from prunekit.schedules import FromCallable, Schedule
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from prunekit import (
    GROUP_OPTIONS,
    SCOPES,
    GroupPruner,
    Pruner,
    Targets,
    check_group_arguments,
    get_method,
    unpack_mask,
)

#: The file the callback writes into each ``checkpoint-N`` folder.
STATE_FILE = "prunekit_pruning.pt"
_FORMAT = 1
#: options of structure="groups" (passed to GroupPruner)


class PruningCallback(TrainerCallback):
    """Prune a ``Trainer``'s model to ``schedule(t)`` whenever ``schedule.is_update(t)``.

    ``t`` counts optimizer steps taken (``state.global_step``: with gradient accumulation,
    optimizer steps, not batches). At train begin a :class:`prunekit.Pruner` is built on
    the model (default targets: docs/targets.md) and attached to the optimizer (unwrapped
    from accelerate's ``AcceleratedOptimizer``), so pruned weights stay zero through every
    step, gradient clipping included. Updates happen between optimizer steps.

    - **Checkpoints**: ``on_save`` writes ``STATE_FILE`` (schedule position, bit-packed
      masks) into the ``checkpoint-N`` folder; ``trainer.train(resume_from_checkpoint=...)``
      reads it back from ``output_dir/checkpoint-N`` (or from
      ``TrainingArguments.resume_from_checkpoint`` when that names a folder) and continues
      exactly. A resumed run with no such file, or masks that do not fit the loaded
      weights, raises.
    - **Logging**: ``sparsity/target`` and ``sparsity/actual`` are added to the Trainer's
      training logs (``on_log``; a log is forced at every update): they reach
      ``trainer.state.log_history``, the console and the callbacks after this one. The
      Trainer puts its ``report_to`` callbacks before those passed in ``callbacks=``; put
      this one first for them to see the keys:
      ``trainer.callback_handler.callbacks.insert(0, pruning)``.
    - **Another train()** of the same model with this callback (a new ``Trainer``, whose
      ``global_step`` starts at 0) carries the masks over; targets below the sparsity
      already reached are held (masks never regrow) until the schedule passes it.

    Args:
        schedule: a :class:`prunekit.schedules.Schedule`, or a ``t -> sparsity`` callable.
        targets, method, scope, exclude, seed, options: as for :class:`prunekit.Pruner`.
        verbose: print the one-line target summary at train begin and the sparsity table
            at every update (world process zero).
        structure: ``"weights"`` (default: ``method`` decides what goes) or ``"groups"``:
            a :class:`prunekit.GroupPruner` prunes whole dependency groups (attention heads
            and MLP units with ``options={"blocks_only": True}``, which transformers need:
            their reshapes cannot be followed), so :func:`prunekit.compact` can remove them.
            The schedule's sparsity and ``sparsity/actual`` then count groups. Needs
            ``example_input``, the default ``method`` and no ``targets``; ``exclude``
            leaves groups with a member it matches dense; ``options`` may hold ``reduce``
            and ``blocks_only``. A checkpoint of one structure does not resume the other.
        example_input: with ``structure="groups"``, an input of the model's ``forward``
            (e.g. token ids), moved to the model's device, floats cast to its dtype.

    >>> from prunekit.schedules import Polynomial
    >>> PruningCallback(Polynomial(0.0, 0.9, begin=0, end=100, frequency=10))
    PruningCallback(schedule=Polynomial(...), method='magnitude', scope='global')
    >>> PruningCallback(Polynomial(0.0, 0.5, begin=0, end=100, frequency=10), structure="groups",
    ...                 example_input=torch.ones(1, 8, dtype=torch.long), scope="layer",
    ...                 options={"blocks_only": True})  # half the heads and MLP units
    PruningCallback(schedule=Polynomial(...), structure='groups', scope='layer')
    """

    def __init__(
        self,
        schedule: Schedule | Callable[[int], float],
        *,
        targets: Targets = None,
        method: str = "magnitude",
        scope: str = "global",
        exclude: str | Iterable[str] = (),
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
        verbose: bool = False,
        structure: str = "weights",
        example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        if not isinstance(schedule, Schedule):
            if not callable(schedule):
                raise TypeError(
                    f"schedule={schedule!r} must be a Schedule or a callable t -> sparsity"
                )
            schedule = FromCallable(schedule)
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} must be one of {SCOPES}")
        get_method(method)
        _check_structure(structure, example_input, method, targets, options)
        self.structure = structure
        self.example_input = example_input
        self.schedule = schedule
        self.pruner_args: dict[str, Any] = {
            "targets": targets,
            "method": method,
            "scope": scope,
            "exclude": exclude,
            "seed": seed,
            **dict(options or {}),
        }
        self.verbose = verbose
        self.pruner: Pruner | GroupPruner | None = None
        self._last_t: int | None = None  # the last step checked against the schedule
        self._target = 0.0  # the sparsity the masks were last brought to
        self._hold = False  # a later train() of the same model: targets below _target held

    # --------------------------------------------------------------- hooks
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("PruningCallback needs the Trainer's model and optimizer")
        self._build(args, state, model, optimizer)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._maybe_update(state, control)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._maybe_update(state, control)  # before the Trainer logs and saves this step

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.pruner is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise RuntimeError(
                f"PruningCallback: the Trainer saved step {state.global_step} but {folder} is "
                "not a folder (hyperparameter-search run folders are not supported)"
            )
        torch.save(self.state_dict(state.global_step), os.path.join(folder, STATE_FILE))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.pruner is None or logs is None or any(k.startswith("eval_") for k in logs):
            return
        metrics = {
            "sparsity/target": self._target,
            "sparsity/actual": self.pruner.sparsity().fraction,
        }
        logs.update(metrics)
        last = state.log_history[-1] if state.log_history else None
        if (
            last is not None
            and last.get("step") == state.global_step
            and set(logs) - set(metrics) <= set(last)
        ):
            last.update(metrics)  # the Trainer recorded this log just before calling us

    # ---------------------------------------------------------- internals
    def _build(
        self,
        args: TrainingArguments,
        state: TrainerState,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        previous = self.pruner
        carried = None
        if previous is not None and previous.model is model:
            carried = previous.state_dict()  # a second train() with the same callback goes on
            previous.remove()
        self.pruner = self._make_pruner(model)
        self.pruner.attach(optimizer)  # unwraps accelerate's AcceleratedOptimizer
        self._hold = False
        if state.global_step > 0:
            self._restore(args, state)
        elif carried is not None:
            self.pruner.load_state_dict(carried)
            self._last_t, self._hold = None, True  # t restarts at 0: hold what was reached
        else:
            self._last_t, self._target = None, 0.0
        if self.verbose and state.is_world_process_zero:
            print(f"prunekit: {self.pruner.describe()}")
        self._maybe_update(state, None)

    def _make_pruner(self, model: torch.nn.Module) -> Pruner | GroupPruner:
        if self.structure == "weights":
            return Pruner(model, **self.pruner_args)
        options = {k: v for k, v in self.pruner_args.items() if k in GROUP_OPTIONS}
        return GroupPruner(
            model,
            self.example_input,
            scope=self.pruner_args["scope"],
            exclude=self.pruner_args["exclude"],
            **options,
        )

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        assert self.pruner is not None
        step = state.global_step
        folders = [os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")]
        if isinstance(args.resume_from_checkpoint, str):
            folders.insert(0, args.resume_from_checkpoint)
        files = [os.path.join(f, STATE_FILE) for f in folders]
        found = [f for f in files if os.path.isfile(f)]
        if not found:
            raise RuntimeError(
                f"resuming at step {step}, but no prunekit state was found (looked for "
                f"{files}); resume from a checkpoint written with this callback, or set "
                "TrainingArguments(resume_from_checkpoint=<its folder>)"
            )
        saved = torch.load(found[0], weights_only=True)
        if saved.get("global_step") != step:
            raise RuntimeError(
                f"{found[0]} was written at step {saved.get('global_step')}, the Trainer "
                f"resumed at step {step}"
            )
        mine = _describe(self.schedule)
        if saved.get("schedule") is not None and mine is not None and saved["schedule"] != mine:
            raise ValueError(
                f"the checkpoint was written with schedule {saved['schedule']}, this callback "
                f"has {mine}; resume with the same schedule"
            )
        there = saved.get("structure", "weights")  # (files written before groups existed)
        if there != self.structure:
            raise ValueError(
                f"the checkpoint was written with structure={there!r}, this callback has "
                f"structure={self.structure!r}; resume with the same structure"
            )
        model = self.pruner.model
        inner = saved["pruner"]["pruner"] if there == "groups" else saved["pruner"]
        for name, entry in inner["masks"].items():
            if name not in self.pruner.masks:
                break  # load_state_dict names what differs
            mask = unpack_mask(entry["packed"], tuple(entry["shape"]))
            weight = model.get_parameter(name).detach()
            if weight.shape == mask.shape and bool((weight[~mask.to(weight.device)] != 0).any()):
                raise RuntimeError(
                    f"{found[0]} prunes entries of {name} that are not zero in the weights "
                    "the Trainer resumed from: the file belongs to another run"
                )
        self.pruner.load_state_dict(saved["pruner"])
        self._last_t = saved.get("last_t")
        self._target = float(saved.get("target", 0.0))

    def _maybe_update(self, state: TrainerState, control: TrainerControl | None) -> None:
        t = state.global_step
        if self.pruner is None or t == self._last_t:
            return
        self._last_t = t
        if not self.schedule.is_update(t):
            return
        target = self.schedule(t)
        if target == self._target or (self._hold and target < self._target):
            return
        if self.structure == "groups" and target < self._target:  # (GroupPruner would hold)
            raise ValueError(
                f"schedule({t})={target} is below the sparsity the masks were already brought "
                f"to ({self._target}); masks only shrink: give a schedule that does not go down"
            )
        self.pruner.prune_to(target)
        self._target = target
        if control is not None:
            control.should_log = True  # every update reaches the logs
        if self.verbose and state.is_world_process_zero:
            print(f"prunekit: pruned to {target:.4f} at step {t}\n{self.pruner.sparsity()}")

    # -------------------------------------------------------------- state
    def state_dict(self, global_step: int) -> dict[str, Any]:
        """What ``on_save`` writes: the schedule position and the pruner's state."""
        assert self.pruner is not None
        return {
            "format": _FORMAT,
            "global_step": global_step,
            "structure": self.structure,
            "schedule": _describe(self.schedule),
            "last_t": self._last_t,
            "target": self._target,
            "pruner": self.pruner.state_dict(),
        }

    def __repr__(self) -> str:
        how = (
            "structure='groups'"
            if self.structure == "groups"
            else f"method={self.pruner_args['method']!r}"
        )
        return (
            f"PruningCallback(schedule={type(self.schedule).__name__}(...), "
            f"{how}, scope={self.pruner_args['scope']!r})"
        )


def _check_structure(
    structure: Any,
    example_input: Any,
    method: str,
    targets: Any,
    options: Mapping[str, Any] | None,
) -> None:
    """``structure`` and what ``structure="groups"`` cannot be combined with."""
    check_group_arguments(structure, example_input, method=method, targets=targets, options=options)
    if structure == "weights":
        return
    if example_input is None:
        raise ValueError(
            "structure='groups' needs example_input= (an input of the model's forward, "
            "e.g. torch.ones(1, 8, dtype=torch.long) for token ids)"
        )


def _describe(schedule: Schedule) -> Any:
    try:
        return schedule.to_dict()
    except (ValueError, TypeError):  # e.g. a lambda: not serialisable, not compared
        return None
