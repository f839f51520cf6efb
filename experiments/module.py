"""``Classifier``: a LightningModule that trains any ``nn.Module`` with cross-entropy.

It logs ``train/loss`` and ``train/acc`` every step (or only at the steps the Trainer
writes, see ``log_every_step``), ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``
per epoch (accuracy: the fraction of correct predictions; over an epoch, the mean of the
batches' fractions weighted by their sizes, i.e. correct / total), and builds SGD / Adam
/ AdamW with an optional per-step LR schedule.

>>> from torch import nn
>>> clf = Classifier(nn.Linear(4, 3), optimizer="sgd", lr=0.1, num_classes=3)
>>> clf(torch.zeros(2, 4)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn
from typing_extensions import override

__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "Classifier"]

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = (None, "cosine", "step")

Batch = tuple[torch.Tensor, torch.Tensor]


class Classifier(L.LightningModule):
    """Train ``model`` (logits out) with cross-entropy; the optimizer and schedule by name.

    - ``optimizer``: ``"sgd"`` (uses ``momentum``), ``"adam"`` or ``"adamw"`` (ignore
      ``momentum``); ``weight_decay`` goes to each as is (AdamW's is decoupled).
    - ``lr_schedule``: ``None`` (constant), ``"cosine"`` (cosine decay to 0 over
      ``max_steps`` optimizer steps, or the Trainer's ``estimated_stepping_batches`` when
      ``max_steps`` is None) or ``"step"`` (multiply by ``gamma`` at each of
      ``milestones``, counted in optimizer steps). The scheduler steps every optimizer step.
    - ``num_classes``: when given, the width of the model's logits, checked at every
      batch (a model built for other data raises instead of training); None: not checked.
    - ``log_every_step``: ``False`` logs the training metrics only at the steps the
      Trainer writes to its loggers (every ``log_every_n_steps``, at the last step, and
      every step while a progress bar shows them), so the logged rows are the same but
      ``trainer.callback_metrics`` holds the last written value in between. Each
      ``self.log`` costs about a millisecond of Lightning bookkeeping, as much as a whole
      LeNet-300-100 step; the experiment runners pass ``False``.

    >>> Classifier(nn.Linear(4, 3), optimizer="rmsprop")
    Traceback (most recent call last):
    ValueError: optimizer='rmsprop' must be one of ('sgd', 'adam', 'adamw')
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: str = "adam",
        lr: float = 1.2e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: str | None = None,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        max_steps: int | None = None,
        num_classes: int | None = None,
        log_every_step: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={model!r} must be a torch.nn.Module")
        _check_choice("optimizer", optimizer, OPTIMIZERS)
        _check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        if not lr > 0:
            raise ValueError(f"{lr=} must be > 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"{momentum=} must be in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"{weight_decay=} must be >= 0")
        if not gamma > 0:
            raise ValueError(f"{gamma=} must be > 0")
        if max_steps is not None and (
            isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
        ):
            raise ValueError(f"{max_steps=} must be None or an int >= 1")
        _check_milestones(milestones, lr_schedule)
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(f"{num_classes=} must be None or an int >= 2")
        if not isinstance(log_every_step, bool):
            raise TypeError(f"{log_every_step=} must be a bool")
        # plain builtins only (not omegaconf containers), so checkpoints load with
        # torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "optimizer": optimizer,
                "lr": float(lr),
                "momentum": float(momentum),
                "weight_decay": float(weight_decay),
                "lr_schedule": lr_schedule,
                "milestones": [int(m) for m in milestones],
                "gamma": float(gamma),
                "max_steps": max_steps,
                "num_classes": num_classes,
                "log_every_step": log_every_step,
            }
        )
        self.model = model

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: Batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        expected = self.hparams.num_classes
        if expected is not None and logits.shape[-1] != expected:
            raise ValueError(
                f"the model gives {logits.shape[-1]} logits per sample, but "
                f"num_classes={expected}: build the model for the data's classes"
            )
        loss = F.cross_entropy(logits, y)
        on_step = stage == "train"
        if on_step and not self._log_train_now():
            return loss
        # a plain tensor, not a torchmetrics object: Lightning moves a logged Metric's
        # whole state on every call, which cost more than the LeNet step itself
        acc = (logits.detach().argmax(dim=1) == y).float().mean()
        kwargs = {"on_step": on_step, "on_epoch": not on_step, "batch_size": y.shape[0]}
        self.log(f"{stage}/loss", loss, prog_bar=on_step, **kwargs)
        self.log(f"{stage}/acc", acc, prog_bar=not on_step, **kwargs)
        return loss

    def _log_train_now(self) -> bool:
        trainer = self._trainer
        if self.hparams.log_every_step or trainer is None:
            return True
        if trainer.progress_bar_callback is not None:
            return True
        # the rule of Lightning's logger connector (it writes after step + 1 batches);
        # global_step counts the optimizer steps before this one
        step = self.global_step + 1
        last = trainer.max_steps > 0 and step >= trainer.max_steps
        return step % trainer.log_every_n_steps == 0 or last or trainer.should_stop

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        optimizer = self._build_optimizer()
        if self.hparams.lr_schedule is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self._build_scheduler(optimizer), "interval": "step"},
        }

    def _build_optimizer(self) -> torch.optim.Optimizer:
        hp = self.hparams
        params = self.model.parameters()
        if hp.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        optimizer_class = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
        return optimizer_class(params, lr=hp.lr, weight_decay=hp.weight_decay)

    def _build_scheduler(
        self, optimizer: torch.optim.Optimizer
    ) -> torch.optim.lr_scheduler.LRScheduler:
        hp = self.hparams
        if hp.lr_schedule == "step":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(hp.milestones), hp.gamma)
        total = (
            hp.max_steps if hp.max_steps is not None else self.trainer.estimated_stepping_batches
        )
        if not 1 <= total < float("inf"):
            raise ValueError(
                f"lr_schedule='cosine' needs a finite number of steps, got {total}: pass "
                "max_steps or give the Trainer max_steps / max_epochs"
            )
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total))


def _check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {choices}")


def _check_milestones(milestones: Sequence[int], lr_schedule: str | None) -> None:
    steps = list(milestones)
    if lr_schedule != "step":
        if steps:
            raise ValueError(f"{milestones=} are only used with lr_schedule='step'")
        return
    valid = all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in steps)
    if not steps or not valid or steps != sorted(set(steps)):
        raise ValueError(
            f"{milestones=} must be a non-empty increasing list of step numbers >= 1 "
            "for lr_schedule='step'"
        )
