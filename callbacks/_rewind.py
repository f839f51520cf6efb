"""`RewindPoint`: capture weights, optimizer and LR-scheduler state at step k for rewinding."""

from __future__ import annotations

import copy
import os
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from prunekit import Pruner


class RewindPoint(Callback):
    """Capture the model's weights, the optimizers' and LR schedulers' state after
    ``step`` optimizer steps (``step=0``: at initialisation, before any step).

    The capture is saved with Lightning checkpoints. A lottery-ticket runner rewinds the
    surviving weights with :meth:`rewind`. Reused for another module, the point captures
    that module afresh (a capture belongs to the module it was taken from).

    With ``path``, the capture also writes a full Lightning checkpoint there (atomically:
    a temporary file renamed into place), so that later fits *start at step k* with
    ``trainer.fit(module, ckpt_path=path)``: weights, optimizer and LR-scheduler state,
    and the step count (they then train from step k to ``max_steps``). The file holds
    no RewindPoint entries (a start for other fits, not a resume of this one). This is how
    late rewinding (Frankle et al. 2020) and the instability analysis restart training
    from step k. A fit that ends before step k captures nothing and warns.

    >>> point = RewindPoint(step=0)
    >>> point.captured
    False
    >>> RewindPoint(step=500, path="runs/rewind.ckpt")
    RewindPoint(step=500, captured=False, path='runs/rewind.ckpt')
    """

    def __init__(self, step: int = 0, path: str | os.PathLike[str] | None = None) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be an int >= 0")
        if path is not None and not isinstance(path, str | os.PathLike):
            raise TypeError(f"path={path!r} must be a file path or None")
        self.step = step
        self.path = None if path is None else Path(path)
        self._saving = False
        self.weights: dict[str, torch.Tensor] | None = None
        self.optimizer_states: list[dict[str, Any]] = []
        self.scheduler_states: list[dict[str, Any]] = []
        self._module: weakref.ref[nn.Module] | None = None  # whose weights were captured

    @property
    def captured(self) -> bool:
        return self.weights is not None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(step=self.step)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        owner = None if self._module is None else self._module()
        if stage == "fit" and self.captured and owner is not None and owner is not pl_module:
            self.weights, self.optimizer_states, self.scheduler_states = None, [], []
            self._module = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.step:
            self.capture(trainer, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self.step:
            self.capture(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.captured and trainer.global_step < self.step:
            rank_zero_warn(
                f"RewindPoint(step={self.step}): the fit ended at step {trainer.global_step}, "
                "before the rewind point; nothing was captured"
            )

    def capture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the snapshot now (once: later calls keep the first capture); with
        ``path``, also write the Lightning checkpoint there."""
        if self.captured:
            return
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.optimizer_states = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]
        self.scheduler_states = [
            copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs
        ]
        self._module = weakref.ref(pl_module)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            # the file is a start for later fits: no RewindPoint entries inside (this one's
            # capture is the file itself; Lightning would warn about the others')
            points = [c for c in trainer.callbacks if isinstance(c, RewindPoint)]
            for point in points:
                point._saving = True
            try:
                trainer.save_checkpoint(tmp, weights_only=False)  # all ranks call, rank 0 writes
            finally:
                for point in points:
                    point._saving = False
            if trainer.is_global_zero:
                os.replace(tmp, self.path)

    def rewind(self, model: torch.nn.Module, pruner: Pruner | None = None) -> None:
        """Load the captured weights into ``model``; with a ``pruner``, its masks are
        applied again, so only the surviving weights take their step-k values."""
        if self.weights is None:
            raise RuntimeError(f"no weights were captured at step {self.step} yet")
        state = model.state_dict()
        missing, unexpected = set(state) - set(self.weights), set(self.weights) - set(state)
        reshaped = [
            k for k in set(state) & set(self.weights) if state[k].shape != self.weights[k].shape
        ]
        if missing or unexpected or reshaped:
            raise ValueError(
                f"the weights captured at step {self.step} belong to another model than "
                f"{type(model).__name__}: missing {sorted(missing)}, unexpected "
                f"{sorted(unexpected)}, other shapes {sorted(reshaped)}"
            )
        model.load_state_dict(self.weights, strict=True)
        if pruner is not None:
            pruner.apply_masks()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._saving:  # Lightning leaves an empty entry out of the checkpoint
            return {}
        return {
            "step": self.step,
            "weights": self.weights,
            "optimizer_states": self.optimizer_states,
            "scheduler_states": self.scheduler_states,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.weights = state_dict.get("weights")
        self.optimizer_states = state_dict.get("optimizer_states", [])
        self.scheduler_states = state_dict.get("scheduler_states", [])
        self._module = None  # taken in another process: the module fitting now adopts it

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_module": None}  # a weak reference does not pickle

    def __repr__(self) -> str:
        where = "" if self.path is None else f", path={str(self.path)!r}"
        return f"RewindPoint(step={self.step}, captured={self.captured}{where})"
